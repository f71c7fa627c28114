"""overlayfs mounts through the kernel's own interfaces, without mount(8).

Two ways in:

* mount(2) with one option string, as the original tosi did through mount(8).
  The kernel copies that string into a single page, so it must stay shorter
  than the page size. Lowerdirs are given relative to the overlay dir (the
  process changes into it for the call) to keep the string short.
* the new mount API (fsopen/fsconfig/fsmount/move_mount, Linux 5.2+), where
  each lowerdir is its own fsconfig("lowerdir+") call (overlayfs in Linux 6.8+),
  so the number of layers is limited only by overlayfs itself (500).

Both resolve relative lowerdirs against the current directory, which is
process-wide: callers must not run other path-relative work in other threads
while a mount is in progress. The directory is always restored.
"""

import contextlib
import ctypes
import errno
import os
import platform
import re
import stat
from collections.abc import Iterable, Sequence

from .cache import TRUSTED_FORM, USER_FORM
from .errors import MountError

OVERLAY = "overlay"
# How a layer directory says what overlayfs makes of it: a 0/0 character device
# hides a lower entry, this xattr hides a lower directory's contents; names under
# these prefixes are overlayfs' own, never a layer's.
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")
# The two forms of a layer directory. TRUSTED_FORM (root's): the opaque mark is
# trusted.overlay.opaque, which only CAP_SYS_ADMIN in the initial user namespace
# can set, and a mount without "userxattr" reads. USER_FORM (anyone else's): it is
# user.overlay.opaque, which the owner of a directory can set, and a mount with
# "userxattr" reads (Linux 5.11+, the option an overlay mounted in a user namespace
# needs). Whiteouts are 0/0 character devices in both: Linux 5.8+ lets any user
# make that one device. A mount reads one form only, so a layer dir is never used
# in the other (its form is recorded beside it: cache.Workdir.form_path).
FORMS = (TRUSTED_FORM, USER_FORM)
USER_OPAQUE_XATTR = "user.overlay.opaque"
USERXATTR = "userxattr"
MAX_LAYERS = 500  # OVL_MAX_STACK in the kernel

MS_RDONLY = 1
MNT_DETACH = 2
# The generic per-mount (VFS) flags a caller may ask for by name, as mount(8) spells
# them: (mount(2) MS_* flag, fsmount(2) MOUNT_ATTR_* flag). relatime is fsmount's
# default atime mode (MOUNT_ATTR_RELATIME is 0).
VFS_FLAGS = {
    "nosuid": (2, 0x02),
    "nodev": (4, 0x04),
    "noexec": (8, 0x08),
    "noatime": (1024, 0x10),
    "nodiratime": (2048, 0x80),
    "relatime": (1 << 21, 0x00),
    "strictatime": (1 << 24, 0x20),
}
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 1
MOVE_MOUNT_F_EMPTY_PATH = 4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
AT_FDCWD = -100

# The mount-API syscalls came after the kernel unified syscall numbers, so they
# are the same on every architecture listed here.
_UNIFIED_ARCHES = {"x86_64", "aarch64", "arm64", "armv7l", "armv8l", "riscv64",
                   "ppc64le", "ppc64", "s390x", "i686", "i386", "loongarch64"}
