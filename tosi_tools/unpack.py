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
(Workdir.diffid_path) records the digest its content had (sha256, or sha512
when the plan's diffID was one), so a plan that reuses the layer later, or
names it twice, is checked against it too.

A layer dir has the form of who extracted it (overlayfs.local_form(): root's
trusted.overlay.opaque, or user.overlay.opaque for a "userxattr" mount without
root); <overlaydir>/<hex>.form records the user form. A layer dir of the other
form is never reused (nor replaced: a mount may use it): that is an error.

The layer mechanism (and the decompressors under it) is imported only where a
layer is applied: a run that only reuses extracted layers never needs it.

Every function that lays layers out takes `progress(record, event, stats)`, called
on the thread doing the work (several at once in per-layer mode): "start" (stats
None) when a layer begins, "advance" after each of its tar entries (stats: the
layer.LayerStats so far, entries and data bytes applied), "done" (the final
LayerStats) once it is applied or extracted and published, and "reused" (stats
None) for a layer already extracted, or named again by the plan. It must be quick
and must not print; what it raises stops the work like any failure.
"""

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import secrets
import stat
import time
from collections import deque

from . import overlayfs, ownership, saferoot, space
from .cache import (
    USER_FORM, Workdir, atomic_write, file_lock, fsync_dir, read_form, require_cached, sync_filesystem,
    workdir_for, writing_ahead,
)
from .digest import Digest
from .errors import (
    CacheError, DiffIDMismatch, DigestMismatch, MediaTypeMismatch, QuarantinedBlob, TosiError, UnpackError,
    UnsafeEntry, UnsafePath, counted, ReserveReached, UsageError, flag, for_command,
)
from .plan import ImageRecord, LayerRecord, check_cache_paths

log = logging.getLogger("tosi.unpack")

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# A flat extraction stages a layer above the first whose blob has at least this many bytes (_Stager).
STAGE_MIN_BYTES = 32 << 20


def _workdir(workdir):
    if isinstance(workdir, Workdir):
        return workdir
    return Workdir(workdir) if workdir else Workdir()


def _layer_record(record):
    """A LayerRecord of what a library caller passes (a plain dict is checked)."""
    return LayerRecord.of(record, f"layer record {record.get('index', '?')}")


def blob_path(workdir, record):
    """Where the layer's blob is: the workdir's place for its digest. A plan that
    names another "path" is refused: a stage never opens a file because a plan says so."""
    record = _layer_record(record)
    check_cache_paths(record, workdir, f"layer {record.index}", ("path",))
    path = workdir.layer_path(record.digest)
    if not os.path.isfile(path):
        raise CacheError(f"layer {record.name} is not in the cache ({path}); "
                         "run tosi-fetch first")
    return path


def _against_plan(record, error):
    """`error` reworded, if the blob disagrees with what the plan's record states of it
    (its mediaType, its diffID): the plan's word against the blob's bytes, neither
    said to be the wrong one (the blob's own digest decides that: _check_cached_blob)."""
    what = f"layer {record.name}"
    if isinstance(error, MediaTypeMismatch):
        error.args = (f"{what}: the plan's mediaType {error.media_type} says {error.expected}, "
                      f"but the blob is {error.found}",)
    elif isinstance(error, DiffIDMismatch):
        error.args = (f"{what}: uncompressed content hashes to {error.actual}, not to the plan's "
                      f"diffID {error.stated}",)
    return error


@contextlib.contextmanager
def _open_blob(workdir, record, stream, open_stream=None):
    if stream is None and open_stream is not None:
        stream = open_stream(record)
    if stream is not None:
        try:
            yield stream
        except (UnpackError, DigestMismatch) as exc:
            _against_plan(record, exc)
            # A stream of a blob that was already cached is the cached file's bytes.
            cached = getattr(stream, "cached_path", lambda: None)()
            if cached is not None and not isinstance(exc, (UnsafeEntry, ReserveReached)):
                _check_cached_blob(workdir, record, cached, exc)
            raise
        return
    path = blob_path(workdir, record)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb", buffering=0) as f:
        require_cached(path, os.fstat(fd), "cached blob")
        try:
            yield f
        except (UnpackError, DigestMismatch) as exc:
            _against_plan(record, exc)
            if not isinstance(exc, (UnsafeEntry, ReserveReached)):
                _check_cached_blob(workdir, record, path, exc)
            raise


def _check_cached_blob(workdir, record, path, error):
    """A cached blob failed to decompress or to match its diffID: if it does not match its
    own digest either (bit rot, a crash before fsync), move it to the quarantine and raise
    QuarantinedBlob, so that fetching it again may fix it, saying how. Else the blob is the
    one its digest names: `error` says so, and whom it blames: the plan when the blob is
    not what the plan says of it (mediaType, diffID; the plan, or the manifest or config
    it was resolved from, is wrong), else the layer as the registry serves it."""
    from .digest import verify_file

    what = f"cached blob of layer {record.name}"
    try:
        digest = record.digest
        in_cache = path == workdir.layer_path(digest)
        # A fetch replacing the blob holds its lock.
        with file_lock(workdir.lock_path(digest)) if in_cache else contextlib.nullcontext():
            try:
                # A blob matching its digest stays whatever size the plan gives it
                # (PlanSizeMismatch, a UsageError: `error` is raised as it is).
                verify_file(path, digest, record.size, what, plan_size=True)
            except DigestMismatch as mismatch:
                if not in_cache:
                    raise QuarantinedBlob(f"{error}; {mismatch} (not a blob of the workdir's "
                                          "cache: fetch the plan again)") from error
                moved = workdir.quarantine_blob(path)
                raise QuarantinedBlob(f"{error}; {mismatch}: moved to {moved}, to be fetched again "
                                      + for_command("(run tosi-fetch on the plan again; tosi-verify "
                                                    "checks its other cached blobs)",
                                                    "(-validate-cache checks every cached blob "
                                                    "before use)")) from error
    except (OSError, UsageError):
        return
    # The bytes are the ones the digest names: fetching them again cannot help.
    if isinstance(error, (MediaTypeMismatch, DiffIDMismatch)):
        source = "manifest" if isinstance(error, MediaTypeMismatch) else "image config"
        error.args = (f"{error} (the blob matches its digest: the plan, or the {source} it was "
                      "resolved from, is wrong)",)
        return
    error.args = (f"the registry serves a bad layer (its cached blob matches its digest): {error}",)


# ---------------------------------------------------------------- --into

def check_into_target(target, flag_name=None):
    """UsageError unless `target` is absent or an empty directory of ours, below
    directories nobody else can swap it in (nothing is touched); UnsafePath for a
    symlink, a directory of another user's, or a parent others can write."""
    flag_name = flag_name or flag("into")
    ownership.require_safe_ancestors(target, f"{flag_name} target")
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{flag_name} {target}: is a symlink; tosi does not follow it (another "
                         "user may have made it): remove it, or name a real directory",
                         path=target)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{flag_name} {target}: exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"{flag_name} {target}: is owned by uid {st.st_uid}, not by uid "
                         f"{os.geteuid()} (another user may have made it): remove it, or "
                         "choose another directory", path=target)
    if os.listdir(target):
        raise UsageError(f"{flag_name} {target}: directory is not empty")


def _open_into_target(target, umask):
    """Make `target` 0700 (created, or an empty directory of ours chmodded) and open it;
    returns (SafeRoot, the mode the tree gets when no layer names its root)."""
    check_into_target(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(target, 0o700)
        default = 0o777 & ~umask  # what the directory had before tosi kept it private
    except FileExistsError:
        default = None
    root = saferoot.SafeRoot(target)  # O_NOFOLLOW: a symlink swapped in is refused
    try:
        st = os.fstat(root.fd)
        if st.st_uid != os.geteuid():
            raise UnsafePath(f"{flag('into')} {target}: is owned by uid {st.st_uid}, not by uid "
                             f"{os.geteuid()}; remove it, or choose another directory",
                             path=target)
        # A parent missing at the first look may have been made since by another user,
        # who could then move the tree away and put theirs under its name: now that all
        # exist, they are checked again, and the name is still the directory held.
        ownership.require_safe_ancestors(target, f"{flag('into')} target", complete=True)
        now = os.lstat(target)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise UnsafePath(f"{flag('into')} {target}: was replaced while tosi opened it; "
                             "choose a directory below one of yours or root's", path=target)
        os.fchmod(root.fd, 0o700)
        if default is None:
            default = stat.S_IMODE(st.st_mode)
            if os.listdir(root.fd):  # filled between the check and the chmod
                raise UsageError(f"{flag('into')} {target}: directory is not empty")
    except BaseException:
        root.close()
        raise
    return root, default


def _dangerous(setuid_files, devices):
    said = []
    if setuid_files:
        said.append(f"{setuid_files} setuid/setgid file{'s' if setuid_files > 1 else ''}")
    if devices:
        said.append(f"{devices} device node{'s' if devices > 1 else ''}")
    return " and ".join(said)


def _finish_root(root, target, mode, setuid_files, devices, keep_root_mode):
    """Give the target its image's root mode, unless that hands setuid files or devices
    to other users (then it stays 0700, with a warning)."""
    if (not keep_root_mode and (setuid_files or devices) and mode & 0o011
            and ownership.reachable_by_others(os.path.dirname(target))):
        log.warning("%s is reachable by other users and received %s: it stays 0700 instead "
                    "of the image's %04o; %s gives it the image's mode", target,
                    _dangerous(setuid_files, devices), mode, flag("keep-root-mode"))
        return
    os.fchmod(root.fd, mode)


def apply_layers_into(target, layer_records, workdir=None, open_stream=None, limits=None,
                      keep_root_mode=False, progress=None, layer_count=None, parallel=None):
    """Apply layers bottom first into `target`; yields each LayerRecord with "applied": true.

    `open_stream(record)` may give the blob stream of a layer (default: the
    cache). Every failure once something was written says how much of `target`
    was applied (the same error type, or UnpackError for an OSError or a bug);
    one before anything was written is raised as it came.
    `target` is 0700 while the layers go in; at the end it gets the image's root mode,
    unless other users can reach it and it received setuid/setgid files or devices
    (see _finish_root) and `keep_root_mode` is false. `progress`: see the module's doc.

    `layer_count`: how many records `layer_records` gives, each without waiting (a
    fetch's early records, fetch.fetch_plan). With it, as root, layers above the
    first whose blobs are at least TOSI_STAGE_MIN_BYTES (STAGE_MIN_BYTES) are
    applied beside the target (`parallel` at once with the target's own, default
    one per CPU) and moved in when their turn comes (_Stager); the records are all
    read before the first layer is applied.
    """
    from . import layer as layer_mod

    workdir = _workdir(workdir)
    if open_stream is None:
        workdir.check()  # the blobs come from the cache: it must be ours
    limits = limits or layer_mod.Limits.from_env()
    target = os.path.abspath(target)
    root, root_mode = _open_into_target(target, layer_mod.current_umask())
    applied = setuid_files = devices = 0
    with root, contextlib.ExitStack() as stack:
        stager = None
        if layer_count:
            stager = _Stager.start(workdir, root, limits, open_stream, progress, parallel)
            if stager is not None:
                stack.callback(stager.close)
        records = _Lookahead(iter(layer_records), layer_count if stager else 0,
                             stager.submit if stager else None)
        while True:
            record = None
            try:
                try:
                    record, staged = records.next()
                except StopIteration:
                    _finish_root(root, target, root_mode, setuid_files, devices, keep_root_mode)
                    return
                started = time.monotonic()
                stats = stager.merged(record, staged) if staged is not None else None
                if stats is None:
                    with _open_blob(workdir, record, None, open_stream) as blob:
                        stats = layer_mod.apply_layer(root, blob, record.media_type, layer_mod.FLAT,
                                                      record.name, limits, record.diff_id,
                                                      hold_root=True,
                                                      progress=_layer_progress(progress, record))
                if stats.root_mode is not None:
                    root_mode = stats.root_mode
                    os.utime(root.fd, ns=(stats.root_mtime_ns, stats.root_mtime_ns))
                setuid_files += stats.setuid_files
                devices += stats.devices
                _log_stats("applied", record, stats, started)
                if progress is not None:
                    progress(record, "done", stats)
            except BaseException as exc:
                if applied == 0 and _untouched(root):
                    raise
                partial = _partial(target, applied)
                if isinstance(exc, KeyboardInterrupt):
                    log.warning("%s", partial)
                    raise
                if isinstance(exc, TosiError):
                    raise _saying(exc, partial) from exc
                what = f"layer {record.name}: " if record is not None else ""
                if isinstance(exc, OSError):
                    raise UnpackError(f"{what}{_os_error(exc)}; {partial}") from exc
                if isinstance(exc, Exception):
                    raise UnpackError(f"{what}internal error: {type(exc).__name__}: {exc}; "
                                      f"{partial}") from exc
                raise
            applied += 1
            yield record.with_applied()


class _Lookahead:
    """The layer records of a flat extraction, the first `count` read at the first
    `next()` (each handed to `submit(record)`, whose result comes back beside it)."""

    def __init__(self, records, count, submit):
        self._records = records
        self._left = count
        self._submit = submit
        self._read = deque()

    def next(self):
        """(LayerRecord, what submit gave or None); StopIteration after the last."""
        while self._left > 0:
            self._left -= 1
            try:
                record = _layer_record(next(self._records))
            except StopIteration:
                self._left = 0
                break
            self._read.append((record, self._submit(record) if self._submit is not None else None))
        if self._read:
            return self._read.popleft()
        return _layer_record(next(self._records)), None


class _Staged:
    """A layer applied beside the target: its directory, its LayerStats, and the
    layer's lock in the overlay dir, which keeps other runs from taking the directory
    for a dead run's temporary (remove_abandoned_temps) until it is moved in."""

    def __init__(self, path, stats, lock):
        self.path, self.stats, self.lock = path, stats, lock

    def discard(self):
        try:
            _discard_tree(self.path)
        finally:
            self.lock.close()


class _Stager:
    """The layers of a flat extraction above the first, applied beside the target in
    parallel (layer.STAGED, in a temporary directory of the overlay dir, which must be
    on the target's filesystem) and moved in when the layers below are there
    (staging.merge). Only layers whose blobs are at least STAGE_MIN_BYTES: the move
    costs a rename per entry where the target has the directory, and layers of small
    files gain nothing from a second Python thread. A layer the move cannot make
    exactly (staging.Unmergeable), or whose staging failed, is applied in the target
    as if it had not been staged; one not yet begun when its turn comes, too."""

    def __init__(self, workdir, root, limits, open_stream, progress, parallel, min_bytes):
        self.workdir, self.root, self.limits = workdir, root, limits
        self.open_stream, self.progress, self.min_bytes = open_stream, progress, min_bytes
        # The target's own layer is one of the `parallel` at once.
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, parallel - 1), thread_name_prefix="stage")
        self.jobs = []  # (LayerRecord, future), in plan order
        self.inline = {}  # index: what staging it on the target's thread gave (_Staged or the error)
        self.digests = set()

    @classmethod
    def start(cls, workdir, root, limits, open_stream, progress, parallel):
        """A _Stager, or None where staging cannot work or gains nothing: not root (a
        staged directory's owners could not be kept), one CPU, a target in memory (tmpfs:
        the layers do not wait on a disk, so a second one only takes CPU from the first;
        on 2 CPUs a cold pull of 1 GiB in 4 layers took 1.26x as long staged), the
        overlay dir on another filesystem."""
        from . import layer as layer_mod

        parallel = parallel or _default_parallel()
        min_bytes = _stage_min_bytes()
        if parallel < 2 or min_bytes is None or not layer_mod.running_as_root():
            return None
        if space.in_memory(root.fd):
            return None  # nothing to wait for there: a second extraction only shares the CPUs
        try:
            workdir.ensure()
            if os.stat(workdir.overlays).st_dev != os.fstat(root.fd).st_dev:
                return None
            remove_abandoned_temps(workdir)  # a killed run's staged layers among them
        except (OSError, TosiError) as exc:
            log.info("layers are not staged: %s", exc)
            return None
        return cls(workdir, root, limits, open_stream, progress, parallel, min_bytes)

    def submit(self, record):
        """Start staging `record`'s layer if it is worth it; the future, or None."""
        if not self.digests:
            self.digests.add(record.digest)
            return None  # the first layer goes straight into the empty target
        if (record.size or 0) < self.min_bytes or record.digest in self.digests:
            self.digests.add(record.digest)
            return None  # a repeated layer would wait for its own lock
        self.digests.add(record.digest)
        future = self.pool.submit(self._stage, record)
        self.jobs.append((record, future))
        return future

    def _stage(self, record):
        from . import layer as layer_mod

        lock = contextlib.ExitStack()
        lock.enter_context(file_lock(self.workdir.overlay_lock_path(record.digest)))
        try:
            tmp = self.workdir.overlay_temp_path(record.digest)
            os.mkdir(tmp, 0o700)
        except BaseException:
            lock.close()
            raise
        staged = _Staged(tmp, None, lock)
        try:
            with _open_blob(self.workdir, record, None, self.open_stream) as blob:
                staged.stats = layer_mod.apply_layer(tmp, blob, record.media_type, layer_mod.STAGED,
                                                     record.name, self.limits, record.diff_id,
                                                     hold_root=True,
                                                     progress=_layer_progress(self.progress, record))
        except BaseException:
            staged.discard()
            raise
        return staged

    def merged(self, record, future):
        """The LayerStats of `record`'s layer once moved into the target; None when it is
        to be applied there instead (nothing of it is in the target then)."""
        from . import staging

        staged = self._result(record, future)
        if staged is None:
            return None
        try:
            if staged.stats.unmergeable is not None:
                raise staging.Unmergeable(staged.stats.unmergeable)
            fd = os.open(staged.path, saferoot.DIR_FLAGS)
            try:
                staging.merge(fd, self.root.fd, staged.stats.deletions, staged.stats.implicit_dirs,
                              staged.stats.root_mode is not None, staged.stats.entry_dirs)
            finally:
                os.close(fd)
        except staging.Unmergeable as exc:
            log.info("layer %s: applying it in the target, not moving it in: %s", record.name, exc)
            return None
        finally:
            self.root.forget(())  # handles the move may have made stale
            staged.discard()
        log.info("layer %s: applied beside the target, moved in", record.name)
        return staged.stats

    def _result(self, record, future):
        """`record`'s _Staged, or None to apply it in the target. While another thread
        stages it, this one stages a later layer nobody began rather than wait."""
        while True:
            if record.index in self.inline:
                outcome = self.inline.pop(record.index)
                break
            if future.cancel():
                return None  # not begun: the target's thread is free to apply it now
            if not future.done() and self._help(record):
                continue
            try:
                outcome = future.result()
            except Exception as exc:
                outcome = exc
            break
        if isinstance(outcome, QuarantinedBlob):
            raise outcome  # the cached blob was bad: it is fetched again, and every layer applied again
        if isinstance(outcome, Exception):
            # Applied in the target, it fails the same way if the layer is at fault; bytes
            # a download replaced are read anew.
            log.info("layer %s: staging failed (%s); applying it in the target", record.name, outcome)
            return None
        return outcome

    def _help(self, record):
        """Stage on this thread the first layer after `record` nobody began; False if none."""
        for later, future in self.jobs:
            if later.index > record.index and later.index not in self.inline and future.cancel():
                try:
                    self.inline[later.index] = self._stage(later)
                except Exception as exc:
                    self.inline[later.index] = exc
                return True
        return False

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)
        outcomes = list(self.inline.values())
        for _, future in self.jobs:
            if future.done() and not future.cancelled() and future.exception() is None:
                outcomes.append(future.result())
        for staged in outcomes:
            if isinstance(staged, _Staged) and os.path.lexists(staged.path):
                staged.discard()


