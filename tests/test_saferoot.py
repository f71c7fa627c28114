"""saferoot: names resolve inside the root as if it were "/", and no metadata call goes through a symlink."""

import errno
import os
import stat

import pytest

from tosi_tools import saferoot
from tosi_tools.errors import UnsafeEntry
from tosi_tools.saferoot import SafeRoot, clean_name


@pytest.mark.parametrize("name,parts", [
    ("a/b", ("a", "b")), ("/etc/passwd", ("etc", "passwd")), ("./a//b/.", ("a", "b")),
    ("a/../b", ("b",)), ("./", ()), ("//", ()),
])
def test_clean_name_is_relative_to_the_root(name, parts):
    assert clean_name(name) == parts


@pytest.mark.parametrize("name", ["..", "../x", "a/../../x", "/../etc", "a/b/../../../c"])
def test_clean_name_refuses_climbing_above_the_root(name):
    with pytest.raises(UnsafeEntry, match="climbs out of the root"):
        clean_name(name)


@pytest.fixture
def tree(tmp_path):
    """tmp/outside/ next to tmp/root/, which holds real/ and a few symlinks."""
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    (root / "real" / "sub").mkdir(parents=True)
    (root / "file").write_bytes(b"f")
    os.symlink("/", root / "slash")
    os.symlink("/real", root / "absreal")
    os.symlink("../../../../..", root / "real" / "up")
    os.symlink(str(tmp_path / "outside"), root / "host")
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    os.symlink("file", root / "tofile")
    with SafeRoot(str(root)) as safe:
        yield tmp_path, root, safe


def _real(safe, fd):
    return os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), safe.path)


@pytest.mark.parametrize("name,expected", [
    ("real/sub", ("real", "sub")), ("slash/real", ("real",)), ("absreal/sub", ("real", "sub")),
    ("real/up/real", ("real",)), ("real/up", ()), ("slash", ()),
])
def test_symlinks_resolve_as_if_the_root_were_slash(tree, name, expected):
    _, _, safe = tree
    fd, canonical = safe.directory(clean_name(name))
    assert canonical == expected
    assert _real(safe, fd) == ("/".join(expected) or ".")


def test_symlink_to_a_host_path_resolves_inside_the_root(tree):
    tmp_path, root, safe = tree
    fd, canonical = safe.directory(("host",), create=True)
    assert "/".join(canonical) == str(tmp_path / "outside").lstrip("/")
    assert os.readlink(f"/proc/self/fd/{fd}").startswith(str(root) + "/")
    assert os.listdir(tmp_path / "outside") == []


def test_symlink_loop_is_an_unsafe_entry(tree):
    _, _, safe = tree
    with pytest.raises(UnsafeEntry, match="too many levels"):
        safe.directory(("loop1",))


def test_file_on_the_way_is_not_a_directory(tree):
    _, _, safe = tree
    with pytest.raises(NotADirectoryError):
        safe.directory(("tofile", "x"))


def test_missing_directories_are_made_only_when_asked(tree):
    _, root, safe = tree
    with pytest.raises(FileNotFoundError):
        safe.directory(("new", "deeper"))
    _, canonical = safe.directory(("new", "deeper"), create=True)
    assert canonical == ("new", "deeper") and (root / "new" / "deeper").is_dir()


def test_removed_directory_is_resolved_afresh(tree):
    _, root, safe = tree
    safe.directory(("real", "sub"))
    safe.remove(safe.fd, "real", ())
    os.symlink("/elsewhere", root / "real")
    (root / "elsewhere" / "sub").mkdir(parents=True)
    _, canonical = safe.directory(("real", "sub"))
    assert canonical == ("elsewhere", "sub")


