"""The workdir: a content-addressed cache laid out like the original tosi's.

    <workdir>/layers/<hex>            layer blobs exactly as the registry served them
    <workdir>/layers/<hex>.partial    a download in progress (resumed by the next run)
    <workdir>/layers/<hex>.lock       per-blob lock shared by processes, there while held
    <workdir>/configs/<algo>:<hex>    raw image config blobs (.partial, .lock beside them too)
    <workdir>/configs/v2:<algo>:<hex> the config's "config" object (what -saveconfig writes)
    <workdir>/manifests/<registry>/<repository>/<algo>:<hex>  raw manifest and index bytes
    <workdir>/manifests/<registry>/<repository>/tags/<tag>    digest the tag last resolved to
    <workdir>/manifests/<registry>/<repository>/<algo>:<hex>.used  an image's use record (resolve:
                                      its mtime is the last use; JSON {reference, platform}; a pull
                                      holds a shared lock on it while it runs: see tosi_tools.gc)
    <workdir>/manifests/<registry>/.scheme    http or https: what a loopback/--insecure registry spoke
    <workdir>/manifests/<registry>/.challenged  the registry asks for credentials even to HEAD
    <workdir>/overlays/<hex>/         a layer extracted as an overlayfs lowerdir
    <workdir>/overlays/<hex>.link     short name of that layer; overlays/<short> -> <hex>
    <workdir>/overlays/<hex>.diffid   digest of that layer's uncompressed tar, as extracted
    <workdir>/overlays/<hex>.implicit the directories of that layer no entry names (NUL-separated,
                                      "." the root), to be put right by the attributes lowerdir
    <workdir>/overlays/<hex>.whiteouts that layer's directories holding whiteout devices
    <workdir>/overlays/<hex>.lock     per-layer extraction lock, there while held
    <workdir>/overlays/<hex>.form     "user": that layer dir is in the user form (user.overlay.opaque,
                                      for a "userxattr" mount; extracted without root); none: root's
    <workdir>/overlays/.tmp-<hex>-<random>/   an extraction in progress (removed by the next
                                      run that finds its lock free)
    <workdir>/overlays/.tosi-attrs-<key>/     an image's attributes lowerdir (see tosi_tools.mount)
    <workdir>/overlays/.tosi-empty/   the empty lowerdir below a one-layer read-only mount
    <workdir>/overlays/.tosi-mount.lock  held shared by a mount from choosing its lowerdirs to the
                                      mount(2); exclusively by tosi-gc while it removes overlays
    <workdir>/overlays/.tosi-chain-<chainID hex>/  a layer dir copied for the stack below it,
                                      its entries below lower symlinks moved (mount; tosi_tools.chain),
                                      with its own .implicit and .whiteouts beside it
    <workdir>/quarantine/             corrupt blobs moved aside (tosi-verify, unpack)
    <workdir>/.tosi-workdir           marker: this directory is a tosi workdir

`Workdir` gives every one of these paths (with --overlaydir, the overlays/ ones
are in that directory); no other module spells them.

The workdir is private, and nothing in it is trusted because it exists: tosi
runs as root, with a default workdir in world-writable /tmp, where another
user could create the name first and fill it with their own "cached" layers.
`Workdir.ensure()` (stages that write) and `Workdir.check()` (stages that only
read) are the one gate every stage passes before it reads or writes anything
there. Both require, as ssh's StrictModes does:

- the root, layers/, configs/, manifests/, overlays/ (or a separate overlay
  directory) and quarantine/: real directories (not symlinks), owned by the
  effective uid, not writable by group or others. Missing ones are created
  0700 by `ensure()`; an existing one is never chmodded, so a root-owned 0755
  workdir made by an earlier version is still used as it is.
- every directory above them: owned by root or the effective uid, and
  writable by others only when sticky (as /tmp is).

A workdir named only by a plan's image record (untrusted input: a plan could
name /etc, which root owns) is used only when it holds the marker
`.tosi-workdir`, a regular file of ours that `ensure()` writes into every
workdir it makes or uses. `workdir_for()` tells which workdir a stage uses.

What is reused because it is there (a blob, an overlay dir, a `.diffid`
record) must also be ours and not a symlink (`require_cached`): in a private
workdir that always holds, so anything else is refused, not repaired.
Failures raise errors.UnsafePath (exit 2) naming the path and the fix.

Whatever is published under a final name that is trusted when read (a blob, an
extracted layer) has its data on disk before the rename that publishes it, and
the rename itself is made durable by an fsync of the directory after it: after
a power loss the cache may lack a file, never hold a truncated one under a name
it trusts. `atomic_write` does so for small files (its temporary name is
`.tmp-<name>-<random>` beside the file); manifests and configs skip its fsyncs
(`durable=False`) because they are checked against their digests whenever they
are read (a bad one is fetched again), an extracted layer's `.diffid` and
`.implicit` because one syncfs of the overlay dir's filesystem precedes the
layer's rename, and `.link` because a lost short name is drawn again.
So that this costs a cold pull little (bench/sync-cost), the disk
is put to work while the data is still being written (start_writeback for a
blob as it arrives, writing_ahead for a layer being extracted), and layers
that finish together share one syncfs (sync_filesystem).
"""

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from .digest import Digest
from .errors import CacheError, PlanError, UnsafePath
from .ownership import check_own_dir_stat, make_own_dir, require_safe_ancestors

