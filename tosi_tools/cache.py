"""The workdir: a content-addressed cache laid out like the original tosi's.

    <workdir>/layers/<hex>            layer blobs exactly as the registry served them
    <workdir>/layers/<hex>.partial    a download in progress (resumed by the next run)
    <workdir>/layers/<hex>.lock       per-blob lock shared by concurrent processes
    <workdir>/configs/<algo>:<hex>    raw image config blobs
    <workdir>/configs/v2:<algo>:<hex> the config's "config" object (what -saveconfig writes)
    <workdir>/manifests/<registry>/<repository>/<algo>:<hex>  raw manifest and index bytes
    <workdir>/manifests/<registry>/<repository>/tags/<tag>    digest the tag last resolved to
    <workdir>/manifests/<registry>/.scheme    http or https: what a loopback/--insecure registry spoke
    <workdir>/manifests/<registry>/.challenged  the registry asks for credentials even to HEAD
    <workdir>/overlays/<hex>/         a layer extracted as an overlayfs lowerdir
    <workdir>/overlays/<hex>.link     short name of that layer; overlays/<short> -> <hex>
    <workdir>/overlays/<hex>.diffid   digest of that layer's uncompressed tar, as extracted
    <workdir>/quarantine/             corrupt blobs moved aside (tosi-verify, unpack)
    <workdir>/.tosi-workdir           marker: this directory is a tosi workdir

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

Whatever is published under a final name (a blob, a config, a manifest, an
extracted layer) has its data on disk before the rename that publishes it, and
the rename itself is made durable by an fsync of the directory after it: after
a power loss the cache may lack a file, never hold a truncated one under a name
it trusts. So that this costs a cold pull little (bench/sync-cost), the disk
is put to work while the data is still being written (start_writeback for a
blob as it arrives, writing_ahead for a layer being extracted), and layers
that finish together share one syncfs (sync_filesystem).
"""

import contextlib
import fcntl
import os
import secrets
import stat
import threading

from .digest import Digest
from .errors import CacheError, PlanError, UnsafePath
from .ownership import check_own_dir_stat, make_own_dir, require_safe_ancestors

DEFAULT_WORKDIR = "/tmp/tosi"
MARKER = ".tosi-workdir"
_MARKER_TEXT = b"This directory is a tosi workdir (a cache of image blobs and layers); see tosi(1).\n"


def atomic_write(path, data, mode=0o644):
    """Write bytes to `path` so that readers see the old file or the whole new one,
    also after a power loss (fsync of the file before the rename, of its directory after)."""
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
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_path(path):
    """Flush a file's data and metadata to disk (before renaming it into place)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path):
    """Make the renames and creations in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc = None


def _libc_function(name, *argtypes):
    """A libc function through ctypes (None where libc lacks it); the GIL is let go during calls."""
    global _libc
    if _libc is None:
        import ctypes  # not on the warm path: only what writes to the cache syncs

        _libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(_libc, name, None)
    if function is not None:
        function.argtypes = list(argtypes)
    return function


def _raise_errno(path):
    import ctypes

    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), path)


_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range = None


def start_writeback(fd, offset=0, length=0):
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


class _FilesystemSyncs:
    """syncfs(2) calls shared between threads: a thread that asks while a syncfs of the
    same filesystem is running waits for it to end, then for the next one, which it
    shares with every thread that asked meanwhile. A syncfs flushes what was written
    before it started, so each caller gets one that started after it asked; layers
    that finish together pay for one flush, not one each."""

    def __init__(self):
        self._cond = threading.Condition()
        self._running = set()  # st_dev of the filesystems being synced
        self._started = {}     # st_dev -> how many syncfs calls were started
        self._done = {}        # st_dev -> the number of the last one that succeeded

    def sync(self, path):
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


_syncfs = None


def _syncfs_fd(fd, path):
    global _syncfs
    if _syncfs is None:
        import ctypes

        _syncfs = _libc_function("syncfs", ctypes.c_int) or False
    if not _syncfs:
        os.fsync(fd)
    elif _syncfs(fd) != 0:
        _raise_errno(path)


_filesystem_syncs = _FilesystemSyncs()


def sync_filesystem(path):
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

    def __init__(self, fd, path):
        self.fd, self.path, self.holders = fd, path, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=WRITE_AHEAD_THREAD, daemon=True)

    def _run(self):
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


def _name_thread(name):
    """Give the calling thread a name the kernel shows (prctl PR_SET_NAME, 15 bytes)."""
    import ctypes

    prctl = _libc_function("prctl", ctypes.c_int, ctypes.c_char_p)
    if prctl is not None:
        prctl(15, name[:15])


_write_aheads = {}  # st_dev -> _WriteAhead
_write_aheads_lock = threading.Lock()