def _stage_min_bytes():
    """TOSI_STAGE_MIN_BYTES (default STAGE_MIN_BYTES); None: "off"."""
    text = os.environ.get("TOSI_STAGE_MIN_BYTES", "")
    if not text:
        return STAGE_MIN_BYTES
    if text == "off":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"TOSI_STAGE_MIN_BYTES={text!r} is neither a number nor \"off\"") from None
    if value < 0:
        raise UsageError(f"TOSI_STAGE_MIN_BYTES={text!r} must not be negative")
    return value


def _layer_progress(progress, record):
    """apply_layer's progress(stats) for `record`, after telling `progress` the layer starts."""
    if progress is None:
        return None
    progress(record, "start", None)
    return lambda stats: progress(record, "advance", stats)


def _untouched(root):
    """Whether a failed --into left `target` empty."""
    try:
        return not os.listdir(root.fd)
    except OSError:
        return False


def _saying(exc, more):
    """`exc` (same type and attributes) with "; <more>" added to its message."""
    import copy

    try:
        said = copy.copy(exc)
    except Exception:  # an error class copy cannot rebuild: keep its exit status
        said = TosiError()
        said.exit_code = exc.exit_code
    said.args = (f"{exc}; {more}",)
    return said


def _log_stats(what, record, stats, started):
    log.info("layer %s: %s %s, %s of data in %.2fs", record.name, what,
             counted(stats.entries, "entry", "entries"), counted(stats.bytes, "byte"),
             time.monotonic() - started)


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
    # Not synced: a short name lost in a power loss is drawn again.
    atomic_write(link_file, short, durable=False)
    return short