DEFAULT_WORKDIR = "/tmp/tosi"
# The forms of a layer dir (see tosi_tools.overlayfs): root's, and anyone else's.
TRUSTED_FORM, USER_FORM = "trusted", "user"
MARKER = ".tosi-workdir"
_MARKER_TEXT = b"This directory is a tosi workdir (a cache of image blobs and layers); see tosi(1).\n"


def atomic_write(path: str, data: bytes | str, mode: int = 0o644, durable: bool = True) -> None:
    """Write bytes (or text, as UTF-8) to `path` so that readers see the old file or
    the whole new one, also after a power loss (fsync of the file before the rename,
    of its directory after). The new file is made beside `path` with O_EXCL|O_NOFOLLOW
    and `mode`, and renamed over whatever is there (a symlink is replaced, not followed).

    `durable=False` skips both fsyncs, for a caller that flushes the whole filesystem
    before it publishes what the file belongs to (unpack: syncfs before the layer's rename)."""
    if isinstance(data, str):
        data = data.encode()
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}-{secrets.token_hex(4)}")
    try:
        # O_EXCL|O_NOFOLLOW: never through a name someone planted in a shared directory.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def fsync_path(path: str) -> None:
    """Flush a file's data and metadata to disk (before renaming it into place)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the renames and creations in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: Any = None


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A libc function through ctypes (None where libc lacks it); the GIL is let go during calls."""
    global _libc
    if _libc is None:
        import ctypes  # not on the warm path: only what writes to the cache syncs

        _libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(_libc, name, None)
    if function is not None:
        function.argtypes = list(argtypes)
    return function


