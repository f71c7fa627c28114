"""The malicious corpus: layers that try to write, link or chmod outside the target, or to exhaust it.

Every case runs in both modes (flat --into and per layer), and after each one
the test checks that nothing outside the target changed: the sentinel tree next
to it, the host's /etc/passwd, and no stray files in / or /tmp.
"""

import functools
import gzip
import hashlib
import io
import os
import tarfile

import pytest

from tests.support.images import dir_entry, file_entry, hardlink_entry, make_layer, symlink_entry
from tests.support.staging import run_unpack, snapshot, stage_image
from tosi_tools.plan import PlanReader

MODES = ["into", "per-layer"]


def L(*entries):
    return make_layer(list(entries))


@functools.lru_cache(maxsize=None)
def _bomb(compression="gzip"):
    """A layer of a 64 MiB file of zeros: a few KiB on the wire."""
    info = tarfile.TarInfo("bomb")
    info.size = 64 << 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    return make_layer(raw_tar=buf.getvalue(), compression=compression)


class Sentinel:
    """A host directory next to the target, plus host files a break-out would reach."""

    def __init__(self, tmp_path):
        self.tmp = str(tmp_path)
        self.host = os.path.join(self.tmp, "host")
        self.rootfs = os.path.join(self.host, "rootfs")
        os.makedirs(os.path.join(self.host, "etc"))
        for rel, data in (("victim", b"victim"), ("etc/passwd", b"host passwd")):
            with open(os.path.join(self.host, rel), "wb") as f:
                f.write(data)
        self.before = self._state()

    def _state(self):
        tree = snapshot(self.tmp, with_dir_mtimes=True)
        tree = {p: a for p, a in tree.items()
                if not p.startswith(("host/rootfs", "workdir")) and p not in (".", "host")}
        st = os.stat("/etc/passwd")
        with open("/etc/passwd", "rb") as f:
            passwd = (hashlib.sha256(f.read()).hexdigest(), st.st_nlink, st.st_mode, st.st_mtime_ns)
        stray = sorted(n for d in ("/", "/tmp") for n in os.listdir(d) if "pwned" in n)
        return tree, passwd, stray

    def assert_unchanged(self):
        assert self._state() == self.before


@pytest.fixture
def sentinel(tmp_path):
    return Sentinel(tmp_path)


@pytest.fixture
def unpack(pusher, registry, repo_name, workdir, sentinel):
    """unpack(layers, mode, env) -> (proc, view): view is the tree the layers became (top layer's dir per layer)."""
    def _unpack(layers, mode, env=None):
        plan, _ = stage_image(pusher, registry, repo_name, layers, workdir)
        if mode == "into":
            proc = run_unpack(plan, "--workdir", workdir, "--into", sentinel.rootfs, env=env)
            return proc, sentinel.rootfs
        proc = run_unpack(plan, "--workdir", workdir, env=env)
        if proc.returncode != 0:
            leftovers = [n for n in os.listdir(os.path.join(workdir, "overlays")) if not n.endswith(".lock")]
            assert leftovers == [], "a failed layer left something a later run could trust"
            return proc, None
        records = PlanReader(iter(proc.stdout.splitlines())).layers()
        return proc, records[-1]["overlay"]
    return _unpack


def assert_refused(proc, *words):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tosi-unpack: error: "), proc.stderr
    for word in words:
        assert word in lines[0]