def _write_implicit(final, implicit_dirs):
    """<hex>.implicit: the directories of the layer no entry named (see tosi_tools.mount)."""
    _write_dirs_record(Workdir.implicit_of(final), implicit_dirs)


def _write_whiteout_dirs(final, whiteout_dirs):
    """<hex>.whiteouts: the directories of the layer that hold whiteout devices (see tosi_tools.mount)."""
    _write_dirs_record(Workdir.whiteouts_of(final), whiteout_dirs)


def _write_dirs_record(path, dirs):
    """Canonical tuples as NUL-separated names, "." for the root; no file for none.
    Synced with the layer (sync_filesystem before its rename), not on its own."""
    if dirs:
        atomic_write(path, b"\0".join(os.fsencode("/".join(parts) or ".") for parts in dirs), durable=False)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale one, left by a layer dir removed by hand


def _check_extracted(workdir, record):
    """A layer extracted before (by this run or an earlier one) against the diffID
    `record` states, through the digest recorded when it was extracted."""
    diff_id = record.diff_id
    if diff_id is None:
        return
    final = workdir.overlay_path(record.digest)
    path = workdir.diffid_path(record.digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        recorded = ""
    else:
        with open(fd) as f:
            require_cached(path, os.fstat(fd), "diffID record")
            recorded = f.read().strip()
    if not recorded.startswith(f"{diff_id.algorithm}:"):
        log.info("layer %s: no %s digest of %s recorded; its diffID is not checked",
                 record.name, diff_id.algorithm, final)
        return
    if recorded != diff_id:
        from . import layer as layer_mod

        raise _against_plan(record, layer_mod.diff_id_mismatch(record.name, recorded, diff_id))


def _discard_tree(path):
    """Remove a temporary tree of ours; what cannot be removed stays (and is said)."""
    try:
        saferoot.remove_tree(path)
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc.strerror or exc)