def _raise_errno(path: str) -> NoReturn:
    import ctypes

    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range: Any = None


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Start writing the dirty pages of file `fd` in [offset, offset + length) (length 0:
    to the end) to disk, without waiting for them (sync_file_range(2), SYNC_FILE_RANGE_WRITE).

    It makes nothing durable by itself: it lets the disk work while the file is still
    being written, so that the fsync or syncfs that must come before the file is
    published finds little left to wait for. Where libc or the filesystem cannot do
    it, nothing happens.
    """
    global _sync_file_range
    if _sync_file_range is None:
        import ctypes

        _sync_file_range = _libc_function("sync_file_range", ctypes.c_int, ctypes.c_int64,
                                          ctypes.c_int64, ctypes.c_uint) or False
    if _sync_file_range:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure only loses the head start


# A blob read once while it downloads (or from the cache) is not read again soon:
# its pages are dropped this far behind the reader, in steps of DROP_STEP.
DROP_LAG = 16 << 20
DROP_STEP = 8 << 20


class DropBehind:
    """Let the kernel drop the page cache of a file behind a sequential reader.

    A blob's pages are read once: the layer extraction that follows the download
    reads each byte right after it arrived, and then nothing reads them until the
    next run, which may well be after the kernel evicted them anyway. Kept, they
    make a 1 GiB pull take 2 GiB of page cache (the blob, then the tree), and every
    page of it newly allocated; dropped, the blob's pages are used again for what
    the pull writes next (bench/run, README "Where the time goes"). Dirty pages and
    pages under writeback are not dropped (posix_fadvise(2) POSIX_FADV_DONTNEED
    skips them): each call covers the previous step again, so that pages whose
    writeback has since ended go too. Blobs under DROP_LAG are never touched.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._dropped = 0  # advice given up to here

    def passed(self, offset: int) -> None:
        """The reader is at `offset`."""
        end = offset - DROP_LAG
        if end - self._dropped >= DROP_STEP:
            start = max(0, self._dropped - DROP_STEP)
            try:
                os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass  # advice only: a filesystem that cannot take it keeps its pages
            self._dropped = end


class _FilesystemSyncs:
    """syncfs(2) calls shared between threads: a thread that asks while a syncfs of the
    same filesystem is running waits for it to end, then for the next one, which it
    shares with every thread that asked meanwhile. A syncfs flushes what was written
    before it started, so each caller gets one that started after it asked; layers
    that finish together pay for one flush, not one each."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: set[int] = set()  # st_dev of the filesystems being synced
        self._started: dict[int, int] = {}  # st_dev -> how many syncfs calls were started
        self._done: dict[int, int] = {}  # st_dev -> the number of the last one that succeeded

    def sync(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dev = os.fstat(fd).st_dev
            with self._cond:
                needed = self._started.get(dev, 0) + 1  # the first to start after this call
                while dev in self._running:
                    self._cond.wait()
                if self._done.get(dev, 0) >= needed:
                    return
                self._running.add(dev)
                number = self._started[dev] = self._started.get(dev, 0) + 1
            ok = False
            try:
                _syncfs_fd(fd, path)
                ok = True
            finally:
                with self._cond:
                    self._running.discard(dev)
                    if ok:
                        self._done[dev] = number
                    self._cond.notify_all()
        finally:
            os.close(fd)


_syncfs: Any = None


def _syncfs_fd(fd: int, path: str) -> None:
    global _syncfs
    if _syncfs is None:
        import ctypes

        _syncfs = _libc_function("syncfs", ctypes.c_int) or False
    if not _syncfs:
        os.fsync(fd)
    elif _syncfs(fd) != 0:
        _raise_errno(path)


_filesystem_syncs = _FilesystemSyncs()


def sync_filesystem(path: str) -> None:
    """Flush every dirty file of the filesystem holding `path` (syncfs(2)): one call for
    the thousands of files of an extracted layer, instead of one fsync each, and one
    for the layers of a pull that finish together (_FilesystemSyncs). Falls back to
    fsyncing `path` alone where libc has no syncfs."""
    _filesystem_syncs.sync(path)


WRITE_AHEAD_INTERVAL = 0.25  # seconds between two syncfs of writing_ahead


WRITE_AHEAD_THREAD = "tosi-writeahead"  # also its name for the kernel (top -H, bench/sync-cost)


class _WriteAhead:
    """The thread of writing_ahead for one filesystem (it owns `fd`, a directory there),
    and how many callers hold it."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path, self.holders = fd, path, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=WRITE_AHEAD_THREAD, daemon=True)

    def _run(self) -> None:
        _name_thread(WRITE_AHEAD_THREAD.encode())
        try:
            # Not through _FilesystemSyncs: nobody waits for these, and a sync before a
            # publish must not wait for one that started before it was asked for.
            while not self.stop.wait(WRITE_AHEAD_INTERVAL):
                _syncfs_fd(self.fd, self.path)
        except OSError:
            pass  # only a head start is lost: the sync before publishing reports the error
        finally:
            os.close(self.fd)