ESCAPES = {
    "dotdot": "../victim",
    "dotdot_after_a_dir": "a/../../victim",
    "dotdot_deep": "../../../../../../../../tmp/pwned-deep",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_dotdot_escape_is_refused_naming_layer_and_entry(unpack, sentinel, mode, name):
    proc, _ = unpack([L(file_entry(ESCAPES[name], b"pwned"))], mode)
    assert_refused(proc, "layer 0", repr(ESCAPES[name]), "climbs out")
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_absolute_name_is_written_inside_the_root(unpack, sentinel, mode):
    proc, root = unpack([L(file_entry("/tmp/pwned-absolute", b"inside"))], mode)
    assert proc.returncode == 0, proc.stderr
    assert open(f"{root}/tmp/pwned-absolute", "rb").read() == b"inside"
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_write_through_symlink_to_slash_in_same_layer_stays_in_root(unpack, sentinel, mode):
    proc, root = unpack([L(symlink_entry("evil", "/"), file_entry("evil/etc/passwd", b"pwned"))], mode)
    assert proc.returncode == 0, proc.stderr
    assert os.readlink(f"{root}/evil") == "/"
    assert open(f"{root}/etc/passwd", "rb").read() == b"pwned"
    sentinel.assert_unchanged()


def test_write_through_symlink_from_lower_layer_stays_in_root(unpack, sentinel):
    proc, root = unpack([L(symlink_entry("evil", "/")), L(file_entry("evil/etc/passwd", b"pwned"))], "into")
    assert proc.returncode == 0, proc.stderr
    assert open(f"{root}/etc/passwd", "rb").read() == b"pwned"
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_relative_symlink_climbing_out_is_clamped_at_the_root(unpack, sentinel, mode):
    layers = [L(dir_entry("a"), symlink_entry("a/up", "../../../../.."), symlink_entry("b", "a/up"),
                file_entry("b/victim", b"pwned"))]
    proc, root = unpack(layers, mode)
    assert proc.returncode == 0, proc.stderr
    assert open(f"{root}/victim", "rb").read() == b"pwned"
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_symlink_to_host_directory_is_resolved_inside_the_root(unpack, sentinel, mode):
    proc, root = unpack([L(symlink_entry("esc", sentinel.host), file_entry("esc/victim", b"pwned"))], mode)
    assert proc.returncode == 0, proc.stderr
    assert open(f"{root}{sentinel.host}/victim", "rb").read() == b"pwned"
    sentinel.assert_unchanged()


def test_entry_replacing_symlink_to_host_replaces_the_link_not_the_target(unpack, sentinel):
    victim = os.path.join(sentinel.host, "victim")
    layers = [L(symlink_entry("file", victim), symlink_entry("dir", sentinel.host)),
              L(file_entry("file", b"pwned", mode=0o777),
                dir_entry("dir", mode=0o777, uid=4242, pax={"SCHILY.xattr.user.pwned": "1"}))]
    proc, root = unpack(layers, "into")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.islink(f"{root}/file") and not os.path.islink(f"{root}/dir")
    assert os.lstat(f"{root}/dir").st_uid == 4242
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_opaque_marker_below_a_symlink_to_the_root_of_its_own_name_makes_that_directory(unpack, sentinel, mode):
    # "a/a" is the symlink "a" itself once "a" leads to the root: the marker's directory
    # replaces it, and is opened where it was made (a second lookup found nothing there).
    proc, root = unpack([L(symlink_entry("a", "."), file_entry("kept", b"k"),
                           file_entry("a/a/.wh..wh..opq", b""))], mode)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isdir(f"{root}/a") and not os.path.islink(f"{root}/a") and os.listdir(f"{root}/a") == []
    assert open(f"{root}/kept", "rb").read() == b"k"
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_hardlink_to_host_file_is_refused(unpack, sentinel, mode):
    proc, _ = unpack([L(hardlink_entry("h", "/etc/passwd"))], mode)
    assert_refused(proc, "layer 0", "'h'", "hardlink target")
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_hardlink_climbing_out_is_refused(unpack, sentinel, mode):
    proc, _ = unpack([L(hardlink_entry("h", "../victim"))], mode)
    assert_refused(proc, "layer 0", "'h'", "climbs out")
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_hardlink_through_symlink_to_host_is_refused(unpack, sentinel, mode):
    proc, _ = unpack([L(symlink_entry("esc", sentinel.host), hardlink_entry("h", "esc/victim"))], mode)
    assert_refused(proc, "layer 0", "'h'", "not in")
    sentinel.assert_unchanged()


def test_hardlink_to_absolute_path_links_the_roots_own_file(unpack, sentinel):
    layers = [L(dir_entry("etc"), file_entry("etc/passwd", b"own")), L(hardlink_entry("h", "/etc/passwd"))]
    proc, root = unpack(layers, "into")
    assert proc.returncode == 0, proc.stderr
    assert os.stat(f"{root}/h").st_ino == os.stat(f"{root}/etc/passwd").st_ino
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [".wh.", "d/.wh..", "d/.wh...", ".wh..wh.unknown"])
def test_malformed_whiteout_is_refused(unpack, sentinel, mode, name):
    proc, _ = unpack([L(dir_entry("d"), file_entry(name))], mode)
    assert_refused(proc, "layer 0", repr(name), "malformed whiteout")
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("xattr", ["trusted.overlay.opaque", "trusted.overlay.redirect", "user.overlay.origin"])
def test_overlay_xattrs_in_a_layer_are_dropped_with_one_warning(unpack, sentinel, mode, xattr):
    proc, view = unpack([L(dir_entry("d", pax={f"SCHILY.xattr.{xattr}": "y", "SCHILY.xattr.user.kept": "k"}),
                           file_entry("d/f", b"f", pax={f"SCHILY.xattr.{xattr}": "y"}),
                           dir_entry("e", pax={f"SCHILY.xattr.{xattr}": "y"}))], mode)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "overlayfs xattr" in line]
    assert len(warnings) == 1 and "layer 0" in warnings[0] and "dropped 3" in warnings[0], proc.stderr
    for path in ("d", "d/f", "e"):
        assert not [k for k in os.listxattr(os.path.join(view, path)) if "overlay." in k], path
    assert os.getxattr(os.path.join(view, "d"), "user.kept") == b"k"
    with open(os.path.join(view, "d/f"), "rb") as f:
        assert f.read() == b"f"
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_symlink_loop_is_refused(unpack, sentinel, mode):
    proc, _ = unpack([L(symlink_entry("a", "b"), symlink_entry("b", "a"), file_entry("a/x", b"x"))], mode)
    assert_refused(proc, "layer 0", "'a/x'", "too many levels of symbolic links")
    sentinel.assert_unchanged()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("mode", MODES)
