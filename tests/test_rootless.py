"""tosi without root (issue 13, "Rootless"): plain `tosi` and `tosi-unpack` lay layers out
per layer in the user form (whiteouts as 0/0 devices, opaque directories marked
user.overlay.opaque), `-mount` mounts them in a user namespace held by a process of
the user's (the view at /proc/<holder>/root<target>), and `tosi-mount --unmount` ends
it. The user is uid 65534 with the system python (a root-only interpreter is not
theirs to run); the trees are compared with root's and with the reference model."""

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from tests.support import layermodel
from tests.support.images import dir_entry, file_entry, hardlink_entry, opaque_entry, whiteout_entry
from tests.support.staging import snapshot
from tests.test_layout_equivalence import L, _differences, without_root
from tosi_tools import overlayfs
from tosi_tools.cache import USER_FORM, Workdir
from tosi_tools.plan import PlanReader

NOBODY = 65534
BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bin")
# The test dependencies of this checkout, for the system python (same minor version).
SITE = next(p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p))

STACK = [
    L(dir_entry("etc"), file_entry("etc/passwd", b"root:x:0:0\n"), file_entry("etc/gone", b"x"),
      dir_entry("var"), dir_entry("var/cache"), file_entry("var/cache/old", b"old"),
      dir_entry("usr"), dir_entry("usr/bin"), file_entry("usr/bin/tool", b"#!tool\n", mode=0o755),
      hardlink_entry("usr/bin/alias", "usr/bin/tool")),
    L(dir_entry("etc"), whiteout_entry("etc/gone"), file_entry("etc/new", b"new\n"),
      dir_entry("var"), dir_entry("var/cache"), opaque_entry("var/cache"), file_entry("var/cache/fresh", b"f"),
      dir_entry("usr"), dir_entry("usr/bin"), file_entry("usr/bin/other", b"other\n"),
      hardlink_entry("usr/bin/second", "usr/bin/other")),
    L(whiteout_entry("usr/bin/alias"), dir_entry("opt"), file_entry("opt/a", b"a")),
]


def as_nobody(*args, env=None, timeout=120):
    """Run bin/<tool> as uid/gid 65534 with the system python."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
                "PYTHONPATH": SITE, **(env or {})}
    return subprocess.run(
        [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", os.path.join(BIN, args[0]), *map(str, args[1:])],
        capture_output=True, text=True, timeout=timeout, cwd="/", env=full_env)


def unpacked_by_nobody(ref, workdir):
    plan = as_nobody("tosi-resolve", "--workdir", workdir, ref).stdout
    proc = subprocess.run(
        [shutil.which("setpriv"), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c",
         f"/usr/bin/python3 {BIN}/tosi-fetch | /usr/bin/python3 {BIN}/tosi-unpack"],
        input=plan, capture_output=True, text=True, timeout=120, cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": SITE, "HOME": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    return PlanReader(io.StringIO(proc.stdout)).layers()


@pytest.fixture
def home():
    """A directory of the user's own, as their home would be."""
    path = tempfile.mkdtemp(prefix="tosi-rootless-", dir="/tmp")
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o700)
    yield path
    for name in os.listdir(path):
        as_nobody("tosi-mount", "--unmount", os.path.join(path, name))
    shutil.rmtree(path)


@pytest.fixture
def ref(pusher, registry, repo_name):
    pusher.push_image(repo_name, "1", STACK)
    return f"{registry.host}/{repo_name}:1"


def no_owners(tree):
    return {path: {k: v for k, v in info.items() if k not in ("uid", "gid")}
            for path, info in without_root(tree).items()}


def model():
    return no_owners(layermodel.snapshot(layermodel.rootfs(STACK)))


def mount_as_nobody(ref, home, *flags):
    target = os.path.join(home, "rootfs")
    proc = as_nobody("tosi", "-image", ref, "-mount", target, "-workdir", os.path.join(home, "w"), *flags)
    assert proc.returncode == 0, proc.stderr
    holder = next(line for line in proc.stderr.splitlines() if "user namespace of process" in line)
    pid = int(holder.split("user namespace of process ")[1].split(":")[0])
    return target, pid


def test_plain_tosi_extracts_layers_in_the_user_form(ref, home):
    workdir = os.path.join(home, "w")
    proc = as_nobody("tosi", "-image", ref, "-workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("not running as root") == 1  # once, however many layers in parallel
    wd = Workdir(workdir)
    second = json.loads(as_nobody("tosi-resolve", "--workdir", workdir, ref).stdout.splitlines()[2])
    layer_dir = wd.overlay_path(second["digest"])
    with open(wd.form_path(second["digest"])) as f:
        assert f.read() == USER_FORM
    assert overlayfs.is_whiteout(os.lstat(os.path.join(layer_dir, "etc/gone")))
    assert os.getxattr(os.path.join(layer_dir, "var/cache"), overlayfs.USER_OPAQUE_XATTR) == b"y"
    assert overlayfs.OPAQUE_XATTR not in os.listxattr(os.path.join(layer_dir, "var/cache"))


def test_tosi_unpack_per_layer_without_root_records_the_user_form(ref, home):
    workdir = os.path.join(home, "w")
    layers = unpacked_by_nobody(ref, workdir)
    assert all(os.path.isfile(Workdir(workdir).form_path(layer["digest"])) for layer in layers)


def test_mount_without_root_shows_the_tree_root_mounts_and_the_model(ref, home, tool, tmp_path, mounts):
    target, pid = mount_as_nobody(ref, home)
    try:
        view = snapshot(f"/proc/{pid}/root{target}")
    finally:
        assert as_nobody("tosi-mount", "--unmount", target).returncode == 0
    root_target = str(tmp_path / "root-mnt")
    mounts.append(root_target)
    tool("tosi", "-image", ref, "-mount", root_target, "-workdir", tmp_path / "rw", check=0)
    assert _differences(no_owners(view), no_owners(snapshot(root_target))) == {}
    assert _differences(no_owners(view), model()) == {}


def test_mount_without_root_agrees_with_extractto_without_root(ref, home):
    flat = os.path.join(home, "flat")
    proc = as_nobody("tosi", "-image", ref, "-extractto", flat, "-workdir", os.path.join(home, "w"))
    assert proc.returncode == 0, proc.stderr
    target, pid = mount_as_nobody(ref, home, "-read-only")
    try:
        assert _differences(without_root(snapshot(f"/proc/{pid}/root{target}")),
                            without_root(snapshot(flat))) == {}
    finally:
        as_nobody("tosi-mount", "--unmount", target)


def test_writes_to_a_mount_without_root_go_to_the_upperdir(ref, home):
    target, pid = mount_as_nobody(ref, home)
    try:
        written = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c",
             f"echo -n hello > /proc/{pid}/root{target}/opt/written"], capture_output=True, text=True)
        assert written.returncode == 0, written.stderr
        assert open(os.path.join(target + ".upper", "opt", "written")).read() == "hello"
    finally:
        as_nobody("tosi-mount", "--unmount", target)