def test_metadata_calls_never_follow_a_symlink(tree):
    tmp_path, root, safe = tree
    victim = tmp_path / "outside" / "victim"
    victim.write_bytes(b"v")
    os.chmod(victim, 0o644)
    os.symlink(str(victim), root / "link")
    before = os.stat(victim)
    saferoot.chown_at(safe.fd, "link", 1234, 1234)
    saferoot.utime_at(safe.fd, "link", 0)
    with pytest.raises(OSError):
        saferoot.chmod_at(safe.fd, "link", 0o777)
    with pytest.raises(OSError):  # user xattrs are not allowed on symlinks themselves
        saferoot.setxattr_at(safe.fd, "link", "user.x", b"1")
    after = os.stat(victim)
    assert (after.st_uid, after.st_mode, after.st_mtime_ns) == (before.st_uid, before.st_mode, before.st_mtime_ns)
    assert os.listxattr(victim) == []
    assert os.lstat(root / "link").st_uid == 1234


def test_open_entry_dir_does_not_follow_the_last_component(tree):
    _, _, safe = tree
    assert safe.open_entry_dir(("absreal",)) == (None, None)
    fd, canonical = safe.open_entry_dir(("slash", "real"))
    os.close(fd)
    assert canonical == ("real",)


def test_remove_deletes_a_whole_tree_without_following_links(tree):
    tmp_path, root, safe = tree
    (tmp_path / "outside" / "keep").write_bytes(b"k")
    os.symlink(str(tmp_path / "outside"), root / "real" / "sub" / "escape")
    safe.remove(safe.fd, "real", ())
    assert not (root / "real").exists()
    assert (tmp_path / "outside" / "keep").read_bytes() == b"k"
    assert stat.S_ISLNK(os.lstat(root / "slash").st_mode)


DEEP = 3000  # deeper than Python's recursion limit and than the handles remove_tree_at keeps open


def _deep_tree(base, depth=DEEP):
    """a/d/d/d/... `depth` levels below `base`, a file at every 500th; returns the top."""
    top = os.path.join(base, "a")
    os.mkdir(top)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(depth):
        os.mkdir("d", dir_fd=fd)
        if level % 500 == 0:
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)
    return top


def test_remove_tree_takes_a_tree_deeper_than_the_recursion_limit(tmp_path):
    top = _deep_tree(str(tmp_path))
    saferoot.remove_tree(top)
    assert os.listdir(tmp_path) == []