def test_decompression_bomb_stops_at_the_size_cap(unpack, sentinel, mode, compression):
    proc, _ = unpack([_bomb(compression)], mode, env={"TOSI_MAX_LAYER_BYTES": str(8 << 20)})
    assert_refused(proc, "layer 0", "more than 8388608 bytes", "TOSI_MAX_LAYER_BYTES")
    if mode == "into":
        assert os.path.getsize(f"{sentinel.rootfs}/bomb") <= 8 << 20
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_too_many_entries_stop_at_the_entry_cap(unpack, sentinel, mode):
    proc, _ = unpack([L(*[file_entry(f"f{i}") for i in range(20)])], mode, env={"TOSI_MAX_LAYER_ENTRIES": "10"})
    assert_refused(proc, "layer 0", "more than 10 entries")
    sentinel.assert_unchanged()


def test_bomb_layer_is_small_on_the_wire():
    # The cap test above is only meaningful if the registry served a small blob.
    assert len(_bomb().data) < 1 << 20 and len(_bomb("zstd").data) < 1 << 20
    assert len(gzip.decompress(_bomb().data)) > 64 << 20


def _nested_dirs(depth):
    return [dir_entry("/".join(["n"] * level)) for level in range(1, depth + 1)]


@pytest.fixture
def deep_cleanup(sentinel, workdir):
    # pytest's own tmp_path cleanup (shutil.rmtree) recurses once per level
    yield
    from tosi_tools.saferoot import remove_tree
    for path in (sentinel.rootfs, os.path.join(workdir, "overlays")):
        if os.path.lexists(path):
            remove_tree(path)


@pytest.mark.parametrize("deleting", ["whiteout", "opaque"])
def test_deleting_a_tree_nested_deeper_than_the_stack_goes_cleanly(unpack, sentinel, deep_cleanup, deleting):
    from tests.support.images import opaque_entry, whiteout_entry
    upper = whiteout_entry("n") if deleting == "whiteout" else opaque_entry(".")
    proc, root = unpack([L(*_nested_dirs(3000)), L(file_entry("kept", b"k"), upper)], "into")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(root)) == ["kept"]
    sentinel.assert_unchanged()


def test_failed_layer_nested_deeper_than_the_stack_leaves_no_temp_dir(unpack, sentinel, deep_cleanup):
    # 3000 levels, then an escape: the half-made overlay dir must still be removed.
    proc, _ = unpack([L(*_nested_dirs(3000), file_entry("../pwned", b"x"))], "per-layer")
    assert_refused(proc, "layer 0", "climbs out")
    sentinel.assert_unchanged()


@pytest.mark.parametrize("mode", MODES)
def test_a_nul_byte_in_a_pax_path_is_refused_in_one_line(unpack, sentinel, mode):
    many = [file_entry(f"f{i}", b"x") for i in range(100)]  # past the file writer's start
    proc, _ = unpack([L(*many, file_entry("ok", b"x", pax={"path": "a\0b"}))], mode)
    assert_refused(proc, "layer 0", "NUL byte")
    sentinel.assert_unchanged()


NUMBERS_NO_SYSTEM_CALL_TAKES = {
    "uid": {"uid": str(1 << 40)},
    "gid": {"gid": "-1"},
    "mtime": {"mtime": str(10**30)},
    "sparse-map": {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": "s",
                   "GNU.sparse.realsize": "10", "GNU.sparse.map": "zero,one"},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(NUMBERS_NO_SYSTEM_CALL_TAKES))
def test_a_pax_number_out_of_range_or_not_a_number_is_one_unpack_error_line(unpack, sentinel, mode, case):
    many = [file_entry(f"f{i}", b"x") for i in range(100)]  # past the file writer's start
    proc, _ = unpack([L(*many, file_entry("bad", b"x", pax=NUMBERS_NO_SYSTEM_CALL_TAKES[case]))], mode)
    assert_refused(proc, "layer 0")
    assert "internal error" not in proc.stderr and ("out of range" in proc.stderr or "decimal" in proc.stderr)
    sentinel.assert_unchanged()
