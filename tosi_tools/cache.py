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

Whatever is published under a final name (a blob, a config, a manifest, an
extracted layer) has its data on disk before the rename that publishes it, and
the rename itself is made durable by an fsync of the directory after it: after
a power loss the cache may lack a file, never hold a truncated one under a name
it trusts.
"""

import contextlib
import fcntl
import os
import secrets

from .digest import Digest

DEFAULT_WORKDIR = "/tmp/tosi"


def atomic_write(path, data, mode=0o644):
    """Write bytes to `path` so that readers see the old file or the whole new one,
    also after a power loss (fsync of the file before the rename, of its directory after)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
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


_syncfs = None


def sync_filesystem(path):
    """Flush every dirty file of the filesystem holding `path` (syncfs(2)): one call for
    the thousands of files of an extracted layer, instead of one fsync each. Falls back
    to fsyncing `path` alone where libc has no syncfs."""
    global _syncfs
    if _syncfs is None:
        import ctypes  # not on the warm path: only an extraction syncs

        libc = ctypes.CDLL(None, use_errno=True)
        _syncfs = getattr(libc, "syncfs", False)
        if _syncfs:
            _syncfs.argtypes = [ctypes.c_int]
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not _syncfs:
            os.fsync(fd)
        elif _syncfs(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


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


class Workdir:
    """Paths inside one workdir; creating directories is explicit (`ensure`)."""

    def __init__(self, root=DEFAULT_WORKDIR, overlaydir=None):
        self.root = os.path.abspath(root)
        self.layers = os.path.join(self.root, "layers")
        self.configs = os.path.join(self.root, "configs")
        self.manifests = os.path.join(self.root, "manifests")
        self.quarantine = os.path.join(self.root, "quarantine")
        self.overlays = os.path.abspath(overlaydir) if overlaydir else os.path.join(self.root, "overlays")

    def quarantine_blob(self, path):
        """Move a corrupt cached blob aside (so the next fetch downloads it again);
        returns where it went. A blob another process moved first is fine."""
        os.makedirs(self.quarantine, exist_ok=True)
        target = os.path.join(self.quarantine, os.path.basename(path))
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)
        return target

    def ensure(self):
        for d in (self.layers, self.configs, self.manifests, self.overlays):
            os.makedirs(d, exist_ok=True)
        return self

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