def test_remove_tree_holds_a_bounded_number_of_handles(tmp_path):
    import resource
    top = _deep_tree(str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        saferoot.remove_tree(top)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not os.path.lexists(top)


def test_remove_tree_removes_a_symlink_not_its_target(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_bytes(b"k")
    os.symlink(tmp_path / "target", tmp_path / "link")
    saferoot.remove_tree(str(tmp_path / "link"))
    assert not os.path.lexists(tmp_path / "link")
    assert (tmp_path / "target" / "keep").read_bytes() == b"k"


def test_remove_tree_at_of_a_missing_name_is_no_error(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        saferoot.remove_tree_at(fd, "missing")
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def test_open_canonical_dir_opens_a_real_directory(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    with SafeRoot(str(tmp_path)) as root:
        fd = root.open_canonical_dir(("a", "b"))
        try:
            assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "a" / "b"))
        finally:
            os.close(fd)


@pytest.mark.parametrize("replaced", ["a", "a/b"])
def test_open_canonical_dir_never_follows_a_symlink_that_replaced_a_directory(tmp_path, replaced):
    (tmp_path / "t" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b").mkdir(parents=True)
    with SafeRoot(str(tmp_path)) as root:
        assert root.directory(("a", "b"))[1] == ("a", "b")  # cached before the replacement
        victim = tmp_path / replaced
        root.remove(root.fd if replaced == "a" else root.directory(("a",))[0], victim.name,
                    () if replaced == "a" else ("a",))
        victim.symlink_to(tmp_path / "t" / "b" if replaced == "a/b" else "t")
        assert root.open_canonical_dir(("a", "b")) is None


def test_open_canonical_dir_of_a_file_or_nothing_is_none(tmp_path):
    (tmp_path / "f").write_text("x")
    with SafeRoot(str(tmp_path)) as root:
        assert root.open_canonical_dir(("f",)) is None
        assert root.open_canonical_dir(("missing", "x")) is None


# ---------------------------------------------------------------- walking a tree of names


def test_tree_of_holds_every_path_and_its_ancestors_once():
    tree, nodes = saferoot.tree_of([("a", "b", "c"), ("a",), ("x", "y"), ("a", "b", "c")], (),
                                   lambda p: (p[:-1], p[-1]))
    assert sorted(nodes) == [(), ("a",), ("a", "b"), ("a", "b", "c"), ("x",), ("x", "y")]
    assert nodes[()] is tree and [c.name for c in tree.children] == ["a", "x"]
    assert [c.name for c in nodes[("a",)].children] == ["b"]


@pytest.fixture(scope="module")
def deep_tree(tmp_path_factory):
    """One _deep_tree for the walks, which leave it as it is; removed afterwards (pytest's own
    cleanup recurses once per level)."""
    top = _deep_tree(str(tmp_path_factory.mktemp("walked")))
    yield top
    saferoot.remove_tree(top)


def _chain_tree(depth):
    tree, nodes = saferoot.tree_of([("d",) * depth], (), lambda p: (p[:-1], p[-1]))
    for parts, node in nodes.items():
        node.data = len(parts)
    return tree


def test_walk_tree_leaves_the_deepest_first_and_the_root_last(deep_tree):
    top = deep_tree
    left = []
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        saferoot.walk_tree(fd, _chain_tree(DEEP), saferoot.open_dir_at_node,
                           lambda here, node: left.append((node.data, os.fstat(here).st_ino)))
    finally:
        os.close(fd)
    assert [depth for depth, _ in left] == list(range(DEEP, -1, -1))
    assert left[-1][1] == os.stat(top).st_ino and len({ino for _, ino in left}) == DEEP + 1


def test_walk_tree_holds_a_bounded_number_of_handles(deep_tree):
    import resource
    top = deep_tree
    seen = []
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        saferoot.walk_tree(fd, _chain_tree(DEEP), saferoot.open_dir_at_node,
                           lambda here, node: seen.append(node.data))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        os.close(fd)
    assert len(seen) == DEEP + 1


def test_walk_tree_skips_what_is_not_a_real_directory(tmp_path):
    (tmp_path / "t" / "b").mkdir(parents=True)
    (tmp_path / "a").symlink_to("t")
    (tmp_path / "f").write_text("x")
    (tmp_path / "real" / "b").mkdir(parents=True)
    tree, nodes = saferoot.tree_of([("a", "b"), ("f", "b"), ("missing", "b"), ("real", "b")], (),
                                   lambda p: (p[:-1], p[-1]))
    for parts, node in nodes.items():
        node.data = parts
    left = []
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        saferoot.walk_tree(fd, tree, saferoot.open_dir_at_node, lambda here, node: left.append(node.data))
    finally:
        os.close(fd)
    assert left == [("real", "b"), ("real",), ()]


def test_walk_tree_refuses_to_climb_into_a_directory_that_moved(tmp_path):
    top = _deep_tree(str(tmp_path), depth=12)
    moved = []

    def leave(here, node):
        if node.data == 12 and not moved:  # swap a closed ancestor for another directory
            os.rename(os.path.join(top, "d", "d"), os.path.join(tmp_path, "away"))
            os.mkdir(os.path.join(top, "d", "d"))
            moved.append(True)

    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as caught:
            saferoot.walk_tree(fd, _chain_tree(12), saferoot.open_dir_at_node, leave, keep_open=4)
    finally:
        os.close(fd)
    assert caught.value.errno == errno.EBUSY


def test_the_disk_usage_walk_counts_every_inode_of_a_deep_tree_with_few_handles(deep_tree):
    import resource

    from tosi_tools.gc import usage_of

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        usage = usage_of(deep_tree)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    files = len(range(0, DEEP, 500))
    assert len(usage) == 1 + DEEP + files  # the top, every directory below it, the files
    assert usage[(os.stat(deep_tree).st_dev, os.stat(deep_tree).st_ino)] == os.stat(deep_tree).st_blocks * 512