def test_unmount_clean_without_root_ends_the_holder_and_removes_what_tosi_made(ref, home):
    target, pid = mount_as_nobody(ref, home)
    proc = as_nobody("tosi-mount", "--unmount", "--clean", target)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert not any(os.path.exists(target + suffix) for suffix in ("", ".upper", ".work"))


def test_a_second_mount_without_root_at_the_same_place_is_refused(ref, home):
    target, pid = mount_as_nobody(ref, home)
    try:
        proc = as_nobody("tosi", "-image", ref, "-mount", target, "-workdir", os.path.join(home, "w"))
        assert proc.returncode != 0
        assert f"already mounted in the user namespace of process {pid}" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    finally:
        as_nobody("tosi-mount", "--unmount", target)


def test_unmount_of_nothing_without_root_is_one_clear_line(home):
    proc = as_nobody("tosi-mount", "--unmount", os.path.join(home, "nothing"))
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("is not a mount point") and len(proc.stderr.splitlines()) == 1


def test_mount_without_root_with_no_way_to_mount_says_what_is_needed(ref, home):
    empty_path = os.path.join(home, "bin")
    os.mkdir(empty_path)
    os.chown(empty_path, NOBODY, NOBODY)
    proc = as_nobody("tosi", "-image", ref, "-mount", os.path.join(home, "rootfs"), "-workdir",
                     os.path.join(home, "w"), env={"TOSI_ROOTLESS_MOUNT": "fuse", "PATH": empty_path})
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "fuse-overlayfs is not installed" in proc.stderr and "user namespaces" in proc.stderr
    assert not os.path.exists(os.path.join(home, "rootfs"))


def test_layers_extracted_by_root_are_not_mounted_without_root(ref, home, tool, tmp_path):
    # root's layer dirs copied to a workdir the user owns: the form, not the owner, is refused
    root_workdir = str(tmp_path / "rw")
    plan = tool("tosi-resolve", "--workdir", root_workdir, ref, check=0).stdout
    unpacked = tool("tosi-unpack", input=tool("tosi-fetch", input=plan, check=0).stdout, check=0).stdout
    workdir = os.path.join(home, "w")
    subprocess.run(["cp", "-a", root_workdir, workdir], check=True)
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", workdir], check=True)
    unpacked = unpacked.replace(root_workdir, workdir)
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", os.path.join(BIN, "tosi-mount"), os.path.join(home, "rootfs")],
        input=unpacked, capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": SITE, "HOME": "/nonexistent"})
    assert proc.returncode == 1
    assert "extracted by root" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_root_mounts_layers_in_the_user_form_with_userxattr(ref, home, mounts, tmp_path):
    workdir = os.path.join(home, "w")
    layers = unpacked_by_nobody(ref, workdir)
    # root may read the user's layer dirs (it owns nothing there, so it does not reuse
    # them through the workdir gate); the mechanism mounts them with userxattr.
    lowers = [os.path.join(Workdir(workdir).overlays, layer["link"]) for layer in layers][::-1]
    target = str(tmp_path / "mnt")
    os.mkdir(target)
    mounts.append(target)
    overlayfs.mount_overlay(target, lowers, read_only=True, userxattr=True)
    assert "userxattr" in overlayfs.mount_at(target)[1]
    assert _differences(no_owners(snapshot(target)), model()) == {}
    assert stat.S_ISDIR(os.lstat(os.path.join(target, "var/cache")).st_mode)
    assert os.listdir(os.path.join(target, "var/cache")) == ["fresh"]


def test_fuse_overlayfs_shows_the_user_form_as_the_model_and_unmount_undoes_it(ref, home, tmp_path):
    # /dev/fuse is root's here, so fuse-overlayfs runs as root, over the user's layer dirs.
    from tosi_tools import mount as mount_stage
    from tosi_tools import userns

    layers = unpacked_by_nobody(ref, os.path.join(home, "w"))
    lowers = [os.path.join(Workdir(os.path.join(home, "w")).overlays, layer["link"]) for layer in layers][::-1]
    target = str(tmp_path / "fuse")
    os.mkdir(target)
    userns.mount_fuse(target, lowers, None, None, ())
    try:
        assert overlayfs.mount_at(target)[0] == userns.FUSE_FSTYPE
        assert _differences(no_owners(snapshot(target)), model()) == {}
    finally:
        mount_stage.unmount_image(target)
    assert overlayfs.mount_at(target) is None