def _name_thread(name: bytes) -> None:
    """Give the calling thread a name the kernel shows (prctl PR_SET_NAME, 15 bytes)."""
    import ctypes

    prctl = _libc_function("prctl", ctypes.c_int, ctypes.c_char_p)
    if prctl is not None:
        prctl(15, name[:15])


_write_aheads: dict[int, _WriteAhead] = {}  # st_dev -> _WriteAhead
_write_aheads_lock = threading.Lock()


@contextlib.contextmanager
def writing_ahead(path: str) -> Iterator[None]:
    """While held, a thread flushes the filesystem holding directory `path` every
    WRITE_AHEAD_INTERVAL (syncfs), so that what is being written there (the thousands of
    files of a layer being extracted) goes to disk while more is written, and the syncfs
    before it is published waits for the last fraction of a second's writes only. The
    kernel writes a batch of files at a time in one go, much cheaper than a start per
    file. Callers in other threads share one thread per filesystem."""
    fd: int | None = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    assert fd is not None
    try:
        dev = os.fstat(fd).st_dev
        with _write_aheads_lock:
            ahead = _write_aheads.get(dev)
            if ahead is None:
                ahead = _WriteAhead(fd, path)
                ahead.thread.start()
                fd = None  # the thread's now
                _write_aheads[dev] = ahead
            ahead.holders += 1
    finally:
        if fd is not None:
            os.close(fd)
    try:
        yield
    finally:
        with _write_aheads_lock:
            ahead.holders -= 1
            last = ahead.holders == 0
            if last:
                del _write_aheads[dev]
                ahead.stop.set()
        if last:
            # A syncfs under way makes progress on what the caller syncs next anyway; once
            # joined, the thread holds nothing open on the filesystem (it can be unmounted).
            ahead.thread.join()


