"""Paths outside a target root that tosi creates or trusts: they must be this user's own.

tosi runs as root with its workdir and targets in world-writable places like
/tmp, where another local user can create a name first (a directory full of
planted files, or a symlink to a root-only directory). Everything here checks
a path the way ssh's StrictModes does, without following a symlink at the
last component:

- `require_own_dir(path)`: a real directory (not a symlink), owned by the
  effective uid, not writable by group or others.
- `require_safe_ancestors(path)`: every directory above `path` is owned by
  root or the effective uid, and writable by group or others only when sticky
  (as /tmp is: there nobody else can rename or remove our entries).
- `make_own_dir(path, mode)`: mkdir that refuses an existing name that is not
  already such a directory; returns True when it made it.
- `reachable_by_others(path)`: whether another uid could traverse to `path`.

Raises UnsafePath (exit 2) naming the path and what to do.
"""

import errno
import os
import stat

from .errors import UnsafePath


def _describe(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    return None


def check_own_dir_stat(path: str, st: os.stat_result, what: str = "directory",
                       fix: str | None = None) -> None:
    """Raise UnsafePath unless `st` (an lstat of `path`) is a directory we own that
    only we can write."""
    euid = os.geteuid()
    problem = _describe(st)
    if problem is None and st.st_uid != euid:
        problem = f"owned by uid {st.st_uid}, not by uid {euid}"
    if problem is None and st.st_mode & 0o022:
        problem = f"writable by others than you (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem is not None:
        hint = fix or f"another user may have made it: remove it, or choose another {what}"
        raise UnsafePath(f"{what} {path} is {problem}; {hint}", path=path)


def require_own_dir(path: str, what: str = "directory", fix: str | None = None) -> os.stat_result:
    """lstat `path` and check it as `check_own_dir_stat` does; returns the stat."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafePath(f"{what} {path}: {exc.strerror}", path=path) from None
    check_own_dir_stat(path, st, what, fix)
    return st


def require_safe_ancestors(path: str, what: str = "directory", complete: bool = False) -> None:
    """Every existing directory above `path` must be owned by root or us, and not
    writable by others unless sticky; a symlink on the way must be root's or ours.
    `complete`: every one must exist (once something was made below them: a missing
    one, or one another user made since the first look, is refused)."""
    path = os.path.abspath(path)
    euid = os.geteuid()
    parts = path.split("/")[1:-1]
    current = "/"
    for part in [""] + parts:
        current = os.path.join(current, part) if part else current
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if complete:
                raise UnsafePath(f"{what} {path}: {current} went away while tosi worked below it",
                                 path=path) from None
            return
        except OSError as exc:
            raise UnsafePath(f"{what} {path}: {current}: {exc.strerror}", path=path) from None
        if st.st_uid not in (0, euid):
            raise UnsafePath(
                f"{what} {path} lies below {current}, owned by uid {st.st_uid}: that user could "
                f"swap what tosi uses there; choose a {what} below a directory of yours or root's",
                path=path)
        if stat.S_ISLNK(st.st_mode):
            continue  # owned by root or us: its target is checked as the walk goes on
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePath(
                f"{what} {path} lies below {current}, which others can write "
                f"(mode {stat.S_IMODE(st.st_mode):04o}, not sticky); choose another {what}",
                path=path)


def make_own_dir(path: str, mode: int = 0o700, what: str = "directory", fix: str | None = None) -> bool:
    """Create `path` (its parent must exist) with `mode`, or accept it if it already is
    a directory of ours that only we can write. Returns True when it was created."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        require_own_dir(path, what, fix)
        return False
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise UnsafePath(f"{what} {path}: its parent does not exist", path=path) from None
        raise
    # mkdir's mode is masked by the umask; make it exactly what was asked, on what we made.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        check_own_dir_stat(path, os.fstat(fd), what, fix)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def reachable_by_others(path: str) -> bool:
    """True when a user other than the owner could reach `path`: every directory above
    it (and `path` itself, when it exists) grants search to others or to a group."""
    path = os.path.abspath(path)
    current = "/"
    for part in [""] + path.split("/")[1:]:
        current = os.path.join(current, part) if part else current
        try:
            st = os.stat(current)
        except OSError:
            return True  # what is not there yet will be made by someone: assume reachable
        if not st.st_mode & 0o011:
            return False
    return True
