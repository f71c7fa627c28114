"""Where the measured commands write: a freshly mounted tmpfs, a fresh loop-mounted ext4,
and the machine's own disk.

The ext4 stands for the disk users extract onto: made for the run (mkfs with its
inode tables written up front, so no background initialisation runs during the
measurements) on a loop device that writes through to the disk (direct I/O), so
fsync and syncfs wait for the disk as they would on a real one. The machine's root
filesystem itself (DISK) can vary twentyfold in per-file creation cost between
runs on a shared machine; the tmpfs shows the tools' own cost, with nothing to
write back. Every mount made here is undone by `unmount_under`, every loop device
detached on exit.
"""

import contextlib
import itertools
import os
import subprocess
import tempfile

from .report import log

TMPFS = "tmpfs"
EXT4 = "ext4"
DISK = "disk"
KINDS = (TMPFS, EXT4, DISK)


def mounts_under(path):
    """Mount points at or below `path`, deepest first."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == path or point.startswith(path.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount_under(path):
    for point in mounts_under(path):
        if subprocess.run(["umount", point], stderr=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)


def remove_tree(path):
    """rm -rf, after unmounting whatever a failed run left mounted inside."""
    if os.path.lexists(path):
        unmount_under(path)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=True)


class Scratch:
    """One filesystem under test; `fresh()` gives a new empty directory on it."""

    def __init__(self, kind, root):
        self.kind = kind
        self.root = root
        self._names = itertools.count()

    def fresh(self, label="run"):
        path = os.path.join(self.root, f"{label}-{next(self._names)}")
        os.makedirs(path)
        return path

    def __repr__(self):
        return f"Scratch({self.kind}, {self.root})"


def mount_ext4(image, root, size):
    """mkfs.ext4 on a preallocated file of `size`, loop-mounted at `root`; returns the loop device."""
    # Allocated up front, as a real disk's blocks exist before they are written: a sparse
    # image makes each first write allocate in the filesystem below, which no disk does.
    subprocess.run(["fallocate", "-l", size, image], check=True)
    # nodiscard: mkfs would otherwise discard the whole device, punching the file sparse again.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", image],
                   check=True)
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", image],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "ext4", loop, root], check=True)
    except BaseException:
        subprocess.run(["losetup", "-d", loop], check=False)
        raise
    return loop


@contextlib.contextmanager
def scratch_space(kinds, tmpfs_size, base_dir=None, ext4_size="16g"):
    """Yield (base, {kind: Scratch}); `base` also holds the registry. All removed on exit."""
    base = tempfile.mkdtemp(prefix="tosi-bench-", dir=base_dir or "/var/tmp")
    loops = []
    try:
        spaces = {}
        for kind in kinds:
            root = os.path.join(base, kind)
            os.makedirs(root)
            if kind == TMPFS:
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0755",
                                "tosi-bench", root], check=True)
                log(f"mounted a {tmpfs_size} tmpfs at {root}")
            elif kind == EXT4:
                loops.append(mount_ext4(os.path.join(base, "ext4.img"), root, ext4_size))
                log(f"mounted a fresh {ext4_size} ext4 ({loops[-1]}, direct I/O) at {root}")
            spaces[kind] = Scratch(kind, root)
        yield base, spaces
    finally:
        unmount_under(base)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)
        remove_tree(base)
