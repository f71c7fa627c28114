"""overlayfs without root: in a user namespace, or through fuse-overlayfs.

A user without CAP_SYS_ADMIN mounts overlayfs in two ways, as podman and buildah
do rootless:

* the kernel's overlayfs (Linux 5.11+) inside a user namespace of their own, with
  "userxattr" (the layer dirs then in the user form: overlayfs.USER_FORM). That
  mount lives in a mount namespace of its own, which lasts as long as a process
  is in it: a *holder* (`python -m tosi_tools.cli.holder TARGET`, run detached,
  like podman's pause process) enters it, mounts, and waits for SIGTERM. The
  caller reaches the view as /proc/<holder>/root<TARGET>, or inside the
  namespace (`nsenter -t <holder> -U -m --preserve-credentials`), where the
  image's files show as root's (the user is mapped to uid 0, as `unshare -r`
  does). `find_holder` finds the holder of a mount point again (a process of
  ours with that command line that holds an overlay there), and `release` ends it.
* fuse-overlayfs, which mounts in the caller's own namespace (through the setuid
  fusermount3), so the view is at TARGET itself; `fusermount3 -u` undoes it.

`method()` chooses: TOSI_ROOTLESS_MOUNT=userns or fuse forces one, else the user
namespace where the kernel allows one, else fuse-overlayfs when installed, else a
MountError saying what is needed.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import overlayfs
from .errors import MountError

USERNS, FUSE = "userns", "fuse"
HOLDER_MODULE = "tosi_tools.cli.holder"
FUSE_FSTYPE = "fuse.fuse-overlayfs"
START_TIMEOUT = 60.0  # seconds the holder may take to mount
STOP_TIMEOUT = 10.0

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_NEEDS = ("mounting overlayfs without root needs user namespaces (sysctl user.max_user_namespaces "
          "above 0, and no kernel.unprivileged_userns_clone=0 or apparmor restriction) or "
          "fuse-overlayfs with a usable /dev/fuse; run as root, or use -extractto "
          "(tosi-unpack --into)")


def _sysctl(name: str) -> str | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_unavailable_reason() -> str | None:
    """Why this kernel refuses an unprivileged user namespace, or None if nothing says so."""
    if _sysctl("user.max_user_namespaces") == "0":
        return "user.max_user_namespaces is 0"
    if _sysctl("kernel.unprivileged_userns_clone") == "0":
        return "kernel.unprivileged_userns_clone is 0"
    if _sysctl("kernel.apparmor_restrict_unprivileged_userns") == "1":
        return "kernel.apparmor_restrict_unprivileged_userns is 1"
    return None


def fuse_program() -> str | None:
    return shutil.which("fuse-overlayfs")


def method(environ: Mapping[str, str] = os.environ) -> str:
    """USERNS or FUSE: how this user mounts (see the module doc); MountError if neither."""
    wanted = environ.get("TOSI_ROOTLESS_MOUNT", "")
    if wanted not in ("", USERNS, FUSE):
        raise MountError(f"TOSI_ROOTLESS_MOUNT={wanted!r}: not {USERNS!r} or {FUSE!r}")
    reason = userns_unavailable_reason()
    if wanted == USERNS or (not wanted and reason is None):
        if reason is not None:
            raise MountError(f"TOSI_ROOTLESS_MOUNT=userns, but {reason}; {_NEEDS}")
        return USERNS
    if fuse_program() is None:
        why = f"{reason}, and " if reason else ""
        raise MountError(f"{why}fuse-overlayfs is not installed; {_NEEDS}")
    return FUSE


# ---------------------------------------------------------------- the user namespace


def start_holder(target: str, lowerdirs: Sequence[str], upperdir: str | None, workdir: str | None,
                 relative_to: str, read_only: bool, api: str, flags: Sequence[str]) -> int:
    """Mount the overlay (user form) at `target` in a new user and mount namespace held
    by a detached process; returns that process's pid. MountError if it fails."""
    params = {"lowerdirs": list(lowerdirs), "upperdir": upperdir, "workdir": workdir,
              "relative_to": relative_to, "read_only": read_only, "api": api,
              "flags": list(flags), "uid": os.geteuid(), "gid": os.getegid()}
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_root + (os.pathsep + path if path else "")}
    proc = subprocess.Popen([sys.executable, "-s", "-m", HOLDER_MODULE, target],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/", env=env, close_fds=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(json.dumps(params).encode())
        proc.stdin.close()
        line = _read_line(proc.stdout.fileno(), START_TIMEOUT)
        proc.wait(START_TIMEOUT)  # the first process only forks the holder
        if line.startswith(b"ok "):
            return int(line.split()[1])
        if line.startswith(b"error "):
            raise MountError(line[6:].decode(errors="replace").strip())
        detail = proc.stderr.read(4096).decode(errors="replace").strip().splitlines()
        raise MountError(f"the user namespace holder for {target} did not start"
                         + (f": {detail[-1]}" if detail else ""))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _read_line(fd: int, timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise MountError("the user namespace holder did not answer in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def enter_namespace(uid: int, gid: int) -> None:
    """Move this (single-threaded) process into a new user namespace, where it is uid and
    gid 0 (mapped to `uid`, `gid`) and holds CAP_SYS_ADMIN, and a new mount namespace
    that it owns, whose mounts propagate nowhere."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        code = ctypes.get_errno()
        raise MountError(f"cannot make a user namespace: {os.strerror(code)}; {_NEEDS}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        code = ctypes.get_errno()
        raise MountError(f"cannot make the new mount namespace private: {os.strerror(code)}")


def hold(target: str, params: Mapping[str, Any], status_fd: int) -> None:
    """The holder's work, in a fresh single-threaded process: enter the namespaces,
    mount, write "ok <pid>" (or "error <message>") to `status_fd`, then wait for
    SIGTERM, SIGINT or SIGHUP. Returns when told to stop."""
    try:
        enter_namespace(params["uid"], params["gid"])
        overlayfs.mount_overlay(target, params["lowerdirs"], params["upperdir"], params["workdir"],
                              relative_to=params["relative_to"], read_only=params["read_only"],
                              api=params["api"], flags=params["flags"], userxattr=True)
    except (OSError, MountError) as exc:
        os.write(status_fd, b"error " + str(exc).replace("\n", " ").encode() + b"\n")
        raise
    stops = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    os.write(status_fd, f"ok {os.getpid()}\n".encode())
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the caller reads until these close: it must not wait for us
        os.dup2(devnull, fd)
    os.close(devnull)
    signal.sigwait(stops)


def _cmdline(pid: str) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[:-1]
    except OSError:
        return []


def find_holder(target: str) -> int | None:
    """The pid of our holder of an overlay at `target`, or None."""
    euid = os.geteuid()
    wanted = [HOLDER_MODULE.encode(), os.fsencode(target)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != euid:
                continue
        except OSError:
            continue
        if _cmdline(pid)[-2:] != wanted:
            continue
        try:
            mounted = overlayfs.mount_at(target, f"/proc/{pid}/mountinfo")
        except OSError:
            continue
        if mounted is not None and mounted[0] == overlayfs.OVERLAY:
            return int(pid)
    return None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def release(pid: int, target: str) -> None:
    """End the holder `pid`: its namespace, and the mount in it, go with it (once no
    other process has entered it)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while not _gone(pid):
        if time.monotonic() > deadline:
            raise MountError(f"the holder of {target} (process {pid}) did not stop")
        time.sleep(0.02)


def reach(pid: int, target: str) -> str:
    """How the caller reaches a mount held by `pid`, in words."""
    return (f"/proc/{pid}/root{target}, or {target} inside "
            f"`nsenter -t {pid} -U -m --preserve-credentials`")


# ---------------------------------------------------------------- fuse-overlayfs


def _fuse_item(path: str) -> str:
    if any(c in path for c in ",:\\"):
        raise MountError(f"fuse-overlayfs cannot take {path!r}: it has ',', ':' or '\\\\'")
    return path


def mount_fuse(target: str, lowerdirs: Sequence[str], upperdir: str | None, workdir: str | None,
               flags: Sequence[str]) -> None:
    """Mount with fuse-overlayfs at `target` (lowerdirs absolute, topmost first)."""
    program = fuse_program()
    if program is None:
        raise MountError(f"fuse-overlayfs is not installed; {_NEEDS}")
    options = "lowerdir=" + ":".join(_fuse_item(d) for d in lowerdirs)
    if upperdir is not None:
        options += f",upperdir={_fuse_item(upperdir)},workdir={_fuse_item(workdir or '')}"
    for flag in flags:
        options += "," + flag
    proc = subprocess.run([program, "-o", options, target], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=START_TIMEOUT)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MountError(f"fuse-overlayfs on {target}: " + (lines[-1] if lines else f"exit {proc.returncode}"))


def unmount_fuse(target: str) -> None:
    program = shutil.which("fusermount3") or shutil.which("fusermount")
    if os.geteuid() == 0 or program is None:
        overlayfs.unmount(target)
        return
    proc = subprocess.run([program, "-u", target], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=STOP_TIMEOUT)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MountError(f"unmount {target}: " + (lines[-1] if lines else f"exit {proc.returncode}"))
