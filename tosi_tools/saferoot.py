"""Safe paths inside a target root: the one way tosi touches a filesystem it extracts into.

A layer is untrusted input. Every name it carries is resolved here, one
component at a time, from open directory handles (openat with O_NOFOLLOW):
a symlink met on the way is read and resolved as if the root were "/", the
way a process chrooted into the root would see it, so `evil -> /` followed by
`evil/etc/passwd` reaches the root's own etc/passwd and never the host's.
The last component of a name is never followed: every operation below acts on
the entry itself (chown, chmod, utime and xattrs never go through a symlink).

Resolved directories are kept open in a small LRU keyed by their canonical
(symlink-free) path, so the thousands of entries of one directory cost one
lookup, not one walk from the root each. Whoever removes or replaces an entry
goes through `remove()`, which drops the cached handles at and below it.
"""

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from .errors import UnsafeEntry, quoted

MAX_SYMLINKS = 40
DIR_CACHE_SIZE = 128
# How a directory is opened here: never through a symlink (ELOOP), never a non-directory (ENOTDIR).
DIR_FLAGS = _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_A_DIR = (errno.ELOOP, errno.ENOTDIR)
# Canonical (symlink-free) path components of a directory below the root.
Parts = tuple[str, ...]


def clean_name(name: str) -> Parts:
    """The components of an entry name, relative to the root.

    Leading slashes are dropped (absolute names are relative to the root, as
    docker and containerd treat them); "." and empty components vanish; ".."
    removes the component before it and raises UnsafeEntry when it would climb
    above the root.
    """
    given = name.split("/")
    if "" not in given and "." not in given and ".." not in given:
        return tuple(given)
    parts: list[str] = []
    for part in given:
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeEntry(f"{quoted(name)} climbs out of the root with '..'")
            parts.pop()
            continue
        parts.append(part)
    return tuple(parts)


def _link_parts(target: str) -> list[str]:
    # Inside a symlink target ".." is kept: the walk clamps it at the root, like chroot.
    return [p for p in target.split("/") if p not in ("", ".")]