_SYSCALL = {"move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432}

_libc = None



def is_whiteout(st: os.stat_result) -> bool:
    """Whether an lstat result is an overlayfs whiteout (a 0/0 character device)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque_xattr(form: str) -> str:
    """The xattr that marks an opaque directory in a layer dir of `form`."""
    if form == TRUSTED_FORM:
        return OPAQUE_XATTR
    if form == USER_FORM:
        return USER_OPAQUE_XATTR
    raise ValueError(f"unknown layer form {form!r}")


def is_opaque(fd: int, name: str | None = None) -> bool:
    """Whether the directory `fd` (or its entry `name`, not followed) is marked opaque,
    in either form: a layer dir holds one form only (the layer's own overlay xattrs
    are dropped when it is extracted)."""
    for key in (OPAQUE_XATTR, USER_OPAQUE_XATTR):
        try:
            if name is None:
                value = os.getxattr(fd, key)
            else:
                value = os.getxattr(f"/proc/self/fd/{fd}/{name}", key, follow_symlinks=False)
        except OSError:
            continue
        if value == b"y":
            return True
    return False


def in_initial_user_namespace(uid_map: str = "/proc/self/uid_map") -> bool:
    """Whether this process runs in the initial user namespace (the whole uid range
    mapped onto itself), where CAP_SYS_ADMIN is the one trusted.* xattrs need."""
    try:
        with open(uid_map) as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True  # no /proc: nothing says otherwise


def local_form() -> str:
    """The form of the layer dirs this process makes: TRUSTED_FORM with CAP_SYS_ADMIN in
    the initial user namespace (root), else USER_FORM."""
    if has_mount_privilege() and in_initial_user_namespace():
        return TRUSTED_FORM
    return USER_FORM

def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def escape(path: str) -> str:
    """A path as one item of overlayfs' option string (',' ':' '\\' are special there)."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def option_string(lowerdirs: Iterable[str], upperdir: str | None = None, workdir: str | None = None,
                  userxattr: bool = False) -> str:
    """The mount(2) data string: lowerdirs topmost first, then upper and work dirs
    (and "userxattr": layer dirs in the user form)."""
    options = "lowerdir=" + ":".join(escape(d) for d in lowerdirs)
    if upperdir is not None:
        assert workdir is not None, "an upperdir needs a workdir"
        options += f",upperdir={escape(upperdir)},workdir={escape(workdir)}"
    if userxattr:
        options += "," + USERXATTR
    return options


def fits_in_page(options: str) -> bool:
    # The kernel copies the data into one page, and the string needs its NUL.
    return len(os.fsencode(options)) < page_size()


@contextlib.contextmanager
def _inside(directory):
    if directory is None:
        yield
        return
    saved = os.open(".", os.O_PATH | os.O_DIRECTORY)
    try:
        os.chdir(directory)
        yield
    finally:
        try:
            os.fchdir(saved)
        finally:
            os.close(saved)


def _oserror(what, target):
    code = ctypes.get_errno()
    return code, f"{what} {target}: {os.strerror(code)}"


CAP_SYS_ADMIN = 21


