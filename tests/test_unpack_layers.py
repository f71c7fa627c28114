"""Layer semantics through the real registry: images built here, pushed, fetched, unpacked by tosi-unpack.

Every benign case is unpacked both ways, flat (--into) and per layer; the
per-layer directories mounted as a read-only overlay must show exactly the
flat tree.
"""

import os
import stat
import struct
import subprocess
import tarfile
import tempfile

import pytest

from tests.support.images import (
    dir_entry, file_entry, hardlink_entry, make_layer, opaque_entry, special_entry,
    symlink_entry, tar_bytes, whiteout_entry,
)
from tests.support.staging import OverlayView, run_unpack, snapshot, stage_image
from tosi_tools.plan import PlanReader

LONG_DIR = "/".join(["d" * 60] * 5)          # 304 characters, beyond ustar's 100 and 155
LONG_TARGET = "t" * 200
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # cap_net_bind_service+ep


def _sparse_tar():
    """A tar of one sparse file, written by GNU tar (tarfile cannot write sparse files)."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        path = os.path.join(tmp_dir, "sparse")
        with open(path, "wb") as f:
            f.truncate(8 << 20)
            f.seek(4096)
            f.write(b"hello")
            f.seek((6 << 20) + 7)
            f.write(b"end")
        os.utime(path, (1_600_000_000, 1_600_000_000))
        out = os.path.join(tmp_dir, "sparse.tar")
        subprocess.run(["tar", "--sparse", "--format=pax", "-cf", out, "-C", tmp_dir, "sparse"], check=True)
        with open(out, "rb") as f:
            return f.read()


def L(*entries, compression="gzip", fmt=tarfile.PAX_FORMAT):
    return make_layer(raw_tar=tar_bytes(list(entries), format=fmt), compression=compression)


CASES = {
    "whiteout_file": lambda: [
        L(dir_entry("a"), file_entry("a/f", b"f"), file_entry("a/g", b"g")),
        L(whiteout_entry("a/f")),
    ],
    "whiteout_directory_tree": lambda: [
        L(dir_entry("a"), dir_entry("a/b"), file_entry("a/b/c", b"c"), file_entry("keep", b"k")),
        L(whiteout_entry("a")),
    ],
    "whiteout_symlink": lambda: [
        L(dir_entry("t"), file_entry("t/x", b"x"), symlink_entry("s", "/t")),
        L(whiteout_entry("s")),
    ],
    "opaque_marker_first": lambda: [
        L(dir_entry("d"), file_entry("d/old", b"o"), dir_entry("d/sub"), file_entry("d/sub/old", b"o")),
        L(dir_entry("d"), opaque_entry("d"), file_entry("d/new", b"n")),
    ],
    "opaque_marker_after_entries": lambda: [
        L(dir_entry("d"), file_entry("d/old", b"o"), dir_entry("d/sub"), file_entry("d/sub/old", b"o")),
        L(dir_entry("d"), file_entry("d/new", b"n"), dir_entry("d/sub"), file_entry("d/sub/new", b"n"),
          opaque_entry("d")),
    ],
    "whiteout_then_same_name_in_layer": lambda: [
        L(dir_entry("x"), file_entry("x/lower", b"l")),
        L(whiteout_entry("x"), dir_entry("x"), file_entry("x/upper", b"u")),
    ],
    "whiteout_then_entries_below_same_name": lambda: [
        L(dir_entry("x"), file_entry("x/lower", b"l")),
        L(whiteout_entry("x"), file_entry("x/upper", b"u")),
    ],
    "file_replaced_by_directory_across_layers": lambda: [
        L(file_entry("p", b"file")),
        L(dir_entry("p"), file_entry("p/q", b"q")),
    ],
    "directory_replaced_by_file_across_layers": lambda: [
        L(dir_entry("p"), file_entry("p/q", b"q")),
        L(file_entry("p", b"file")),
    ],
    "file_replaced_by_directory_within_layer": lambda: [
        L(file_entry("p", b"file"), dir_entry("p"), file_entry("p/q", b"q")),
    ],
    "directory_replaced_by_file_within_layer": lambda: [
        L(dir_entry("p"), file_entry("p/q", b"q"), file_entry("p", b"file")),
    ],
    "symlink_replaced_by_directory": lambda: [
        L(dir_entry("t"), file_entry("t/x", b"x"), symlink_entry("p", "t")),
        L(dir_entry("p"), file_entry("p/y", b"y")),
    ],
    "entry_repeated_in_layer": lambda: [
        L(file_entry("f", b"one"), file_entry("f", b"two", mode=0o600)),
    ],
    "hardlinks_within_layer": lambda: [
        L(file_entry("f", b"shared", mode=0o640, uid=7, gid=8), hardlink_entry("h1", "f"),
          dir_entry("sub"), hardlink_entry("sub/h2", "/f")),
    ],
    "every_entry_type": lambda: [
        L(dir_entry("empty"), file_entry("file", b"data"), symlink_entry("abs", "/etc/passwd"),
          symlink_entry("rel", "file"), symlink_entry("dangling", "../nowhere"),
          special_entry("fifo", tarfile.FIFOTYPE, mode=0o600),
          special_entry("null", tarfile.CHRTYPE, 1, 3, mode=0o666),
          special_entry("loop", tarfile.BLKTYPE, 7, 0, mode=0o660, gid=6),
          hardlink_entry("link", "file")),
    ],
    "ownership_and_modes": lambda: [
        L(file_entry("suid", b"s", mode=0o4755, uid=1000, gid=1001),
          file_entry("sgid", b"s", mode=0o2711, uid=0, gid=50),
          dir_entry("sticky", mode=0o1777), file_entry("none", b"", mode=0o000, uid=65534, gid=65534),
          dir_entry("ro", mode=0o555, uid=33, gid=33), dir_entry("ro/inner", mode=0o500),
          file_entry("ro/inner/f", b"inside read-only dirs", mode=0o444),
          symlink_entry("owned-link", "suid", uid=1000, gid=1000)),
    ],
    "xattrs": lambda: [
        L(file_entry("f", b"x", pax={"SCHILY.xattr.user.color": "blue",
                                     "SCHILY.xattr.security.capability": CAPABILITY.decode("latin-1")}),
          dir_entry("d", pax={"SCHILY.xattr.user.dir": "yes"})),
    ],
    "long_names_pax": lambda: [
        L(dir_entry(LONG_DIR), file_entry(f"{LONG_DIR}/file", b"deep"),
          symlink_entry("longlink", LONG_TARGET), hardlink_entry("hl", f"{LONG_DIR}/file")),
    ],
    "long_names_gnu": lambda: [
        L(dir_entry(LONG_DIR), file_entry(f"{LONG_DIR}/file", b"deep"),
          symlink_entry("longlink", LONG_TARGET), hardlink_entry("hl", f"{LONG_DIR}/file"),
          fmt=tarfile.GNU_FORMAT),
    ],
    "zstd_and_uncompressed_layers": lambda: [
        L(file_entry("z", b"zstd"), compression="zstd"),
        L(file_entry("t", b"plain"), compression="none"),
        L(file_entry("g", b"gzip")),
    ],
    "empty_layer": lambda: [L(), L(file_entry("f", b"after"))],
    "duplicated_layer": lambda: (lambda a, b: [a, b, a])(
        L(file_entry("f", b"a"), file_entry("only-a", b"a")), L(file_entry("f", b"b"), whiteout_entry("only-a"))),
    "absolute_names": lambda: [
        L(dir_entry("/etc"), file_entry("/etc/abs", b"abs"), file_entry("//twice", b"2")),
    ],
    "sparse_file": lambda: [make_layer(raw_tar=_sparse_tar())],
    "mtimes": lambda: [
        L(dir_entry("d", mtime=1_000_000_000), file_entry("d/f", b"x", mtime=1_100_000_000),
          symlink_entry("d/l", "f", mtime=1_200_000_000)),
    ],
}


@pytest.fixture
def stage(pusher, registry, repo_name, workdir):
    def _stage(layers, oci=False):
        text, _ = stage_image(pusher, registry, repo_name, layers, workdir, oci=oci)
        return text
    return _stage


def unpack_into(plan, workdir, target):
    proc = run_unpack(plan, "--workdir", workdir, "--into", target)
    assert proc.returncode == 0, proc.stderr
    return proc


def unpack_per_layer(plan, workdir):
    proc = run_unpack(plan, "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    reader = PlanReader(iter(proc.stdout.splitlines()))
    return reader.image, reader.layers()


@pytest.fixture
def flat(stage, workdir, tmp_path):
    def _flat(layers):
        target = str(tmp_path / "rootfs")
        unpack_into(stage(layers), workdir, target)
        return target
    return _flat


@pytest.mark.parametrize("case", sorted(CASES))
def test_overlay_view_of_layer_dirs_equals_flat_tree(case, stage, workdir, tmp_path):
    plan = stage(CASES[case]())
    target = str(tmp_path / "rootfs")
    unpack_into(plan, workdir, target)
    _, layers = unpack_per_layer(plan, workdir)
    overlays = os.path.join(workdir, "overlays")
    with OverlayView(str(tmp_path), [os.path.join(overlays, r["link"]) for r in layers]) as merged:
        assert snapshot(merged) == snapshot(target)


def test_whiteout_removes_file_of_lower_layer(flat):
    root = flat(CASES["whiteout_file"]())
    assert sorted(os.listdir(f"{root}/a")) == ["g"]


def test_whiteout_removes_whole_directory_tree(flat):
    root = flat(CASES["whiteout_directory_tree"]())
    assert sorted(os.listdir(root)) == ["keep"]


def test_whiteout_removes_symlink_not_its_target(flat):
    root = flat(CASES["whiteout_symlink"]())
    assert not os.path.lexists(f"{root}/s")
    assert os.listdir(f"{root}/t") == ["x"]


def test_opaque_marker_hides_lower_entries_keeps_same_layer_entries(flat):
    root = flat(CASES["opaque_marker_first"]())
    assert os.listdir(f"{root}/d") == ["new"]


def test_opaque_marker_after_same_layer_entries_spares_them(flat):
    root = flat(CASES["opaque_marker_after_entries"]())
    assert sorted(os.listdir(f"{root}/d")) == ["new", "sub"]
    assert os.listdir(f"{root}/d/sub") == ["new"]


@pytest.mark.parametrize("case", ["whiteout_then_same_name_in_layer", "whiteout_then_entries_below_same_name"])
def test_whiteout_and_same_name_in_one_layer_keep_only_the_new_entry(flat, case):
    root = flat(CASES[case]())
    assert os.listdir(f"{root}/x") == ["upper"]


@pytest.mark.parametrize("case", ["file_replaced_by_directory_across_layers",
                                  "file_replaced_by_directory_within_layer"])
def test_file_replaced_by_directory(flat, case):
    root = flat(CASES[case]())
    assert os.path.isdir(f"{root}/p") and not os.path.islink(f"{root}/p")
    assert open(f"{root}/p/q", "rb").read() == b"q"


@pytest.mark.parametrize("case", ["directory_replaced_by_file_across_layers",
                                  "directory_replaced_by_file_within_layer"])
def test_directory_replaced_by_file(flat, case):
    root = flat(CASES[case]())
    assert open(f"{root}/p", "rb").read() == b"file"


def test_symlink_replaced_by_directory_leaves_old_target_alone(flat):
    root = flat(CASES["symlink_replaced_by_directory"]())
    assert not os.path.islink(f"{root}/p")
    assert os.listdir(f"{root}/p") == ["y"]
    assert os.listdir(f"{root}/t") == ["x"]


def test_repeated_entry_last_one_wins(flat):
    root = flat(CASES["entry_repeated_in_layer"]())
    assert open(f"{root}/f", "rb").read() == b"two"
    assert stat.S_IMODE(os.stat(f"{root}/f").st_mode) == 0o600


def test_hardlinks_share_one_inode(flat):
    root = flat(CASES["hardlinks_within_layer"]())
    inodes = {os.stat(f"{root}/{p}").st_ino for p in ("f", "h1", "sub/h2")}
    assert len(inodes) == 1
    assert os.stat(f"{root}/f").st_nlink == 3


def test_every_entry_type_is_created(flat):
    root = flat(CASES["every_entry_type"]())
    assert os.path.isdir(f"{root}/empty") and os.listdir(f"{root}/empty") == []
    assert os.readlink(f"{root}/abs") == "/etc/passwd"
    assert os.readlink(f"{root}/rel") == "file"
    assert os.readlink(f"{root}/dangling") == "../nowhere"
    assert stat.S_ISFIFO(os.lstat(f"{root}/fifo").st_mode)
    null = os.lstat(f"{root}/null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    loop = os.lstat(f"{root}/loop")
    assert stat.S_ISBLK(loop.st_mode) and os.major(loop.st_rdev) == 7 and loop.st_gid == 6
    assert os.stat(f"{root}/link").st_ino == os.stat(f"{root}/file").st_ino


def test_owners_and_special_mode_bits_are_kept(flat):
    root = flat(CASES["ownership_and_modes"]())

    def owner_mode(path):
        st = os.lstat(f"{root}/{path}")
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner_mode("suid") == (1000, 1001, 0o4755)
    assert owner_mode("sgid") == (0, 50, 0o2711)
    assert owner_mode("sticky")[2] == 0o1777
    assert owner_mode("none") == (65534, 65534, 0)
    assert owner_mode("ro") == (33, 33, 0o555)
    assert owner_mode("owned-link")[:2] == (1000, 1000)


def test_read_only_directories_still_get_their_contents(flat):
    root = flat(CASES["ownership_and_modes"]())
    assert open(f"{root}/ro/inner/f", "rb").read() == b"inside read-only dirs"
    assert stat.S_IMODE(os.stat(f"{root}/ro/inner").st_mode) == 0o500


def test_xattrs_from_pax_headers_are_set(flat):
    root = flat(CASES["xattrs"]())
    assert os.getxattr(f"{root}/f", "user.color") == b"blue"
    assert os.getxattr(f"{root}/f", "security.capability") == CAPABILITY
    assert os.getxattr(f"{root}/d", "user.dir") == b"yes"


@pytest.mark.parametrize("case", ["long_names_pax", "long_names_gnu"])
def test_long_names_and_link_targets(flat, case):
    root = flat(CASES[case]())
    assert open(f"{root}/{LONG_DIR}/file", "rb").read() == b"deep"
    assert os.readlink(f"{root}/longlink") == LONG_TARGET
    assert os.stat(f"{root}/hl").st_ino == os.stat(f"{root}/{LONG_DIR}/file").st_ino


def test_sparse_file_keeps_content_and_holes(flat):
    root = flat(CASES["sparse_file"]())
    st = os.stat(f"{root}/sparse")
    assert st.st_size == 8 << 20
    with open(f"{root}/sparse", "rb") as f:
        data = f.read()
    assert data[4096:4101] == b"hello" and data[(6 << 20) + 7:(6 << 20) + 10] == b"end"
    assert data.count(0) == len(data) - 8
    assert st.st_blocks * 512 < 1 << 20  # the holes stay holes


def test_zstd_and_uncompressed_layers_are_applied(flat):
    root = flat(CASES["zstd_and_uncompressed_layers"]())
    assert sorted(os.listdir(root)) == ["g", "t", "z"]


def test_empty_layer_is_no_change(flat):
    root = flat(CASES["empty_layer"]())
    assert os.listdir(root) == ["f"]


def test_duplicated_layer_is_applied_each_time(flat):
    root = flat(CASES["duplicated_layer"]())
    assert open(f"{root}/f", "rb").read() == b"a"
    assert open(f"{root}/only-a", "rb").read() == b"a"


def test_absolute_names_land_inside_the_root(flat):
    root = flat(CASES["absolute_names"]())
    assert open(f"{root}/etc/abs", "rb").read() == b"abs"
    assert open(f"{root}/twice", "rb").read() == b"2"


def test_mtimes_are_kept_directories_after_their_contents(flat):
    root = flat(CASES["mtimes"]())
    assert os.lstat(f"{root}/d").st_mtime == 1_000_000_000
    assert os.lstat(f"{root}/d/f").st_mtime == 1_100_000_000
    assert os.lstat(f"{root}/d/l").st_mtime == 1_200_000_000


def test_oci_media_types_are_understood(stage, workdir, tmp_path):
    layers = [make_layer([file_entry("oci", b"1")], oci=True), L(file_entry("z", b"2"), compression="zstd")]
    target = str(tmp_path / "rootfs")
    unpack_into(stage(layers, oci=True), workdir, target)
    assert sorted(os.listdir(target)) == ["oci", "z"]


def test_hundred_twenty_layers_overlay_view_equals_flat_tree(stage, workdir, tmp_path):
    layers = [L(file_entry(f"f{i:03}", str(i).encode()), whiteout_entry(f"f{i - 1:03}"),
                file_entry("top", str(i).encode()))
              for i in range(120)]
    plan = stage(layers)
    target = str(tmp_path / "rootfs")
    unpack_into(plan, workdir, target)
    assert sorted(os.listdir(target)) == ["f119", "top"]
    _, records = unpack_per_layer(plan, workdir)
    overlays = os.path.join(workdir, "overlays")
    with OverlayView(str(tmp_path), [os.path.join(overlays, r["link"]) for r in records]) as merged:
        assert snapshot(merged) == snapshot(target)