def proc_path(dir_fd: int, name: str) -> str:
    """A path that reaches `name` inside the already resolved directory `dir_fd`.

    For the calls that take no dir_fd (the xattr family): /proc resolves the
    directory through its handle, and the caller asks not to follow `name`.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


class SafeRoot:
    """An open target root; resolves entry names inside it and acts on entries safely."""

    def __init__(self, path: str, cache_size: int = DIR_CACHE_SIZE) -> None:
        self.path = os.path.abspath(path)
        self.fd = os.open(self.path, _DIR_FLAGS)
        self._cache: OrderedDict[Parts, int] = OrderedDict()
        self._cache_size = cache_size

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "SafeRoot":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ resolution

    def _remember(self, key: Parts, fd: int) -> None:
        self._cache[key] = fd
        if len(self._cache) > self._cache_size:
            _, old = self._cache.popitem(last=False)
            os.close(old)

    def _cached(self, key: Parts) -> int | None:
        fd = self._cache.get(key)
        if fd is not None:
            self._cache.move_to_end(key)
        return fd

    def directory(self, parts: Sequence[str], create: bool = False) -> tuple[int, Parts]:
        """(fd, canonical parts) of the directory `parts` names, symlinks resolved in the root.

        The fd belongs to the cache: use it at once, do not close it. Missing
        directories are made (mode 0755, fixed up by the caller) when `create`;
        otherwise FileNotFoundError. A non-directory on the way raises
        NotADirectoryError.
        """
        parts = tuple(parts)
        known = self.fd if not parts else self._cached(parts)
        if known is not None:
            return known, parts
        # Start from the longest prefix already open.
        start, fd = 0, self.fd
        for i in range(len(parts) - 1, 0, -1):
            cached = self._cached(parts[:i])
            if cached is not None:
                start, fd = i, cached
                break
        resolved = list(parts[:start])
        pending = list(reversed(parts[start:]))
        links = 0
        while pending:
            name = pending.pop()
            if name == "..":
                if resolved:
                    resolved.pop()
                fd, _ = self.directory(resolved)
                continue
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass  # a dangling symlink: resolved on the next round
                pending.append(name)
                continue
            except OSError as exc:
                if exc.errno not in _NOT_A_DIR:
                    raise
                try:
                    target = os.readlink(name, dir_fd=fd)
                except OSError:
                    raise NotADirectoryError(
                        errno.ENOTDIR, "not a directory", "/".join(resolved + [name])
                    ) from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnsafeEntry(
                        f"{quoted('/'.join(parts))}: too many levels of symbolic links"
                    ) from None
                if target.startswith("/"):
                    resolved, fd = [], self.fd
                pending.extend(reversed(_link_parts(target)))
                continue
            resolved.append(name)
            key = tuple(resolved)
            old = self._cache.pop(key, None)
            if old is not None:
                os.close(old)
            self._remember(key, child)
            fd = child
        return fd, tuple(resolved)

    def parent(self, parts: Sequence[str], create: bool = True) -> tuple[int, str, Parts]:
        """(parent fd, last component, canonical parent parts) for an entry; parts must not be empty."""
        fd, canonical = self.directory(parts[:-1], create=create)
        return fd, parts[-1], canonical

    def forget(self, canonical: Sequence[str]) -> None:
        """Drop cached handles at or below a canonical path that was removed or replaced."""
        prefix = tuple(canonical)
        n = len(prefix)
        stale = [key for key in self._cache if key[:n] == prefix]
        for key in stale:
            os.close(self._cache.pop(key))

    # ------------------------------------------------------------ entries

    def remove(self, dir_fd: int, name: str, canonical_parent: Sequence[str]) -> None:
        """Remove an entry of any type (a directory with all it holds); missing is fine."""
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget(tuple(canonical_parent) + (name,))
            remove_tree_at(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def open_entry_dir(self, parts: Sequence[str]) -> tuple[int, Parts] | tuple[None, None]:
        """(fd, canonical parts) of the directory `parts` itself, never through a symlink.

        The caller closes the fd. (None, None) when the entry is missing or not a directory.
        """
        try:
            if not parts:
                return os.dup(self.fd), ()
            dir_fd, name, canonical = self.parent(parts, create=False)
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd), canonical + (name,)
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except OSError as exc:
            if exc.errno in _NOT_A_DIR:
                return None, None
            raise

    def open_canonical_dir(self, canonical: Sequence[str]) -> int | None:
        """A new fd of the directory at a canonical path, or None unless every component,
        the last included, is still a real directory (a symlink is never followed).

        For work deferred to the end of a layer: what was a directory when the
        work was queued may have been replaced since, by a symlink to another
        directory among others, and the work must not land there. Cached handles
        are trusted (remove() drops those at and below what it removes).
        """
        canonical = tuple(canonical)
        start, fd = 0, self.fd
        for i in range(len(canonical), 0, -1):
            cached = self._cached(tuple(canonical[:i]))
            if cached is not None:
                start, fd = i, cached
                break
        return open_dirs_at(fd, canonical[start:])[0]


def open_dirs_at(top_fd: int, parts: Sequence[str]) -> tuple[int | None, int]:
    """(a new fd, len(parts)) of the directory `parts` below `top_fd` when every component
    is a real directory (a symlink is never followed); else (None, the index of the
    first component that is missing or not one)."""
    fd = os.dup(top_fd)
    try:
        for i, name in enumerate(parts):
            child = open_dir_at(fd, name)
            if child is None:
                return None, i
            os.close(fd)
            fd = child
        fd, found = -1, fd
        return found, len(parts)
    finally:
        if fd >= 0:
            os.close(fd)


def open_dir_at(dir_fd: int, name: str) -> int | None:
    """A new fd of `name` in `dir_fd` if it is a real directory (never through a symlink), else None."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in _NOT_A_DIR:
            return None
        raise


def open_dir_at_node(dir_fd: int, node: "Node") -> int | None:
    """open_dir_at for walk_tree: a Node's directory in its parent's, if a real directory."""
    assert node.name is not None  # only the root has none, and a walk never enters it
    return open_dir_at(dir_fd, node.name)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """os.lstat of `name` in `dir_fd`, or None when it does not exist."""
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def chown_at(dir_fd: int, name: str, uid: int, gid: int) -> None:
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def chmod_at(dir_fd: int, name: str, mode: int) -> None:
    """chmod of a non-symlink entry; symlinks have no mode of their own on Linux."""
    try:
        os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
    except ValueError:  # Python's way of passing on the kernel's EOPNOTSUPP for a symlink
        raise OSError(errno.EOPNOTSUPP, "a symlink has no mode to change", name) from None


def utime_at(dir_fd: int, name: str, mtime_ns: int) -> None:
    os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def setxattr_at(dir_fd: int, name: str, key: str, value: bytes) -> None:
    os.setxattr(proc_path(dir_fd, name), key, value, follow_symlinks=False)


# ---------------------------------------------------------------- removing trees