@contextlib.contextmanager
def writing_ahead(path):
    """While held, a thread flushes the filesystem holding directory `path` every
    WRITE_AHEAD_INTERVAL (syncfs), so that what is being written there (the thousands of
    files of a layer being extracted) goes to disk while more is written, and the syncfs
    before it is published waits for the last fraction of a second's writes only. The
    kernel writes a batch of files at a time in one go, much cheaper than a start per
    file. Callers in other threads share one thread per filesystem."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
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
def file_lock(path):
    """Hold an exclusive fcntl lock on `path` (created if missing), waiting for it.

    The kernel drops the lock when its holder dies, so a SIGKILLed process never
    leaves a lock that blocks the next run.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _safe_component(text):
    # Registry hosts and repository paths come from the reference grammar, which
    # forbids "..", but the cache must not trust that far: keep every part a plain name.
    parts = [p for p in text.split("/") if p not in ("", ".", "..")]
    return os.path.join(*parts) if parts else "_"


def require_cached(path, st, what):
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


def workdir_for(workdir=None, image=None, overlaydir=None, default=DEFAULT_WORKDIR, flag_prefix="--"):
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

    def __init__(self, root=DEFAULT_WORKDIR, overlaydir=None, named_by_plan=False, flag_prefix="--"):
        self.root = os.path.abspath(root)
        self.layers = os.path.join(self.root, "layers")
        self.configs = os.path.join(self.root, "configs")
        self.manifests = os.path.join(self.root, "manifests")
        self.quarantine = os.path.join(self.root, "quarantine")
        self.overlays = os.path.abspath(overlaydir) if overlaydir else os.path.join(self.root, "overlays")
        self.named_by_plan = named_by_plan
        self.flag_prefix = flag_prefix
        self._gate = None  # "checked" or "ensured", once passed: the checks cost a few lstat calls

    @property
    def marker(self):
        return os.path.join(self.root, MARKER)

    def _separate_overlays(self):
        return os.path.dirname(self.overlays) != self.root

    def _subdirs(self):
        subdirs = [self.layers, self.configs, self.manifests, self.quarantine]
        return subdirs if self._separate_overlays() else subdirs + [self.overlays]

    def quarantine_blob(self, path):
        """Move a corrupt cached blob aside (so the next fetch downloads it again);
        returns where it went. A blob another process moved first is fine."""
        make_own_dir(self.quarantine, 0o700, "quarantine directory")
        target = os.path.join(self.quarantine, os.path.basename(path))
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        return target

    def ensure(self):
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

    def check_if_named_by_plan(self):
        """For a workdir a plan named: refuse it now unless it is a tosi workdir of ours (a
        stage about to compare the plan's paths with it says so first). Returns self."""
        if self.named_by_plan:
            self._check_named_root()
        return self

    def check(self):
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

    def _what(self, path):
        return "overlay directory" if path == self.overlays else "workdir directory"

    def _fix(self, flag, ours=False):
        choose = f"choose another {'workdir' if flag == 'workdir' else 'overlay directory'} " \
                 f"({self.flag_prefix}{flag} DIR)"
        if ours:
            return f"make it private (chmod go-w), or {choose}"
        return f"another user may have made it: remove it, or {choose}"

    def _check_dir(self, path, st, what, flag):
        ours = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
        check_own_dir_stat(path, st, what, self._fix(flag, ours))

    def _make_dir(self, path, what, flag):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            # Made 0700; a name someone made meanwhile is checked by make_own_dir.
            make_own_dir(path, 0o700, what, self._fix(flag))
        else:
            self._check_dir(path, st, what, flag)

    def _check_if_there(self, path, what, flag):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        self._check_dir(path, st, what, flag)

    def _safe_ancestors(self, path, what):
        try:
            require_safe_ancestors(path, what)
        except UnsafePath as exc:
            flag = "workdir" if what == "workdir" else "overlaydir"
            raise UnsafePath(f"{exc} ({self.flag_prefix}{flag} DIR)", path=exc.path) from None

    def _make_parents(self, path, what):
        # Like mkdir -p for the directories above; a directory someone else made
        # there meanwhile is caught by the second look at the ancestors.
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o755, exist_ok=True)
            self._safe_ancestors(path, what)

    def _check_named_root(self):
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

    def _write_marker(self):
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
    def layer_path(self, digest):
        return os.path.join(self.layers, Digest(digest).hex)

    def partial_path(self, digest):
        return self.layer_path(digest) + ".partial"

    def lock_path(self, digest):
        return self.layer_path(digest) + ".lock"

    def config_path(self, digest):
        return os.path.join(self.configs, str(Digest(digest)))

    def saved_config_path(self, digest):
        return os.path.join(self.configs, "v2:" + str(Digest(digest)))

    # manifests
    def manifest_dir(self, registry, repository):
        return os.path.join(self.manifests, _safe_component(registry), _safe_component(repository))

    def manifest_path(self, registry, repository, digest):
        return os.path.join(self.manifest_dir(registry, repository), str(Digest(digest)))

    def tag_path(self, registry, repository, tag):
        return os.path.join(self.manifest_dir(registry, repository), "tags", _safe_component(tag))

    def scheme_path(self, registry):
        # A leading dot: no repository path component can be named so.
        return os.path.join(self.manifests, _safe_component(registry), ".scheme")

    def challenged_path(self, registry):
        return os.path.join(self.manifests, _safe_component(registry), ".challenged")

    # overlays
    def overlay_path(self, digest):
        return os.path.join(self.overlays, Digest(digest).hex)

    def overlay_link_file(self, digest):
        return self.overlay_path(digest) + ".link"
