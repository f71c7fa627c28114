"""Where the measured commands write: a freshly mounted tmpfs and the machine's own disk.

The same figures are taken on both because a shared machine's root filesystem
can vary twentyfold in per-file creation cost between runs; the tmpfs shows the
tools' own cost. Every mount made here is undone by `unmount_under`.
"""

import contextlib
import itertools
import os
import subprocess
import tempfile

from .report import log

TMPFS = "tmpfs"
DISK = "disk"


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


@contextlib.contextmanager
def scratch_space(kinds, tmpfs_size, base_dir=None):
    """Yield (base, {kind: Scratch}); `base` also holds the registry. All removed on exit."""
    base = tempfile.mkdtemp(prefix="tosi-bench-", dir=base_dir or "/var/tmp")
    try:
        spaces = {}
        for kind in kinds:
            root = os.path.join(base, kind)
            os.makedirs(root)
            if kind == TMPFS:
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0755",
                                "tosi-bench", root], check=True)
                log(f"mounted a {tmpfs_size} tmpfs at {root}")
            spaces[kind] = Scratch(kind, root)
        yield base, spaces
    finally:
        remove_tree(base)
