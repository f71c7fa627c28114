"""The unpack stage: lay a fetched image's layers out on disk.

Two layouts:
  per layer (default)  each layer is extracted alone into <overlaydir>/<hex>/,
                       ready to be an overlayfs lowerdir, and reused by later
                       runs; <overlaydir>/<hex>.link holds a short name and
                       <overlaydir>/<short> -> <hex>, so that a long list of
                       lowerdirs fits in one page of mount options.
  --into DIR           every layer is applied bottom first straight into DIR
                       (absent or empty), without touching the overlay cache.

A per-layer extraction happens in a temporary directory renamed into place
when complete, under a per-layer lock, so a killed run never leaves a half
layer that a later run would trust; its temporary directory is removed by the
next run that extracts the same layer.

Each layer's diffID is checked as it is extracted. <overlaydir>/<hex>.diffid
records the digest its content had (sha256, or sha512 when the plan's diffID
was one), so a plan that reuses the layer later, or names it twice, is checked
against it too.

The layer mechanism (and the decompressors under it) is imported only where a
layer is applied: a run that only reuses extracted layers never needs it.
"""

import concurrent.futures
import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections import deque

from . import overlay, saferoot
from .cache import Workdir, file_lock
from .digest import Digest
from .errors import CacheError, DigestMismatch, PlanError, UnpackError, UsageError
from .plan import check_cache_paths

log = logging.getLogger("tosi.unpack")

_TMP_PREFIX = ".tmp-"
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def _workdir(workdir):
    if isinstance(workdir, Workdir):
        return workdir
    return Workdir(workdir) if workdir else Workdir()


def _layer_name(record):
    return f"{record.get('index', '?')} ({record.get('digest')})"


def diff_id_of(record):
    """The layer's diffID (the digest of its uncompressed tar), or None when the plan
    names none (a schema1 image); PlanError if it is not a sha256 or sha512 digest."""
    value = record.get("diffID")
    if value is None:
        return None
    try:
        return Digest(value)
    except UsageError as exc:
        raise PlanError(f"layer record {record.get('index', '?')}: diffID: {exc}") from None


def blob_path(workdir, record):
    """Where the layer's blob is: the workdir's place for its digest. A plan that
    names another "path" is refused: a stage never opens a file because a plan says so."""
    check_cache_paths(record, workdir, f"layer {record.get('index', '?')}", ("path",))
    path = workdir.layer_path(record["digest"])
    if not os.path.isfile(path):
        raise CacheError(f"layer {_layer_name(record)} is not in the cache ({path}); "
                         "run tosi-fetch first")
    return path


@contextlib.contextmanager
def _open_blob(workdir, record, stream, open_stream=None):
    if stream is None and open_stream is not None:
        stream = open_stream(record)
    if stream is not None:
        yield stream
        return
    with open(blob_path(workdir, record), "rb", buffering=0) as f:
        yield f


# ---------------------------------------------------------------- --into

def check_into_target(target):
    """UsageError unless `target` is absent or an empty directory (nothing is touched)."""
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target) or os.path.islink(target):
        raise UsageError(f"--into {target}: exists and is not a directory")
    if os.listdir(target):
        raise UsageError(f"--into {target}: directory is not empty")


def apply_layers_into(target, layer_records, workdir=None, open_stream=None, limits=None):
    """Apply layers bottom first into `target`; yields each record with "applied": true.

    `open_stream(record)` may give the blob stream of a layer (default: the
    cache). On failure the error says how much of `target` was applied.
    """
    from . import layer as layer_mod

    check_into_target(target)
    workdir = _workdir(workdir)
    limits = limits or layer_mod.Limits.from_env()
    os.makedirs(target, exist_ok=True)
    applied = 0
    records = iter(layer_records)
    with saferoot.SafeRoot(target) as root:
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except UsageError as exc:
                raise UnpackError(f"{_partial(target, applied)}: {exc}") from exc
            try:
                diff_id = diff_id_of(record)
            except PlanError as exc:
                raise PlanError(f"{exc}; {_partial(target, applied)}") from None
            try:
                started = time.monotonic()
                with _open_blob(workdir, record, None, open_stream) as blob:
                    stats = layer_mod.apply_layer(root, blob, record.get("mediaType"), layer_mod.FLAT,
                                                  _layer_name(record), limits, diff_id)
                _log_stats("applied", record, stats, started)
            except KeyboardInterrupt:
                log.warning("%s", _partial(target, applied))
                raise
            except (UnpackError, CacheError, DigestMismatch) as exc:
                raise type(exc)(f"{exc}; {_partial(target, applied)}") from exc
            except OSError as exc:
                raise UnpackError(f"layer {_layer_name(record)}: {_os_error(exc)}; "
                                  f"{_partial(target, applied)}") from exc
            applied += 1
            yield dict(record, applied=True)


