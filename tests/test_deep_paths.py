"""Paths thousands of levels deep, and longer than PATH_MAX, through `tosi -extractto` and `tosi -mount`.

A layer may nest one path as deep as it likes: extracting and mounting it cost
time linear in its depth (bench/deep measures that; no test here times it), and
nothing on the way resolves the whole path at once, so names longer than the
kernel's PATH_MAX (4096 bytes) work in both layouts.
"""

import os
import stat

import pytest

from tests.support.images import dir_entry, file_entry, make_layer
from tosi_tools import overlayfs, saferoot

PATH_MAX = 4096
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def deep_name(levels, component):
    return "/".join([component] * levels)


def read_deep(root, levels, component):
    """(data of the file at the bottom, lstat of every directory on the way), by handles:
    the path is too long for open(2) as a whole."""
    fd = os.open(root, _DIR)
    stats = []
    try:
        for _ in range(levels):
            sub = os.open(component, _DIR, dir_fd=fd)
            os.close(fd)
            fd = sub
            stats.append(os.fstat(fd))
        leaf = os.open("f", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        with os.fdopen(leaf, "rb") as f:
            return f.read(), stats
    finally:
        os.close(fd)


def attributes(st):
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.fixture
def deep_image(pusher, registry, repo_name):
    """push(levels, component, named_mode) -> reference of an image whose top layer holds one
    file `levels` directories deep, over a layer that names the first; the top layer names
    none of them, or with `named_mode` each (that mode, owner level % 5, mtime by level)."""
    def push(levels, component, named_mode=None):
        lower = make_layer([dir_entry(component, mode=0o750, uid=7, gid=8, mtime=1_500_000_000)])
        named = [] if named_mode is None else [
            dir_entry(deep_name(level, component), mode=named_mode, uid=level % 5,
                      mtime=1_400_000_000 + level)
            for level in range(1, levels + 1)]
        top = make_layer(named + [file_entry(deep_name(levels, component) + "/f", b"deep")])
        tag = f"deep-{levels}-{len(component)}-{'named' if named else 'implicit'}"
        pusher.push_image(repo_name, tag, [lower, top])
        return f"{registry.host}/{repo_name}:{tag}"
    return push


@pytest.fixture
def scratch(tmp_path, mounts):
    """tmp_path, emptied with remove_tree afterwards (pytest's own cleanup recurses once per
    level, and cannot reach below PATH_MAX); whatever is mounted in `mounts` goes first."""
    yield tmp_path
    for point in mounts:
        while overlayfs.mount_at(os.path.abspath(point)):
            overlayfs.unmount(os.path.abspath(point))
    for name in os.listdir(tmp_path):
        saferoot.remove_tree(os.path.join(tmp_path, name))


def pull(tool, ref, mode, target, workdir):
    return tool("tosi", "-image", ref, f"-{mode}", target, "-workdir", workdir, check=0, timeout=300)


def assert_both_layouts_hold_the_path(tool, ref, scratch, mounts, levels, component):
    flat, mounted, workdir = str(scratch / "flat"), str(scratch / "mnt"), str(scratch / "workdir")
    pull(tool, ref, "extractto", flat, workdir)
    mounts.append(mounted)
    pull(tool, ref, "mount", mounted, workdir)
    flat_data, flat_dirs = read_deep(flat, levels, component)
    mounted_data, mounted_dirs = read_deep(mounted, levels, component)
    assert flat_data == mounted_data == b"deep"
    # The first directory is the lower layer's (the top one does not name it: the mount's
    # attributes lowerdir says so); the rest are the top layer's own, 0755 and root's.
    assert attributes(mounted_dirs[0]) == attributes(flat_dirs[0]) == (0o750, 7, 8)
    assert {attributes(st) for st in mounted_dirs[1:]} == {(0o755, 0, 0)}
    assert [attributes(st) for st in mounted_dirs] == [attributes(st) for st in flat_dirs]


def test_a_path_3000_levels_deep_extracts_mounts_and_reads_back(tool, deep_image, scratch, mounts):
    ref = deep_image(3000, "d")
    assert_both_layouts_hold_the_path(tool, ref, scratch, mounts, 3000, "d")


def test_a_path_longer_than_path_max_extracts_mounts_and_reads_back(tool, deep_image, scratch, mounts):
    component = "x" * 60
    levels = 100
    assert len(deep_name(levels, component) + "/f") > PATH_MAX
    assert_both_layouts_hold_the_path(tool, deep_image(levels, component), scratch, mounts, levels, component)


def test_a_path_of_1500_named_directories_keeps_each_ones_attributes_in_both_layouts(
        tool, deep_image, scratch, mounts):
    levels, component = 1500, "n"
    ref = deep_image(levels, component, named_mode=0o711)
    flat, mounted, workdir = str(scratch / "flat"), str(scratch / "mnt"), str(scratch / "workdir")
    pull(tool, ref, "extractto", flat, workdir)
    mounts.append(mounted)
    pull(tool, ref, "mount", mounted, workdir)
    for root in (flat, mounted):
        data, dirs = read_deep(root, levels, component)
        assert data == b"deep"
        assert [attributes(st) for st in dirs] == [(0o711, level % 5, 0) for level in range(1, levels + 1)]
        # The last directory's mtime is its entry's: the file went in before the fix-up.
        assert dirs[-1].st_mtime_ns == (1_400_000_000 + levels) * 10**9
        assert [st.st_mtime_ns for st in dirs[:-1]] == [(1_400_000_000 + level) * 10**9
                                                       for level in range(1, levels)]


@pytest.mark.slow
def test_a_path_5000_levels_deep_extracts_mounts_and_reads_back(tool, deep_image, scratch, mounts):
    ref = deep_image(5000, "d")
    assert_both_layouts_hold_the_path(tool, ref, scratch, mounts, 5000, "d")