@contextlib.contextmanager
def file_lock(path: str, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive fcntl lock on `path` (created if missing), waiting for it
    (`wait=False`: raise BlockingIOError if another holds it).

    The kernel drops the lock when its holder dies, so a SIGKILLed process never
    leaves a lock that blocks the next run. The holder removes the file when done,
    while still holding it, so lock files do not pile up: a locker that got the
    lock on a file no longer at `path` (removed by its last holder meanwhile) locks
    the one there now instead, so all holders lock the same file. A holder
    killed before its removal leaves the file, which the next one removes.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd)
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)  # still held: a waiter on this file finds it gone and tries again
        except OSError:
            pass
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def shared_lock(path: str) -> Iterator[bool]:
    """Hold a shared fcntl lock on `path` (created if missing), waiting for it; yields
    False, holding nothing, where the file cannot be made (a read-only cache)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield True
    finally:
        os.close(fd)


def _safe_component(text: str) -> str:
    # Registry hosts and repository paths come from the reference grammar, which
    # forbids "..", but the cache must not trust that far: keep every part a plain name.
    parts = [p for p in text.split("/") if p not in ("", ".", "..")]
    return os.path.join(*parts) if parts else "_"


def require_cached(path: str, st: os.stat_result, what: str) -> None:
    """UnsafePath unless `st` (an lstat or fstat of `path`, something the cache
    holds and tosi is about to reuse) is owned by us and not a symlink."""
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        problem = "a symlink"
    elif st.st_uid != euid:
        problem = f"owned by uid {st.st_uid}, not by uid {euid}"
    else:
        return
    raise UnsafePath(f"{what} {path} is {problem}, so tosi did not make it; "
                     "remove it (another user may have planted it)", path=path)


def workdir_for(workdir: "Workdir | str | None" = None, image: Mapping[str, Any] | None = None,
                overlaydir: str | None = None, default: str = DEFAULT_WORKDIR,
                flag_prefix: str = "--") -> "Workdir":
    """The Workdir a stage that reads a plan uses: `workdir` (a Workdir, or a path
    the user chose), else the one the plan's image record names (used only if it
    is a tosi workdir: see Workdir.named_by_plan), else `default`."""
    if isinstance(workdir, Workdir):
        if overlaydir and os.path.abspath(overlaydir) != workdir.overlays:
            return Workdir(workdir.root, overlaydir, workdir.named_by_plan, workdir.flag_prefix)
        return workdir
    if workdir:
        return Workdir(workdir, overlaydir, flag_prefix=flag_prefix)
    named = (image or {}).get("workdir")
    if named is not None:
        if not isinstance(named, str) or not os.path.isabs(named):
            raise PlanError(f"image record: workdir must be an absolute path, not {named!r}")
        return Workdir(named, overlaydir, named_by_plan=True, flag_prefix=flag_prefix)
    return Workdir(default, overlaydir, flag_prefix=flag_prefix)


class Workdir:
    """Paths inside one workdir; creating and checking directories is explicit
    (`ensure`, `check`: see the module's docstring).

    `named_by_plan`: the path came from a plan, not from the user, so it is used
    only if it holds the marker. `flag_prefix` is how the command spells its
    flags ("--" for the stages, "-" for tosi), for the fixes errors suggest.
    """

    # Names in the overlay dir beside the layers' <hex> dirs (see the module's docstring).
    TEMP_PREFIX = ".tmp-"
    EMPTY_LOWER = ".tosi-empty"
    ATTRIBUTES_PREFIX = ".tosi-attrs-"
    CHAIN_PREFIX = ".tosi-chain-"
    # Beside a layer dir <hex> (and a chain copy): its records of directories.
    IMPLICIT_SUFFIX = ".implicit"
    WHITEOUTS_SUFFIX = ".whiteouts"
    # Beside a manifest <algo>:<hex>: the image's use record.
    USED_SUFFIX = ".used"
    MOUNT_LOCK = ".tosi-mount.lock"
    FORM_SUFFIX = ".form"

    def __init__(self, root: str = DEFAULT_WORKDIR, overlaydir: str | None = None,
                 named_by_plan: bool = False, flag_prefix: str = "--") -> None:
        self.root = os.path.abspath(root)
        self.layers = os.path.join(self.root, "layers")
        self.configs = os.path.join(self.root, "configs")
        self.manifests = os.path.join(self.root, "manifests")
        self.quarantine = os.path.join(self.root, "quarantine")
        self.overlays = os.path.abspath(overlaydir) if overlaydir else os.path.join(self.root, "overlays")
        self.named_by_plan = named_by_plan
        self.flag_prefix = flag_prefix
        self._gate: str | None = None  # "checked" or "ensured", once passed: a few lstat calls

    @property
    def marker(self) -> str:
        return os.path.join(self.root, MARKER)

    def _separate_overlays(self) -> bool:
        return os.path.dirname(self.overlays) != self.root

    def _subdirs(self) -> list[str]:
        subdirs = [self.layers, self.configs, self.manifests, self.quarantine]
        return subdirs if self._separate_overlays() else subdirs + [self.overlays]

    def quarantine_blob(self, path: str) -> str:
        """Move a corrupt cached blob aside (so the next fetch downloads it again);
        returns where it went. A blob another process moved first is fine."""
        make_own_dir(self.quarantine, 0o700, "quarantine directory")
        target = os.path.join(self.quarantine, os.path.basename(path))
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        return target

    def ensure(self) -> "Workdir":
        """Create what is missing (0700) and check what exists, before a stage writes;
        raises UnsafePath. Also writes the marker. Returns self."""
        if self._gate == "ensured":
            return self
        self._safe_ancestors(self.root, "workdir")
        if self.named_by_plan:
            self._check_named_root()
        else:
            self._make_parents(self.root, "workdir")
            self._make_dir(self.root, "workdir", "workdir")
        for path in self._subdirs():
            self._make_dir(path, self._what(path), "workdir")
        if self._separate_overlays():
            self._safe_ancestors(self.overlays, "overlay directory")
            self._make_parents(self.overlays, "overlay directory")
            self._make_dir(self.overlays, "overlay directory", "overlaydir")
        self._write_marker()
        self._gate = "ensured"
        return self

    def check_if_named_by_plan(self) -> "Workdir":
        """For a workdir a plan named: refuse it now unless it is a tosi workdir of ours (a
        stage about to compare the plan's paths with it says so first). Returns self."""
        if self.named_by_plan:
            self._check_named_root()
        return self

    def check(self) -> "Workdir":
        """Check the workdir without creating anything, before a stage only reads it:
        the root must exist, directories that exist must pass. Raises UnsafePath, or
        CacheError when there is no workdir at all. Returns self."""
        if self._gate is not None:
            return self
        self._safe_ancestors(self.root, "workdir")
        if self.named_by_plan:
            self._check_named_root()
        else:
            try:
                st = os.lstat(self.root)
            except FileNotFoundError:
                raise CacheError(f"workdir {self.root} does not exist, so nothing is cached "
                                 "there; run tosi-fetch (or tosi) first") from None
            self._check_dir(self.root, st, "workdir", "workdir")
        for path in self._subdirs():
            self._check_if_there(path, self._what(path), "workdir")
        if self._separate_overlays():
            self._safe_ancestors(self.overlays, "overlay directory")
            self._check_if_there(self.overlays, "overlay directory", "overlaydir")
        self._gate = "checked"
        return self

    # the gate's parts

    def _what(self, path: str) -> str:
        return "overlay directory" if path == self.overlays else "workdir directory"

    def _fix(self, flag: str, ours: bool = False) -> str:
        choose = f"choose another {'workdir' if flag == 'workdir' else 'overlay directory'} " \
                 f"({self.flag_prefix}{flag} DIR)"
        if ours:
            return f"make it private (chmod go-w), or {choose}"
        return f"another user may have made it: remove it, or {choose}"

    def _check_dir(self, path: str, st: os.stat_result, what: str, flag: str) -> None:
        ours = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        check_own_dir_stat(path, st, what, self._fix(flag, ours))

    def _make_dir(self, path: str, what: str, flag: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # Made 0700; a name someone made meanwhile is checked by make_own_dir.
            make_own_dir(path, 0o700, what, self._fix(flag))
        else:
            self._check_dir(path, st, what, flag)

    def _check_if_there(self, path: str, what: str, flag: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        self._check_dir(path, st, what, flag)

    def _safe_ancestors(self, path: str, what: str) -> None:
        try:
            require_safe_ancestors(path, what)
        except UnsafePath as exc:
            flag = "workdir" if what == "workdir" else "overlaydir"
            raise UnsafePath(f"{exc} ({self.flag_prefix}{flag} DIR)", path=exc.path) from None

    def _make_parents(self, path: str, what: str) -> None:
        # Like mkdir -p for the directories above; a directory someone else made
        # there meanwhile is caught by the second look at the ancestors.
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o755, exist_ok=True)
            self._safe_ancestors(path, what)

    def _check_named_root(self) -> None:
        fix = f"pass {self.flag_prefix}workdir DIR to choose the workdir yourself"
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            raise UnsafePath(f"the plan's workdir {self.root} does not exist; {fix}",
                             path=self.root) from None
        self._check_dir(self.root, st, "the plan's workdir", "workdir")
        try:
            marker = os.lstat(self.marker)
        except FileNotFoundError:
            marker = None
        if marker is None or not stat.S_ISREG(marker.st_mode) or marker.st_uid != os.geteuid():
            raise UnsafePath(f"the plan's workdir {self.root} is not a tosi workdir of yours "
                             f"(no {MARKER} of yours in it); {fix}", path=self.root)

    def _write_marker(self) -> None:
        try:
            fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
        except FileExistsError:
            st = os.lstat(self.marker)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{self.marker} is not a regular file; remove it", path=self.marker) \
                    from None
            require_cached(self.marker, st, "workdir marker")
            return
        try:
            os.write(fd, _MARKER_TEXT)
        finally:
            os.close(fd)

    # blobs
    def layer_path(self, digest: str) -> str:
        return os.path.join(self.layers, Digest(digest).hex)

    def partial_path(self, digest: str) -> str:
        return self.partial_of(self.layer_path(digest))

    def lock_path(self, digest: str) -> str:
        return self.lock_of(self.layer_path(digest))

    @staticmethod
    def partial_of(blob_path: str) -> str:
        """Where a blob (a layer's or a config's cache path) is received before its rename."""
        return blob_path + ".partial"

    @staticmethod
    def lock_of(blob_path: str) -> str:
        """The lock of a blob (a layer's or a config's cache path), shared by processes."""
        return blob_path + ".lock"

    def config_path(self, digest: str) -> str:
        return os.path.join(self.configs, str(Digest(digest)))

    def saved_config_path(self, digest: str) -> str:
        return os.path.join(self.configs, "v2:" + str(Digest(digest)))

    # manifests
    def manifest_dir(self, registry: str, repository: str) -> str:
        return os.path.join(self.manifests, _safe_component(registry), _safe_component(repository))

    def manifest_path(self, registry: str, repository: str, digest: str) -> str:
        return os.path.join(self.manifest_dir(registry, repository), str(Digest(digest)))

    def tag_path(self, registry: str, repository: str, tag: str) -> str:
        return os.path.join(self.manifest_dir(registry, repository), "tags", _safe_component(tag))

    def scheme_path(self, registry: str) -> str:
        # A leading dot: no repository path component can be named so.
        return os.path.join(self.manifests, _safe_component(registry), ".scheme")

    def challenged_path(self, registry: str) -> str:
        return os.path.join(self.manifests, _safe_component(registry), ".challenged")

    def image_record_path(self, registry: str, repository: str, digest: str) -> str:
        """The use record of the image whose manifest is `digest`: its mtime is when it
        was last resolved (a ':' in the name: no repository path component is so named)."""
        return self.manifest_path(registry, repository, digest) + self.USED_SUFFIX

    # overlays
    def overlay_path(self, digest: str) -> str:
        return os.path.join(self.overlays, Digest(digest).hex)

    def overlay_link_file(self, digest: str) -> str:
        return self.overlay_path(digest) + ".link"

    def overlay_lock_path(self, digest: str) -> str:
        """The lock held while the layer is extracted (or its extraction reused)."""
        return self._overlay_lock(Digest(digest).hex)

    def _overlay_lock(self, hexname: str) -> str:
        return os.path.join(self.overlays, hexname + ".lock")

    def diffid_path(self, digest: str) -> str:
        """The digest the layer's content had when extracted (sha256 or sha512)."""
        return self.diffid_of(self.overlay_path(digest))

    @staticmethod
    def diffid_of(layer_dir: str) -> str:
        """The diffID record beside the layer extracted in `layer_dir` (a chain copy's too)."""
        return layer_dir + ".diffid"

    def implicit_path(self, digest: str) -> str:
        return self.implicit_of(self.overlay_path(digest))

    @staticmethod
    def implicit_of(layer_dir: str) -> str:
        """The list of the directories of the layer extracted in `layer_dir` that no
        entry names (NUL-separated, "." the root)."""
        return layer_dir + Workdir.IMPLICIT_SUFFIX

    def whiteouts_path(self, digest: str) -> str:
        return self.whiteouts_of(self.overlay_path(digest))

    @staticmethod
    def whiteouts_of(layer_dir: str) -> str:
        """The list of the directories of the layer extracted in `layer_dir` that hold
        whiteout devices (NUL-separated, "." the root)."""
        return layer_dir + Workdir.WHITEOUTS_SUFFIX

    def form_path(self, digest: str) -> str:
        return self.form_of(self.overlay_path(digest))

    @staticmethod
    def form_of(layer_dir: str) -> str:
        """The record of the form of the layer dir `layer_dir` ("user"; none for root's,
        as every layer dir made before there were two forms is)."""
        return layer_dir + Workdir.FORM_SUFFIX

    def overlay_temp_path(self, digest: str) -> str:
        """A new name for the temporary directory the layer is extracted in."""
        return os.path.join(self.overlays, f"{self.TEMP_PREFIX}{Digest(digest).hex}-{secrets.token_hex(4)}")

    def overlay_temps(self, digest: str | None = None) -> list[tuple[str, str]]:
        """[(lock path of its layer, path)] of the temporary extraction directories in
        the overlay dir (of the layer `digest`, else of every layer); [] when there is
        no overlay dir. Only the names overlay_temp_path gives: other ".tmp-" names
        (atomic_write's) are not a layer's."""
        try:
            names = os.listdir(self.overlays)
        except FileNotFoundError:
            return []
        only = None if digest is None else Digest(digest).hex
        found = []
        for name in names:
            if not name.startswith(self.TEMP_PREFIX):
                continue
            hexname, dash, _ = name[len(self.TEMP_PREFIX):].partition("-")
            if not dash or not _is_hex(hexname) or (only is not None and hexname != only):
                continue
            found.append((self._overlay_lock(hexname), os.path.join(self.overlays, name)))
        return found

    def mount_lock_path(self) -> str:
        """The lock mounts hold shared while they choose and mount lowerdirs, and tosi-gc
        exclusively while it removes from the overlay dir."""
        return os.path.join(self.overlays, self.MOUNT_LOCK)

    def empty_lower_path(self) -> str:
        """The empty lowerdir (named EMPTY_LOWER in the overlay dir)."""
        return os.path.join(self.overlays, self.EMPTY_LOWER)

    def attributes_lower_name(self, key: str) -> str:
        """The name, in the overlay dir, of the attributes lowerdir of the layer list `key`."""
        return self.ATTRIBUTES_PREFIX + key

    def attributes_lower_path(self, key: str) -> str:
        return os.path.join(self.overlays, self.attributes_lower_name(key))

    def attributes_lower_temp_path(self, key: str) -> str:
        """A new name to make that lowerdir in before its rename (not a TEMP_PREFIX
        name: unpack removes those as a dead extraction's)."""
        return f"{self.attributes_lower_path(key)}.{secrets.token_hex(4)}"


def read_form(layer_dir: str) -> str:
    """The form of the extracted layer dir `layer_dir`, from its record (Workdir.form_of):
    USER_FORM, or TRUSTED_FORM when there is none. A record that is not ours, or says
    anything else, is refused (UnsafePath, CacheError)."""
    path = Workdir.form_of(layer_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return TRUSTED_FORM
    except OSError as exc:
        raise CacheError(f"layer form record {path}: {exc.strerror}; remove it and the layer dir") from None
    with open(fd, "rb") as f:
        require_cached(path, os.fstat(fd), "layer form record")
        text = f.read(64).strip()
    if text == USER_FORM.encode():
        return USER_FORM
    raise CacheError(f"layer form record {path} says {text[:20]!r}, not {USER_FORM!r}; "
                     "remove it and the layer dir")


def _is_hex(text: str) -> bool:
    return len(text) in (64, 128) and all(c in "0123456789abcdef" for c in text)