def _log_stats(what, record, stats, started):
    log.info("layer %s: %s %d entries, %d bytes of data in %.2fs", _layer_name(record), what,
             stats.entries, stats.bytes, time.monotonic() - started)


def _os_error(exc):
    return f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")


def _partial(target, applied):
    if applied == 0:
        return f"{target} is partially extracted (no layer applied completely); remove it"
    last = f"0-{applied - 1}" if applied > 1 else "0"
    return f"{target} is partially extracted (layers {last} applied); remove it"


# ---------------------------------------------------------------- per layer

def _short_name():
    n = secrets.randbits(64)
    digits = []
    while n:
        n, r = divmod(n, 36)
        digits.append(_BASE36[r])
    return "".join(reversed(digits)) or "0"


def _ensure_link(workdir, digest):
    """The short name of an extracted layer, made (file and symlink) if missing."""
    link_file = workdir.overlay_link_file(digest)
    hexname = Digest(digest).hex
    try:
        with open(link_file) as f:
            short = f.read().strip()
    except FileNotFoundError:
        short = ""
    if short and os.path.islink(os.path.join(workdir.overlays, short)) \
            and os.readlink(os.path.join(workdir.overlays, short)) == hexname:
        return short
    while True:
        short = _short_name()
        try:
            os.symlink(hexname, os.path.join(workdir.overlays, short))
            break
        except FileExistsError:
            continue  # another layer's name: draw again
    _write_small_file(link_file, short)
    return short


def _write_small_file(path, text):
    tmp = f"{path}.{secrets.token_hex(4)}"
    with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_implicit(final, implicit_dirs):
    """<hex>.implicit: the directories of the layer no entry named (see tosi_tools.mount)."""
    path = final + overlay.IMPLICIT_SUFFIX
    if implicit_dirs:
        _write_small_file(path, b"\0".join(os.fsencode("/".join(parts) or ".") for parts in implicit_dirs))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale one, left by a layer dir removed by hand


def _check_extracted(final, record, diff_id):
    """A layer extracted before (by this run or an earlier one) against the diffID
    `record` states, through the digest recorded when it was extracted."""
    if diff_id is None:
        return
    try:
        with open(final + ".diffid") as f:
            recorded = f.read().strip()
    except FileNotFoundError:
        recorded = ""
    if not recorded.startswith(f"{diff_id.algorithm}:"):
        log.info("layer %s: no %s digest of %s recorded; its diffID is not checked",
                 _layer_name(record), diff_id.algorithm, final)
        return
    if recorded != diff_id:
        from . import layer as layer_mod

        raise layer_mod.diff_id_mismatch(_layer_name(record), recorded, diff_id)


def _discard_tree(path):
    """Remove a temporary tree of ours; what cannot be removed stays (and is said)."""
    try:
        saferoot.remove_tree(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror or exc)


def _remove_stale_temps(workdir, hexname):
    # Called with the layer's lock held: any temp dir of this layer is a dead run's.
    prefix = f"{_TMP_PREFIX}{hexname}-"
    for name in os.listdir(workdir.overlays):
        if name.startswith(prefix):
            log.info("removing %s left by an interrupted run", name)
            _discard_tree(os.path.join(workdir.overlays, name))