def has_mount_privilege(status: str = "/proc/self/status") -> bool:
    """True if this process holds CAP_SYS_ADMIN (root, or root of a user namespace)."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _permission_hint(code):
    if code == errno.EPERM:
        return " (mounting overlayfs needs root, or CAP_SYS_ADMIN in the mount namespace)"
    return ""


def vfs_flags(flags: Iterable[str]) -> tuple[int, int]:
    """(MS_* bits for mount(2), MOUNT_ATTR_* bits for fsmount(2)) of VFS_FLAGS names."""
    ms = attrs = 0
    for name in flags:
        try:
            bits = VFS_FLAGS[name]
        except KeyError:
            raise MountError(f"unknown mount flag {name!r}") from None
        ms |= bits[0]
        attrs |= bits[1]
    return ms, attrs


def mount_overlay(target: str, lowerdirs: Sequence[str], upperdir: str | None = None,
                  workdir: str | None = None, relative_to: str | None = None,
                  read_only: bool = False, api: str = "auto", flags: Sequence[str] = (),
                  userxattr: bool = False, target_fd: int | None = None) -> str:
    """Mount overlayfs at `target` (absolute); returns the API used: "mount" or "fsmount".

    `target_fd`: an fd (O_PATH will do) on the directory the caller checked as the mount
    point; the overlay goes onto that directory whatever `target` names by the time of
    the call (`target` is then only what messages say).

    `lowerdirs` are topmost first; relative ones are looked up in `relative_to`.
    `upperdir`/`workdir` are absolute or both None (a read-only overlay).
    api: "auto" (mount(2) when the options fit in a page, else the new API),
    "mount" or "fsmount". `flags`: names from VFS_FLAGS ("nosuid", "nodev", ...),
    the mount's per-mount flags with either API. `userxattr`: the layer dirs are in
    the user form (user.overlay.* xattrs; what a mount in a user namespace needs).
    """
    if not lowerdirs:
        raise MountError("an overlay needs at least one lower layer")
    if len(lowerdirs) > MAX_LAYERS:
        raise MountError(f"{len(lowerdirs)} layers: overlayfs stacks at most {MAX_LAYERS}")
    if (upperdir is None) != (workdir is None):
        raise MountError("upperdir and workdir go together")
    ms_flags, attr_flags = vfs_flags(flags)
    options = option_string(lowerdirs, upperdir, workdir, userxattr)
    if api == "auto":
        api = "mount" if fits_in_page(options) else "fsmount"
    if api == "mount":
        if not fits_in_page(options):
            raise MountError(
                f"the mount options for {len(lowerdirs)} layers take {len(options)} bytes, "
                f"more than mount(2) accepts in one page ({page_size()})")
        with _inside(relative_to):
            _mount_legacy(target, options, read_only, ms_flags, target_fd)
    elif api == "fsmount":
        with _inside(relative_to):
            _mount_new_api(target, lowerdirs, upperdir, workdir, read_only,
                           len(os.fsencode(options)), attr_flags, userxattr, target_fd)
    else:
        raise ValueError(f"unknown mount api {api!r}")
    return api


def _mount_legacy(target, options, read_only, ms_flags=0, target_fd=None):
    flags = (MS_RDONLY if read_only else 0) | ms_flags
    # /proc/self/fd/N resolves to the directory the fd holds, never to what its name
    # was swapped for since.
    where = target if target_fd is None else f"/proc/self/fd/{target_fd}"
    rc = _lib().mount(OVERLAY.encode(), os.fsencode(where), OVERLAY.encode(), flags,
                      os.fsencode(options))
    if rc != 0:
        code, message = _oserror("mount overlay on", target)
        raise MountError(message + _permission_hint(code))


def new_api_unavailable_reason() -> str | None:
    """Why the new mount API cannot be used on this machine, or None if it can."""
    machine = platform.machine()
    if machine not in _UNIFIED_ARCHES:
        return f"tosi-tools does not know the mount-API syscall numbers on {machine}"
    return None


def _syscall(name, *args):
    result = _lib().syscall(ctypes.c_long(_SYSCALL[name]), *args)
    if result < 0:
        return None, ctypes.get_errno()
    return result, 0


def _kernel_messages(fs_fd):
    """The messages overlayfs left on the fs context (read(2) on it), one line."""
    lines = []
    while True:
        try:
            data = os.read(fs_fd, 1024)
        except OSError:
            break
        if not data:
            break
        text = data.decode(errors="replace").strip()
        lines.append(text[2:] if text[1:2] == " " else text)
    return "; ".join(lines)


FSCONFIG_MAX_STRING = 255  # fsconfig(2) copies at most 256 bytes of a string, with its NUL


def _fsconfig_path(path, held):
    """`path`, or a /proc/self/fd name for it when it is too long for fsconfig(2)."""
    if len(os.fsencode(path)) <= FSCONFIG_MAX_STRING:
        return path
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    held.append(fd)
    return f"/proc/self/fd/{fd}"


def _mount_new_api(target, lowerdirs, upperdir, workdir, read_only, option_bytes, attr_flags=0,
                   userxattr=False, target_fd=None):
    held = []
    try:
        _mount_new_api_fds(target, lowerdirs, upperdir, workdir, read_only, option_bytes, held,
                           attr_flags, userxattr, target_fd)
    finally:
        for fd in held:
            os.close(fd)


def _mount_new_api_fds(target, lowerdirs, upperdir, workdir, read_only, option_bytes, held,
                       attr_flags=0, userxattr=False, target_fd=None):
    reason = new_api_unavailable_reason()
    if option_bytes >= page_size():
        why = (f"the mount options for {len(lowerdirs)} layers take {option_bytes} bytes, "
               f"more than mount(2) accepts in one page ({page_size()})")
    else:
        why = "the new mount API was asked for"
    if reason:
        raise MountError(f"{why}, and {reason}")
    fs_fd, code = _syscall("fsopen", ctypes.c_char_p(OVERLAY.encode()),
                           ctypes.c_uint(FSOPEN_CLOEXEC))
    if fs_fd is None:
        if code == errno.ENOSYS:
            raise MountError(f"{why}, and this kernel ({platform.release()}) has no "
                             "new mount API (fsopen, Linux 5.2 or newer)")
        raise MountError(f"fsopen overlay: {os.strerror(code)}{_permission_hint(code)}")
    try:
        def config(key, value, first_lower=False):
            _, err = _syscall("fsconfig", ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_STRING),
                              ctypes.c_char_p(key.encode()), ctypes.c_char_p(os.fsencode(value)),
                              ctypes.c_int(0))
            if err:
                detail = _kernel_messages(fs_fd)
                # Before 6.8, overlayfs answers the first "lowerdir+" with EINVAL and
                # "Unknown parameter"; a real layer problem names itself otherwise.
                if first_lower and err == errno.EINVAL and (not detail or "nknown parameter" in detail):
                    raise MountError(
                        f"{why}, and overlayfs in this kernel ({platform.release()}) has no "
                        "\"lowerdir+\" option (Linux 6.8 or newer) to pass them one by one")
                raise MountError(f"overlay {key}={value}: {os.strerror(err)}"
                                 + (f" ({detail})" if detail else ""))

        for position, lower in enumerate(lowerdirs):
            config("lowerdir+", _fsconfig_path(lower, held), first_lower=position == 0)
        if upperdir is not None:
            config("upperdir", _fsconfig_path(upperdir, held))
            config("workdir", _fsconfig_path(workdir, held))
        config("source", OVERLAY)
        if userxattr:
            _, err = _syscall("fsconfig", ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_SET_FLAG),
                              ctypes.c_char_p(USERXATTR.encode()), None, ctypes.c_int(0))
            if err:
                raise MountError(f"overlay {USERXATTR}: {os.strerror(err)} (Linux 5.11 or newer)")
        _, err = _syscall("fsconfig", ctypes.c_int(fs_fd), ctypes.c_uint(FSCONFIG_CMD_CREATE),
                          None, None, ctypes.c_int(0))
        if err:
            detail = _kernel_messages(fs_fd)
            raise MountError(f"create overlay for {target}: {os.strerror(err)}"
                             + (f" ({detail})" if detail else "") + _permission_hint(err))
        attrs = (MOUNT_ATTR_RDONLY if read_only else 0) | attr_flags
        mnt_fd, err = _syscall("fsmount", ctypes.c_int(fs_fd), ctypes.c_uint(FSMOUNT_CLOEXEC),
                               ctypes.c_uint(attrs))
        if mnt_fd is None:
            raise MountError(f"fsmount overlay for {target}: {os.strerror(err)}")
        try:
            if target_fd is None:
                to_fd, to_path, how = AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH
            else:
                to_fd, to_path = target_fd, b""
                how = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
            _, err = _syscall("move_mount", ctypes.c_int(mnt_fd), ctypes.c_char_p(b""),
                              ctypes.c_int(to_fd), ctypes.c_char_p(to_path), ctypes.c_uint(how))
            if err:
                raise MountError(f"move_mount overlay to {target}: {os.strerror(err)}")
        finally:
            os.close(mnt_fd)
    finally:
        os.close(fs_fd)


def unmount(target: str) -> bool:
    """Unmount `target`; returns True if it was busy and had to be detached lazily."""
    lib = _lib()
    path = os.fsencode(target)
    if lib.umount2(path, 0) == 0:
        return False
    code = ctypes.get_errno()
    if code == errno.EBUSY and lib.umount2(path, MNT_DETACH) == 0:
        return True
    raise MountError(f"unmount {target}: {os.strerror(code)}{_permission_hint(code)}")


def _unescape_mountinfo(field):
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_at(path: str, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(fstype, super options) of the topmost mount whose mount point is `path`, or None."""
    found = None
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 10 or _unescape_mountinfo(fields[4]) != path:
                continue
            sep = fields.index("-", 6)
            found = (fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else "")
    return found


def _split_unescaped(text, separator):
    """`text` cut at each `separator` no backslash escapes, each part unescaped."""
    parts, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def mounted_lowerdirs(mountinfo: str = "/proc/self/mountinfo") -> list[list[str]]:
    """The lowerdirs of every overlay mount this process sees, as the mount named them
    (relative ones relative to whatever directory the mounting process was in): from
    the "lowerdir=" list of mount(2) or the "lowerdir+"/"datadir+" ones of the new API."""
    mounts = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            if len(fields) < sep + 4 or fields[sep + 1] != OVERLAY:
                continue
            lowers = []
            for option in fields[sep + 3].split(","):
                key, _, value = _unescape_mountinfo(option).partition("=")
                if key == "lowerdir":
                    lowers.extend(_split_unescaped(value, ":"))
                elif key in ("lowerdir+", "datadir+"):
                    lowers.append(value)
            mounts.append([lower for lower in lowers if lower])
    return mounts