def _remove_stale_temps(paths):
    # Called with the layer's lock held: any temp dir of this layer is a dead run's.
    for path in paths:
        log.info("removing %s left by an interrupted run", os.path.basename(path))
        _discard_tree(path)


def remove_abandoned_temps(workdir):
    """Remove the temporary directories of killed runs, whatever layer they were for.

    A temporary directory whose layer lock nobody holds belongs to no live run.
    """
    workdir = _workdir(workdir)
    by_lock = {}
    for lock, path in workdir.overlay_temps():
        by_lock.setdefault(lock, []).append(path)
    for lock, paths in by_lock.items():
        try:
            with file_lock(lock, wait=False):
                _remove_stale_temps(paths)
        except BlockingIOError:
            continue  # a live run is extracting that layer


def extract_layer_to_overlay(workdir, layer_record, stream=None, limits=None, open_stream=None,
                             progress=None):
    """Extract one layer as an overlayfs lowerdir (or reuse it); returns the LayerRecord
    with "overlay" and "link".

    `stream` (any binary reader), or else what `open_stream(record)` returns,
    replaces the cached blob; neither is used when the layer is already extracted.
    A layer whose content does not hash to its diffID is not published.
    `progress`: see the module's doc.
    """
    layer_record = _layer_record(layer_record)
    workdir = _workdir(workdir).ensure()
    digest = layer_record.digest
    final = workdir.overlay_path(digest)
    form = overlayfs.local_form()
    with file_lock(workdir.overlay_lock_path(digest)):
        if not _extracted(final, layer_record, form):
            from . import layer as layer_mod

            _remove_stale_temps(path for _, path in workdir.overlay_temps(digest))
            tmp = workdir.overlay_temp_path(digest)
            os.mkdir(tmp)
            os.chmod(tmp, 0o755)  # whatever the umask: the layer's "./" entry, if any, decides
            try:
                started = time.monotonic()
                with writing_ahead(tmp), _open_blob(workdir, layer_record, stream, open_stream) as blob:
                    stats = layer_mod.apply_layer(tmp, blob, layer_record.media_type, layer_mod.OVERLAY,
                                                  layer_record.name, limits, layer_record.diff_id,
                                                  progress=_layer_progress(progress, layer_record),
                                                  form=form)
                atomic_write(workdir.diffid_path(digest), stats.diff_id, durable=False)
                _write_form(workdir.form_path(digest), form)
                _write_implicit(final, stats.implicit_dirs)
                _write_whiteout_dirs(final, stats.whiteout_dirs)
                # The layer's files (and .diffid, .implicit, .whiteouts) on disk before the name says
                # the layer is whole, as one syncfs of their filesystem; the rename after.
                sync_filesystem(tmp)
                os.rename(tmp, final)
                fsync_dir(workdir.overlays)
                _log_stats("extracted", layer_record, stats, started)
            except BaseException:
                _discard_tree(tmp)
                raise
            if progress is not None:
                progress(layer_record, "done", stats)
        else:
            log.info("layer %s: already extracted in %s", layer_record.name, final)
            _check_extracted(workdir, layer_record)
            if progress is not None:
                progress(layer_record, "reused", None)
        short = _ensure_link(workdir, digest)
    return layer_record.with_overlay(final, short)


