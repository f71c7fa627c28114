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

Wrong bytes are redone, not fatal: a blob that fails its digest is downloaded
again from byte 0 (digest.DIGEST_RETRIES), and a layer that was unpacking from
its wrong bytes (failing on them, or reaching the digest's verdict) is unpacked
again from the new ones: its overlay's temporary directory is discarded, and
with -extractto the target (empty, or made, by this pull) is emptied and every
layer applied again. A cached blob that fails to decompress or to match its
diffID and then fails its digest too is moved to the workdir's quarantine/ and
fetched again in the same run (unpack.QuarantinedBlob).

A warm -mount (every blob cached, every overlay extracted, no -validate-cache)
skips fetch and the downloading machinery altogether: their imports (requests
among them) cost more than the rest of such a run.
"""

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

from . import mount, ownership, resolve, unpack
from .auth import TokenCache
from .cache import DEFAULT_WORKDIR, Workdir, atomic_write, shared_lock
from .errors import Cancelled, QuarantinedBlob, TosiError, UsageError
from .keychain import from_flags as keychain_from_flags
from .plan import ImageRecord, LayerRecord
from .imageplatform import Platform, parse_platform
from .reference import (
    Reference, SourceReference, is_source_reference, parse_any_reference, reference_with_base_url,
)
from .transport import detect_endpoint

log = logging.getLogger("tosi.pipeline")

MAX_REFETCHES = 3  # rounds of fetching again blobs of the cache found corrupt while unpacking


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
    mount_options: tuple = ()  # -mount-option values (comma lists): see mount.mount_flags
    keep_root_mode: bool = False  # -extractto: see unpack.apply_layers_into
    min_free: Optional[str] = None  # -min-free: space.Reserve text (None: TOSI_MIN_FREE or the default)
    authfile: Optional[str] = None  # -authfile: containers auth.json read first (credstore)
    ca_file: Optional[str] = None  # -ca-file: the CA bundle verifying the registry (else certs.d, system)
    mirrors: tuple = ()  # -mirror values: tried in order before the registry (replacing configured ones)


def preflight(options: PullOptions) -> Optional[Platform]:
    """Refuse, before any network access, what would fail only after the download."""
    if options.extract_to and options.mount:
        raise UsageError("-extractto and -mount are mutually exclusive")
    if options.extract_to:
        unpack.check_into_target(options.extract_to, "-extractto")
    elif options.keep_root_mode:
        raise UsageError("-keep-root-mode goes with -extractto")
    if options.mount:
        mount.check_mountable(options.mount, read_only=options.read_only,
                              mount_options=options.mount_options)
    elif options.read_only or options.mount_options:
        raise UsageError(f"-{'read-only' if options.read_only else 'mount-option'} goes with -mount")
    if options.save_config:
        check_save_config(options.save_config)
    platform = parse_platform(options.platform) if options.platform else None
    return platform


def reference_and_endpoint(options: PullOptions) -> tuple[Reference | SourceReference, Optional[str]]:
    """The Reference to pull (or the SourceReference of an image in an OCI layout or
    a docker-save archive) and the endpoint to use (None: the registry's usual one)."""
    if not options.url:
        return parse_any_reference(options.image), None
    if is_source_reference(options.image):
        raise UsageError("-url names a registry; an oci: or docker-archive: image needs none")
    url = options.url
    if "://" not in url:
        # A bare host:port is spoken to as Docker would: plain HTTP on loopback only.
        detected = detect_endpoint(url.rstrip("/"), options.insecure)
        assert detected is not None  # it probes, so it always answers
        url = detected
    return reference_with_base_url(options.image, url)


def check_save_config(path: str) -> None:
    """Refuse a -saveconfig path the config could not be written to once pulled, or
    one whose directory another user could swap what tosi writes in (writable by
    others and not sticky, or owned by another user): UsageError/UnsafePath."""
    if path.endswith("/") or (os.path.isdir(path) and not os.path.islink(path)):
        raise UsageError(f"-saveconfig {path}: is a directory (name the file to write)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"-saveconfig {path}: {parent} is not a directory")
    ownership.require_safe_ancestors(os.path.abspath(path), "-saveconfig file")


def save_config(image: ImageRecord, path: str) -> None:
    """Write the image config's "config" object (as cached by resolve) to `path`, atomically.

    A new file is written beside `path` (O_CREAT|O_EXCL, so never through a symlink)
    and renamed over it: whatever is at `path`, a symlink planted there included, is
    replaced, never followed, and readers see the old file or the whole new one.
    A write that fails (a full filesystem, ENOSPC; any OSError) is a TosiError (exit 1)
    naming the path, and leaves whatever was at `path` as it was."""
    named = path
    path = os.path.abspath(path)
    check_save_config(path)
    if image.saved_config is None:
        raise TosiError("-saveconfig: the plan names no saved config")
    with open(image.saved_config, "rb") as f:
        data = f.read()
    try:
        atomic_write(path, data)
    except OSError as exc:
        raise TosiError(f"-saveconfig {named}: cannot write it: {exc.strerror or exc}") from exc


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
    # Worded as unpack words its own failures: which of them reports it is a race.
    if applied == 0:
        return type(exc)(f"{exc}; {target} is partially extracted (no layer applied completely); remove it")
    last = f"0-{applied - 1}" if applied > 1 else "0"
    return type(exc)(f"{exc}; {target} is partially extracted (layers {last} applied); remove it")


def pull(options: PullOptions,
         progress_for: Optional[Callable[[ImageRecord, Sequence[LayerRecord]], Any]] = None,
         ) -> tuple[ImageRecord, list[LayerRecord]]:
    """Pull and lay out one image; returns the final plan: (image record, layer records).

    `progress_for(image, layers)` may return a download progress callback (see
    fetch.Fetcher) with a close() method, called once the downloads are over. If it
    has a `layer` method, that is unpack's progress callback (see tosi_tools.unpack:
    layers applied or extracted, entries and bytes); if it has a `clear` method, that
    is called before close() when the pull fails (or is interrupted), so that what it
    shows can be taken away before the error is reported.
    """
    from .mirrors import mirror_flag
    from .registries import RegistryConfig

    platform = preflight(options)
    mirrors = [mirror_flag(text, "-mirror") for text in options.mirrors]
    ref, endpoint = reference_and_endpoint(options)
    registries = RegistryConfig.load()
    keychain = keychain_from_flags(options.username, options.password, insecure=options.insecure,
                                   authfile=options.authfile, ca_file=options.ca_file)
    # Private and ours (made 0700 if missing), before anything in it is read or written.
    workdir = Workdir(options.workdir, options.overlaydir, flag_prefix="-").ensure()
    tokens = TokenCache()
    # A short name is looked up in registries.conf; with -url the image is a repository there.
    image, layers = resolve.resolve_image(
        ref if options.url else options.image, workdir, platform=platform, keychain=keychain,
        endpoint=endpoint, token_cache=tokens, registries=registries, mirrors=mirrors)
    # Held until the pull ends: tosi-gc removes no image a running pull holds.
    if image.registry is None:  # an OCI layout or an archive: no use record to hold
        return _lay_out(options, workdir, keychain, tokens, image, layers, progress_for)
    record = workdir.image_record_path(image.registry, str(image.repository), str(image.digest))
    with shared_lock(record):
        return _lay_out(options, workdir, keychain, tokens, image, layers, progress_for)


def _lay_out(options, workdir, keychain, tokens, image, layers, progress_for):
    cached = None
    if options.mount and not options.validate_cache:
        cached = _extracted_from_cache(workdir, image, layers)
    if cached is not None:
        image, layers = cached
    else:
        image, layers = _fetch_and_unpack(options, workdir, keychain, tokens, image, layers,
                                          progress_for)
    if options.mount:
        image = image.with_mount(mount.mount_image(image, layers, options.mount,
                                                   overlaydir=options.overlaydir, workdir=workdir,
                                                   read_only=options.read_only,
                                                   mount_options=options.mount_options))
    if options.save_config:
        save_config(image, options.save_config)
    return image, layers


def _extracted_from_cache(workdir, image, layers):
    """The plan fetch and unpack would give, (image, layers), when every blob is in
    the cache and every layer extracted (each still checked against its diffID);
    None when anything is missing."""
    for record in layers:
        if not (os.path.exists(workdir.layer_path(record.digest))
                and os.path.isdir(workdir.overlay_path(record.digest))):
            return None
    done = [unpack.extract_layer_to_overlay(workdir, record.with_path(workdir.layer_path(record.digest)))
            for record in layers]
    log.info("%s: every layer cached and extracted", image.reference)
    return image.with_workdir(workdir.root), done


def _fetch_and_unpack(options, workdir, keychain, tokens, image, layers, progress_for):
    created_target = bool(options.extract_to) and not os.path.lexists(options.extract_to)
    refetches = 0
    while True:
        try:
            return _fetch_and_unpack_once(options, workdir, keychain, tokens, image, layers,
                                          progress_for, created_target)
        except QuarantinedBlob as exc:
            if refetches >= MAX_REFETCHES:
                raise
            refetches += 1
            log.warning("%s", exc)  # it says it is fetched again
            if options.extract_to:
                _empty_target(options.extract_to)


def _empty_target(target):
    """Remove what this pull put in the -extractto target (it was absent or empty)."""
    from . import saferoot

    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            saferoot.remove_tree_at(fd, name)
    finally:
        os.close(fd)


def _fetch_and_unpack_once(options, workdir, keychain, tokens, image, layers, progress_for,
                           created_target):
    from . import blobstream, fetch, layer, space
    from .digest import DIGEST_RETRIES

    progress = progress_for(image, layers) if progress_for else None
    parallel = fetch.DEFAULT_PARALLEL if options.parallel is None else options.parallel
    pool_size = parallel or max(len(layers) + 1, 1)
    clients = fetch.client_factory(None, pool_size, token_cache=tokens, insecure=options.insecure,
                                   keychain=keychain)
    fetcher = fetch.Fetcher(workdir, clients,
                            parallel=parallel, validate_cache=options.validate_cache,
                            progress=progress, reserve=space.Reserve.from_env(size_text=options.min_free))
    streams = blobstream.DownloadStreams(fetcher.abort)  # a layer unpacks as its blob arrives
    fetched = fetch.fetch_plan(fetcher, image, layers, early=streams.add)
    fetch_failures = []
    noted = _noting_failures(fetched, fetch_failures)
    seen = []  # the layer records fetch gave so far: a redo starts from the first again

    def layer_records():
        for i in itertools.count():
            if i == len(seen):
                try:
                    seen.append(next(noted))
                except StopIteration:
                    return
            yield seen[i]

    redos = 0
    done = []
    failed = True  # until the layers are all laid out
    try:
        fetched_image = next(fetched)
        while True:
            done = []
            try:
                unpacked_image, unpacked = unpack.unpack_image(
                    fetched_image, layer_records(), workdir=workdir, overlaydir=options.overlaydir,
                    into=options.extract_to, open_stream=streams.open,
                    keep_root_mode=options.keep_root_mode, layer_count=len(layers),
                    limits=layer.Limits.from_env(min_free=options.min_free),
                    progress=getattr(progress, "layer", None), on_failure=streams.layer_failed)
                for record in unpacked:
                    done.append(record)
                image = unpacked_image
                failed = False
                break
            except TosiError as exc:
                # Wrong bytes read from a download that then started over: unpack again.
                if (redos < len(layers) * (DIGEST_RETRIES + 1) and not fetch_failures
                        and not fetcher.cancelled.is_set() and streams.failure is None
                        and streams.bad_bytes_read()):
                    redos += 1
                    log.info("%s; unpacking it again from the blob's new bytes", exc)
                    if options.extract_to:
                        _empty_target(options.extract_to)
                    continue
                raise
    except TosiError as exc:
        failure = exc
        if isinstance(exc.__cause__, TosiError):  # unpack said how far it got: the original
            failure = exc.__cause__
        if isinstance(failure, Cancelled):  # a read stopped because something else failed first
            failure = fetcher.failure or streams.failure or failure
        fetch_failed = (failure in fetch_failures or failure is fetcher.failure
                        or failure is streams.failure)
        if not fetch_failed:
            failure = exc
        if options.extract_to and fetch_failed:
            raise _with_extract_state(failure, options.extract_to, len(done), len(layers),
                                      created_target) from failure
        if failure is not exc:
            raise failure from None
        raise
    finally:
        fetched.close()
        if progress is not None:
            if failed and hasattr(progress, "clear"):
                progress.clear()
            progress.close()
    return image, done