def remove_abandoned_temps(workdir):
    """Remove the temporary directories of killed runs, whatever layer they were for.

    A temporary directory whose layer lock nobody holds belongs to no live run.
    """
    workdir = _workdir(workdir)
    try:
        names = os.listdir(workdir.overlays)
    except FileNotFoundError:
        return
    for hexname in {n[len(_TMP_PREFIX):].split("-", 1)[0] for n in names if n.startswith(_TMP_PREFIX)}:
        fd = os.open(os.path.join(workdir.overlays, f"{hexname}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run is extracting that layer
            _remove_stale_temps(workdir, hexname)
        finally:
            os.close(fd)


def extract_layer_to_overlay(workdir, layer_record, stream=None, limits=None, open_stream=None):
    """Extract one layer as an overlayfs lowerdir (or reuse it); returns the enriched record.

    `stream` (any binary reader), or else what `open_stream(record)` returns,
    replaces the cached blob; neither is used when the layer is already extracted.
    A layer whose content does not hash to its diffID is not published.
    """
    workdir = _workdir(workdir)
    diff_id = diff_id_of(layer_record)
    os.makedirs(workdir.overlays, exist_ok=True)
    digest = Digest(layer_record["digest"])
    final = workdir.overlay_path(digest)
    with file_lock(final + ".lock"):
        if not os.path.isdir(final):
            from . import layer as layer_mod

            _remove_stale_temps(workdir, digest.hex)
            tmp = os.path.join(workdir.overlays, f"{_TMP_PREFIX}{digest.hex}-{secrets.token_hex(4)}")
            os.mkdir(tmp)
            os.chmod(tmp, 0o755)  # whatever the umask: the layer's "./" entry, if any, decides
            try:
                started = time.monotonic()
                with _open_blob(workdir, layer_record, stream, open_stream) as blob:
                    stats = layer_mod.apply_layer(tmp, blob, layer_record.get("mediaType"), layer_mod.OVERLAY,
                                                  _layer_name(layer_record), limits, diff_id)
                _write_small_file(final + ".diffid", stats.diff_id)
                _write_implicit(final, stats.implicit_dirs)
                os.rename(tmp, final)
                _log_stats("extracted", layer_record, stats, started)
            except BaseException:
                _discard_tree(tmp)
                raise
        else:
            log.info("layer %s: already extracted in %s", _layer_name(layer_record), final)
            _check_extracted(final, layer_record, diff_id)
        short = _ensure_link(workdir, digest)
    return dict(layer_record, overlay=final, link=short)


def _default_parallel():
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def extract_layers_to_overlays(workdir, layer_records, parallel=None, limits=None, open_stream=None):
    """Extract layers in parallel; yields the enriched records in plan order as they finish."""
    from . import layer as layer_mod

    workdir = _workdir(workdir)
    limits = limits or layer_mod.Limits.from_env()
    parallel = parallel or _default_parallel()
    remove_abandoned_temps(workdir)
    pending = deque()
    by_digest = {}
    pool = concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="unpack")
    try:
        for record in layer_records:
            diff_id_of(record)  # a malformed plan stops before more work starts
            digest = record["digest"]
            future = by_digest.get(digest)
            if future is None:  # a layer the image repeats is extracted once
                future = by_digest[digest] = pool.submit(
                    extract_layer_to_overlay, workdir, record, None, limits, open_stream)
            pending.append((record, future))
            while pending and pending[0][1].done():
                yield _merged(*pending.popleft())
        while pending:
            yield _merged(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _merged(record, future):
    done = future.result()
    if record.get("diffID") != done.get("diffID"):  # a repeated layer, said to be other content
        _check_extracted(done["overlay"], record, diff_id_of(record))
    return dict(record, overlay=done["overlay"], link=done["link"])


# ---------------------------------------------------------------- the stage

def unpack_plan(image, layer_records, workdir=None, overlaydir=None, into=None, parallel=None,
                limits=None, open_stream=None):
    """Unpack the layers of a plan; yields the enriched layer records in plan order.

    With `into`, sets image["rootfs"] (call before writing the image record;
    the target is checked at once) and applies the layers into it; otherwise
    extracts each layer under the overlay directory. `open_stream(record)`, if
    given, returns the layer blob as a binary stream (a download in flight, say)
    instead of the cached file.
    """
    wd = Workdir(workdir or image.get("workdir") or Workdir().root, overlaydir)
    if into:
        check_into_target(into)
        image["rootfs"] = os.path.abspath(into)
        return apply_layers_into(image["rootfs"], layer_records, wd, open_stream, limits)
    return extract_layers_to_overlays(wd, layer_records, parallel, limits, open_stream)