_KEEP_OPEN = 64  # directory handles held while descending; deeper ones are reopened via ".."


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Remove `name` in `dir_fd` and everything under it, never following a symlink.

    Iterative, unlike shutil.rmtree before Python 3.12, so a layer nesting
    directories thousands deep cannot make it overflow the stack; and it holds
    at most _KEEP_OPEN directory handles whatever the depth. Missing is fine.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    except PermissionError:
        # Some filesystems say EPERM for a directory; for anything else it is the answer.
        st = lstat_at(dir_fd, name)
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise
    try:
        top = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    # [fd or None, name in the parent, (st_dev, st_ino)] from the top down
    stack: list[list[Any]] = [[top, name, _identity(top)]]
    try:
        while stack:
            here = stack[-1][0]
            child = _first_subdir_emptying(here)
            if child is not None:
                sub = os.open(child, _DIR_FLAGS, dir_fd=here)
                stack.append([sub, child, _identity(sub)])
                if len(stack) > _KEEP_OPEN:
                    far = stack[-_KEEP_OPEN - 1]
                    if far[0] is not None:
                        os.close(far[0])
                        far[0] = None
                continue
            done = stack.pop()
            if stack and stack[-1][0] is None:
                parent = os.open("..", _DIR_FLAGS, dir_fd=done[0])
                if _identity(parent) != stack[-1][2]:
                    os.close(parent)
                    raise OSError(errno.EBUSY, "directory moved while being removed", done[1])
                stack[-1][0] = parent
            os.close(done[0])
            os.rmdir(done[1], dir_fd=stack[-1][0] if stack else dir_fd)
    finally:
        for entry in stack:
            if entry[0] is not None:
                os.close(entry[0])


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _first_subdir_emptying(dir_fd: int) -> str | None:
    """Unlink the non-directories in dir_fd; the name of one subdirectory, or None if none is left."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
    return None


def remove_tree(path: str) -> None:
    """remove_tree_at for a path: its last component is never followed (a symlink goes, not its target)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path.rstrip("/") or "/")
    if not name:
        raise OSError(errno.EBUSY, "refusing to remove /", path)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree_at(parent_fd, name)
    finally:
        os.close(parent_fd)


# ---------------------------------------------------------------- walking trees


class Node:
    """A directory in a tree of names to walk: its name in its parent, its children, the caller's data."""

    __slots__ = ("name", "children", "data")

    def __init__(self, name: str | None, data: Any = None) -> None:
        self.name = name
        self.children: list[Node] = []
        self.data = data


_Path = TypeVar("_Path", bound=Hashable)


def tree_of(paths: Iterable[_Path], root_key: _Path,
            split: Callable[[_Path], tuple[_Path, str]]) -> tuple[Node, dict[_Path, Node]]:
    """(root Node, {path: Node}) for `paths` and every ancestor of theirs.

    `split(path)` gives (parent path, name); `root_key` is the root's path (the
    empty tuple or string). Each path costs a lookup of its parent, not a walk
    from the root, so a chain of n nested paths makes its tree in O(n) steps.
    """
    root = Node(None)
    nodes = {root_key: root}
    for path in paths:
        if path in nodes:
            continue
        missing = []
        while path not in nodes:
            missing.append(path)
            path = split(path)[0]
        node = nodes[path]
        for below in reversed(missing):
            child = Node(split(below)[1])
            node.children.append(child)
            nodes[below] = child
            node = child
    return root, nodes


def walk_tree(top_fd: int, root: Node, enter: Callable[[int, Node], int | None],
              leave: Callable[[int, Node], object] | None = None, keep_open: int = _KEEP_OPEN) -> None:
    """Walk the directories of a tree of Nodes below `top_fd` (the root Node's directory),
    top-down, each through its parent's handle: a whole walk costs one open per directory,
    whatever the depth, and never resolves a path from the root again.

    enter(parent fd, node) opens a child's directory and returns its fd (the walk
    closes it) or None to skip it and everything below it. leave(fd, node) runs
    once a node's subtree is done, so deepest first, the root last (with a copy of
    top_fd). At most `keep_open` handles are held whatever the depth: deeper ones
    close, and the walk climbs back through "..", refusing (EBUSY) a directory that
    is not the one it left.
    """
    # [fd or None, node, children iterator, (st_dev, st_ino) once closed]
    stack: list[list[Any]] = [[os.dup(top_fd), root, iter(root.children), None]]
    try:
        while stack:
            here = stack[-1]
            child = next(here[2], None)
            if child is not None:
                fd = enter(here[0], child)
                if fd is None:
                    continue
                stack.append([fd, child, iter(child.children), None])
                if len(stack) > keep_open:
                    far = stack[-keep_open - 1]
                    if far[0] is not None:
                        far[3] = _identity(far[0])
                        os.close(far[0])
                        far[0] = None
                continue
            if len(stack) > 1 and stack[-2][0] is None:
                parent = os.open("..", _DIR_FLAGS, dir_fd=here[0])
                if _identity(parent) != stack[-2][3]:
                    os.close(parent)
                    raise OSError(errno.EBUSY, "directory moved while being walked", here[1].name)
                stack[-2][0] = parent
            stack.pop()
            try:
                if leave is not None:
                    leave(here[0], here[1])
            finally:
                os.close(here[0])
    finally:
        for entry in stack:
            if entry[0] is not None:
                os.close(entry[0])