def _write_form(path, form):
    """<hex>.form: "user" for a layer dir in the user form; none for root's."""
    if form == USER_FORM:
        atomic_write(path, form, durable=False)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale one, left by a layer dir removed by hand


def _form_words(form):
    return "by root" if form != USER_FORM else "without root (user.overlay xattrs)"


def _extracted(final, record, form=None):
    """Whether the layer's overlay dir is there; one that tosi did not make, or one of
    another form than `form` (None: any), is refused."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return False
    require_cached(final, st, "overlay dir")
    if not os.path.isdir(final):
        raise CacheError(f"overlay dir of layer {record.name}: {final} is not a "
                         "directory; remove it")
    found = read_form(final)
    if form is not None and found != form:
        raise CacheError(f"overlay dir of layer {record.name}: {final} was extracted "
                         f"{_form_words(found)}, and this run extracts {_form_words(form)}: a mount "
                         "reads one form only; use a workdir (or --overlaydir) of your own")
    return True


def _default_parallel():
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def extract_layers_to_overlays(workdir, layer_records, parallel=None, limits=None, open_stream=None,
                               progress=None, on_failure=None):
    """Extract layers in parallel; yields the LayerRecords with "overlay" and "link" in
    plan order as they finish. `progress`: see the module's doc. `on_failure(record,
    error)`, if given, is called from the extracting thread as soon as a layer fails:
    reading the next record may wait on something (a download in flight) that only
    the caller can stop, and the failure is seen here only after that read."""
    from . import layer as layer_mod

    # The first record first: a plan refused on reading leaves the workdir untouched.
    records = iter(layer_records)
    first = next(records, None)
    if first is None:
        return
    workdir = _workdir(workdir).ensure()
    limits = limits or layer_mod.Limits.from_env()
    parallel = parallel or _default_parallel()
    remove_abandoned_temps(workdir)
    pending = deque()
    by_digest = {}
    pool = concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="unpack")
    try:
        for record in itertools.chain([first], records):
            record = _layer_record(record)  # a malformed plan stops before more work starts
            digest = record.digest
            future = by_digest.get(digest)
            repeated = future is not None
            if future is None:  # a layer the image repeats is extracted once
                future = by_digest[digest] = pool.submit(
                    extract_layer_to_overlay, workdir, record, None, limits, open_stream, progress)
                if on_failure is not None:
                    future.add_done_callback(functools.partial(_tell_failure, on_failure, record))
            pending.append((record, future, progress if repeated else None))
            while pending and pending[0][1].done():
                yield _merged(workdir, *pending.popleft())
        while pending:
            yield _merged(workdir, *pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tell_failure(on_failure, record, future):
    error = None if future.cancelled() else future.exception()
    if error is not None:
        on_failure(record, error)


def _merged(workdir, record, future, repeat_progress=None):
    """The record with what its layer's extraction gave; `repeat_progress`: the progress
    callback, for a record whose layer the plan named before."""
    done = future.result()
    if record.diff_id != done.diff_id:  # a repeated layer, said to be other content
        _check_extracted(workdir, record)
    if repeat_progress is not None:
        repeat_progress(record, "reused", None)
    return record.with_overlay(done.overlay, done.link)


# ---------------------------------------------------------------- the stage

def unpack_image(image, layer_records, workdir=None, overlaydir=None, into=None, parallel=None,
                 limits=None, open_stream=None, keep_root_mode=False, progress=None, layer_count=None,
                 on_failure=None):
    """Unpack the layers of a plan: (the image record, an iterator of the layer records
    unpacked, in plan order).

    With `into`, the target is checked at once, the image record returned has
    "rootfs" (ImageRecord.with_rootfs) and the layers are applied into it, each
    record with "applied"; otherwise each layer is extracted under the overlay
    directory, its record given "overlay" and "link". `image` is an ImageRecord
    (or a mapping of its fields, then checked). `workdir` is a Workdir or a path;
    without it, the plan's workdir is used if it is a tosi workdir
    (cache.workdir_for). `open_stream(record)`, if given, returns the layer blob as
    a binary stream (a download in flight, say) instead of the cached file.
    `keep_root_mode`, `layer_count` (with `into`; `parallel` then too): see
    apply_layers_into. `progress`: see the module's doc. `on_failure` (without `into`):
    see extract_layers_to_overlays.
    """
    image = ImageRecord.of(image)
    wd = workdir_for(workdir, image, overlaydir)
    if into:
        if open_stream is None:
            wd.check()  # at once: the blobs come from the cache
        check_into_target(into)
        image = image.with_rootfs(os.path.abspath(into))
        return image, apply_layers_into(image.rootfs, layer_records, wd, open_stream, limits,
                                        keep_root_mode, progress, layer_count, parallel)
    return image, extract_layers_to_overlays(wd, layer_records, parallel, limits, open_stream,
                                             progress, on_failure)


def unpack_plan(image, layer_records, workdir=None, overlaydir=None, into=None, parallel=None,
                limits=None, open_stream=None, keep_root_mode=False):
    """unpack_image for a caller holding the image record as its own dict: yields the
    layer records, and with `into` sets image["rootfs"] in that dict (before the first
    layer; the target is checked at once). Stages use unpack_image."""
    unpacked, records = unpack_image(image, layer_records, workdir, overlaydir, into, parallel,
                                     limits, open_stream, keep_root_mode)
    if into:
        image["rootfs"] = unpacked.rootfs
    return records
