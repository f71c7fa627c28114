"""The whole pull in one process: resolve, fetch, unpack and mount, chained through
the plan records exactly as `tosi-resolve | tosi-fetch | tosi-unpack | tosi-mount`
chains them, so the umbrella command and the pipeline make the same trees.

Layers stream from stage to stage: all downloads start at once, and a layer
starts unpacking as soon as its first bytes arrive (blobstream.FollowingReader
reads the partial file behind the downloader), while later blobs are still
downloading. No separate verify pass runs: the downloader hashes every blob as
it writes it (and re-hashes cached ones with `validate_cache`), and the reader
ends a blob only once that check passed, so a layer is published (its overlay
renamed into place, or reported applied) only after it.

A warm -mount (every blob cached, every overlay extracted, no -validate-cache)
skips fetch and the downloading machinery altogether: their imports (requests
among them) cost more than the rest of such a run.
"""

import contextlib
import logging
import os
from typing import NamedTuple, Optional

from . import mount, resolve, unpack
from .auth import TokenCache, credentials_from_flags
from .cache import DEFAULT_WORKDIR, Workdir, atomic_write
from .errors import TosiError, UsageError
from .platform import parse_platform
from .reference import parse_reference, reference_with_base_url
from .registry import detect_endpoint

log = logging.getLogger("tosi.pipeline")


class PullOptions(NamedTuple):  # not a dataclass: importing dataclasses costs a warm run 7 ms
    image: str
    workdir: str = DEFAULT_WORKDIR
    overlaydir: Optional[str] = None
    extract_to: Optional[str] = None
    mount: Optional[str] = None
    read_only: bool = False
    save_config: Optional[str] = None
    parallel: Optional[int] = None  # None: fetch.DEFAULT_PARALLEL; 0: one download per layer
    username: Optional[str] = None
    password: Optional[str] = None
    validate_cache: bool = False
    platform: Optional[str] = None
    insecure: bool = False
    url: Optional[str] = None  # the original's deprecated -url: registry base URL


def preflight(options):
    """Refuse, before any network access, what would fail only after the download."""
    if options.extract_to and options.mount:
        raise UsageError("-extractto and -mount are mutually exclusive")
    if options.extract_to:
        try:
            unpack.check_into_target(options.extract_to)
        except UsageError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise UsageError(f"-extractto {options.extract_to}: {reason}") from None
    if options.mount:
        mount.check_mountable(options.mount, read_only=options.read_only)
    elif options.read_only:
        raise UsageError("-read-only goes with -mount")
    platform = parse_platform(options.platform) if options.platform else None
    return platform


def reference_and_endpoint(options):
    """The Reference to pull and the endpoint to use (None: the registry's usual one)."""
    if not options.url:
        return parse_reference(options.image), None
    url = options.url
    if "://" not in url:
        # A bare host:port is spoken to as Docker would: plain HTTP on loopback only.
        url = detect_endpoint(url.rstrip("/"), options.insecure)
    return reference_with_base_url(options.image, url)


def save_config(image, path):
    """Write the image config's "config" object (as cached by resolve) to `path`, atomically."""
    with open(image["config"]["savedConfig"], "rb") as f:
        data = f.read()
    atomic_write(os.path.abspath(path), data)


def _noting_failures(records, failures):
    try:
        yield from records
    except TosiError as exc:
        failures.append(exc)
        raise


def _with_extract_state(exc, target, applied, total, created_target):
    """A download failure during -extractto, saying what it left in the target
    (the unpack stage says so itself for its own failures)."""
    if applied == 0 and created_target:
        with contextlib.suppress(OSError):
            os.rmdir(target)  # only if still empty: nothing of the image is in it
        if not os.path.lexists(target):
            return type(exc)(str(exc))
    return type(exc)(f"{exc}; {target} is partially extracted ({applied} of {total} layers "
                     "applied); remove it")


def pull(options, progress_for=None):
    """Pull and lay out one image; returns the final plan: (image record, layer records).

    `progress_for(image, layers)` may return a download progress callback (see
    fetch.Fetcher) with a close() method, called once the downloads are over.
    """
    platform = preflight(options)
    ref, endpoint = reference_and_endpoint(options)
    credentials = credentials_from_flags(options.username, options.password,
                                         registry=ref.registry)
    tokens = TokenCache()
    image, layers = resolve.resolve_image(
        ref, options.workdir, platform=platform, credentials=credentials,
        insecure=options.insecure, endpoint=endpoint, token_cache=tokens)
    log.info("%s: %d layers", image["reference"], len(layers))

    workdir = Workdir(options.workdir, options.overlaydir)
    cached = None
    if options.mount and not options.validate_cache:
        cached = _extracted_from_cache(workdir, image, layers)
    if cached is not None:
        image, layers = cached
    else:
        image, layers = _fetch_and_unpack(options, workdir, credentials, tokens, image, layers,
                                          progress_for)
    if options.mount:
        image["mount"] = mount.mount_image(image, layers, options.mount,
                                           overlaydir=options.overlaydir, workdir=workdir.root,
                                           read_only=options.read_only)
    if options.save_config:
        save_config(image, options.save_config)
    return image, layers


def _extracted_from_cache(workdir, image, layers):
    """The plan fetch and unpack would give, (image, layers), when every blob is in
    the cache and every layer extracted (each still checked against its diffID);
    None when anything is missing."""
    for record in layers:
        if not (os.path.exists(workdir.layer_path(record["digest"]))
                and os.path.isdir(workdir.overlay_path(record["digest"]))):
            return None
    done = [unpack.extract_layer_to_overlay(workdir, dict(record, path=workdir.layer_path(record["digest"])))
            for record in layers]
    log.info("%s: every layer cached and extracted", image["reference"])
    return dict(image, workdir=workdir.root), done


def _fetch_and_unpack(options, workdir, credentials, tokens, image, layers, progress_for):
    from . import blobstream, fetch
    from .blobs import Cancelled

    progress = progress_for(image, layers) if progress_for else None
    parallel = fetch.DEFAULT_PARALLEL if options.parallel is None else options.parallel
    pool_size = parallel or max(len(layers) + 1, 1)
    clients = fetch.client_factory(credentials, pool_size, token_cache=tokens, insecure=options.insecure)
    fetcher = fetch.Fetcher(workdir, clients,
                            parallel=parallel, validate_cache=options.validate_cache,
                            progress=progress)
    streams = blobstream.DownloadStreams(fetcher.abort)  # a layer unpacks as its blob arrives
    fetched = fetch.fetch_plan(fetcher, image, layers, early=streams.add)
    fetch_failures = []
    created_target = bool(options.extract_to) and not os.path.lexists(options.extract_to)
    done = []
    try:
        image = next(fetched)
        unpacked = unpack.unpack_plan(image, _noting_failures(fetched, fetch_failures),
                                      workdir=workdir.root, overlaydir=options.overlaydir,
                                      into=options.extract_to, open_stream=streams.open)
        for record in unpacked:
            done.append(record)
    except TosiError as exc:
        failure = exc
        if isinstance(exc, Cancelled):  # a read stopped because something else failed first
            failure = fetcher.failure or streams.failure or exc
        if options.extract_to and (failure in fetch_failures or failure is fetcher.failure
                                   or failure is streams.failure):
            raise _with_extract_state(failure, options.extract_to, len(done), len(layers),
                                      created_target) from failure
        if failure is not exc:
            raise failure from None
        raise
    finally:
        fetched.close()
        if progress is not None:
            progress.close()
    return image, done
