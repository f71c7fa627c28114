"""tosi-mount: real overlayfs mounts of layer dirs laid out as tosi-unpack leaves them."""

import base64
import ctypes
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import BIN
from tosi_tools import overlayfs
from tosi_tools.cache import Workdir
from tosi_tools.errors import MountError
from tosi_tools.plan import PlanReader, PlanWriter, new_image_record, new_layer_record


def short_link(digest):
    # The length of the original's short names (26 characters), so option strings are realistic.
    return base64.b32encode(bytes.fromhex(digest[7:])).decode()[:26]


def build_unpacked(workdir, layer_files):
    """Lay out overlays/<hex> + overlays/<short> -> <hex> per layer (bottom first) as
    tosi-unpack does, and return the plan text that describes them."""
    Workdir(workdir).ensure()  # private, with its marker, as the stages before tosi-mount leave it
    overlays = os.path.join(workdir, "overlays")
    layers = []
    for index, files in enumerate(layer_files):
        digest = "sha256:" + hashlib.sha256(f"{workdir}/{index}".encode()).hexdigest()
        path = os.path.join(overlays, digest[7:])
        os.makedirs(path)
        for name, data in files.items():
            full = os.path.join(path, name)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            if data is None:  # an overlayfs whiteout
                os.mknod(full, 0o600 | 0o020000, os.makedev(0, 0))
            else:
                with open(full, "w") as f:
                    f.write(data)
        link = short_link(digest)
        os.symlink(digest[7:], os.path.join(overlays, link))
        with open(path + ".link", "w") as f:
            f.write(link)
        layers.append(new_layer_record(
            index, {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
                    "size": 1}, overlay=path, link=link))
    out = io.StringIO()
    writer = PlanWriter(out)
    writer.write(new_image_record(reference="127.0.0.1:5000/test/hand:latest", workdir=workdir,
                                  layerCount=len(layers)))
    for layer in layers:
        writer.write(layer)
    return out.getvalue()


TWO_LAYERS = [
    {"etc/os-release": "base\n", "bin/sh": "shell\n", "tmp/gone": "lower\n"},
    {"etc/os-release": "top\n", "tmp/gone": None, "app/run": "app\n"},
]


@pytest.fixture
def unpacked(workdir):
    return build_unpacked(workdir, TWO_LAYERS)


def mount_tool(tool, *args, plan=None, cwd=None, check=None):
    if cwd is None:
        return tool("tosi-mount", *args, input=plan, check=check)
    proc = subprocess.run([sys.executable, os.path.join(BIN, "tosi-mount"), *args], input=plan,
                          capture_output=True, text=True, cwd=cwd, timeout=60)
    if check is not None:
        assert proc.returncode == check, proc.stderr
    return proc


def tree(root):
    found = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full) as f:
                found[os.path.relpath(full, root)] = f.read()
    return found


def test_mount_shows_topmost_layer_first_and_applies_whiteouts(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    assert tree(target) == {"etc/os-release": "top\n", "bin/sh": "shell\n", "app/run": "app\n"}
    assert overlayfs.mount_at(target)[0] == "overlay"


def test_lowerdirs_are_short_links_relative_to_the_overlay_dir(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    links = [layer["link"] for layer in PlanReader(io.StringIO(unpacked))]
    assert f"lowerdir={links[1]}:{links[0]}," in overlayfs.mount_at(target)[1]


def test_plan_on_stdout_gains_mount_point_upper_and_work(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = mount_tool(tool, target, plan=unpacked, check=0)
    reader = PlanReader(io.StringIO(proc.stdout))
    assert reader.image["mount"]["target"] == target
    assert reader.image["mount"]["upper"] == target + ".upper"
    assert reader.image["mount"]["work"] == target + ".work"
    assert reader.image["mount"]["readOnly"] is False
    assert reader.layers() == PlanReader(io.StringIO(unpacked)).layers()


def test_write_lands_in_the_upperdir(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    with open(os.path.join(target, "etc/os-release"), "w") as f:
        f.write("changed\n")
    with open(os.path.join(target + ".upper", "etc/os-release")) as f:
        assert f.read() == "changed\n"
    lower_hex = PlanReader(io.StringIO(unpacked)).layers()[1]["overlay"]
    with open(os.path.join(lower_hex, "etc/os-release")) as f:
        assert f.read() == "top\n"


def test_read_only_mount_refuses_writes_and_has_no_upperdir(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = mount_tool(tool, "--read-only", target, plan=unpacked, check=0)
    with pytest.raises(OSError) as caught:
        open(os.path.join(target, "new-file"), "w")
    assert caught.value.errno == errno.EROFS
    assert not os.path.exists(target + ".upper")
    assert "upperdir" not in overlayfs.mount_at(target)[1]
    mount = PlanReader(io.StringIO(proc.stdout)).image["mount"]
    assert mount["readOnly"] is True and mount["upper"] is None


def test_read_only_mount_of_a_single_layer_image(tool, workdir, tmp_path, mounts):
    plan = build_unpacked(workdir, [{"only": "one\n"}])
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, "--read-only", target, plan=plan, check=0)
    assert tree(target) == {"only": "one\n"}


def test_relative_mount_point_is_taken_from_the_current_directory(tool, unpacked, tmp_path, mounts):
    mounts.append(str(tmp_path / "rootfs"))
    proc = mount_tool(tool, "rootfs", plan=unpacked, cwd=str(tmp_path), check=0)
    mount = PlanReader(io.StringIO(proc.stdout)).image["mount"]
    assert mount["target"] == str(tmp_path / "rootfs")
    assert mount["upper"] == str(tmp_path / "rootfs.upper")
    assert overlayfs.mount_at(str(tmp_path / "rootfs"))


def test_trailing_slash_names_the_same_mount_point(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = mount_tool(tool, target + "/", plan=unpacked, check=0)
    assert PlanReader(io.StringIO(proc.stdout)).image["mount"]["upper"] == target + ".upper"
    assert os.path.isdir(target + ".upper") and not os.path.exists(target + "/.upper")
    mount_tool(tool, "--unmount", target + "/", check=0)
    assert not overlayfs.mount_at(target)


def test_missing_mount_point_is_created(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "not" / "yet")
    os.makedirs(os.path.dirname(target))
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    assert os.path.isfile(os.path.join(target, "app/run"))


def test_non_empty_mount_point_is_refused(tool, unpacked, tmp_path):
    target = tmp_path / "rootfs"
    target.mkdir()
    (target / "keep").write_text("mine")
    proc = mount_tool(tool, str(target), plan=unpacked, check=2)
    assert proc.stderr.strip() == f"tosi-mount: error: mount point {target} is not empty"
    assert proc.stdout == ""
    assert not os.path.exists(str(target) + ".upper")


def test_mount_point_holding_a_mount_is_refused(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    proc = mount_tool(tool, target, plan=unpacked, check=2)
    assert "is already a mount point" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_leftover_upperdir_is_refused_with_a_hint_about_clean(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    open(os.path.join(target, "note"), "w").close()
    mount_tool(tool, "--unmount", target, check=0)
    proc = mount_tool(tool, target, plan=unpacked, check=2)
    assert "--keep-upper" in proc.stderr and "--unmount --clean" in proc.stderr
    assert not overlayfs.mount_at(target)


def test_keep_upper_mounts_with_the_earlier_changes(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    with open(os.path.join(target, "note"), "w") as f:
        f.write("kept\n")
    mount_tool(tool, "--unmount", target, check=0)
    mount_tool(tool, "--keep-upper", target, plan=unpacked, check=0)
    assert tree(target)["note"] == "kept\n"


def test_remount_after_unmount_with_clean_starts_fresh(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    open(os.path.join(target, "note"), "w").close()
    mount_tool(tool, "--unmount", "--clean", target, check=0)
    mount_tool(tool, target, plan=unpacked, check=0)
    assert "note" not in os.listdir(target)
    assert tree(target)["app/run"] == "app\n"


def test_unmount_clean_removes_upper_work_and_the_mount_point(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    proc = mount_tool(tool, "--unmount", "--clean", target, check=0)
    assert proc.stdout == ""
    for path in (target, target + ".upper", target + ".work"):
        assert not os.path.exists(path), path


def test_unmount_without_clean_keeps_the_upperdir(tool, unpacked, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    open(os.path.join(target, "note"), "w").close()
    mount_tool(tool, "--unmount", target, check=0)
    assert not overlayfs.mount_at(target)
    assert os.listdir(target) == []
    assert os.listdir(target + ".upper") == ["note"]


def test_unmount_of_a_directory_that_is_not_mounted_is_an_error(tool, tmp_path):
    (tmp_path / "rootfs").mkdir()
    proc = mount_tool(tool, "--unmount", str(tmp_path / "rootfs"), check=1)
    assert proc.stderr.strip() == f"tosi-mount: error: {tmp_path / 'rootfs'} is not a mount point"


def test_unmount_refuses_a_mount_that_is_not_an_overlay(tool, tmp_path, mounts):
    target = tmp_path / "tmpfs"
    target.mkdir()
    mounts.append(str(target))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    proc = mount_tool(tool, "--unmount", str(target), check=1)
    assert "tmpfs mount, not an overlay" in proc.stderr
    assert overlayfs.mount_at(str(target))[0] == "tmpfs"


def test_lowerdir_list_longer_than_a_page_mounts_with_the_new_api(tool, workdir, tmp_path, mounts):
    count = 200
    plan = build_unpacked(workdir, [{f"layer{i:03d}": f"{i}\n", "top": f"{i}\n"}
                                    for i in range(count)])
    links = [layer["link"] for layer in PlanReader(io.StringIO(plan))]
    assert not overlayfs.fits_in_page(overlayfs.option_string(links[::-1], "/u", "/w"))
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=plan, check=0)
    view = tree(target)
    assert len(view) == count + 1 and view["top"] == f"{count - 1}\n"
    assert f"lowerdir+={links[-1]},lowerdir+={links[-2]}," in overlayfs.mount_at(target)[1]


def test_120_layer_image_mounts(tool, workdir, tmp_path, mounts):
    plan = build_unpacked(workdir, [{f"f{i}": str(i)} for i in range(120)])
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan=plan, check=0)
    assert sorted(os.listdir(target)) == sorted(f"f{i}" for i in range(120))


def test_plan_without_overlay_dirs_is_a_usage_error(tool, workdir, tmp_path):
    plan = "\n".join([
        json.dumps(new_image_record(workdir=workdir, layerCount=1)),
        json.dumps(new_layer_record(0, {"digest": "sha256:" + "a" * 64, "size": 1})),
    ]) + "\n"
    proc = mount_tool(tool, str(tmp_path / "rootfs"), plan=plan, check=2)
    assert "has no overlay dir" in proc.stderr and "tosi-unpack" in proc.stderr
    assert not os.path.exists(tmp_path / "rootfs")


def test_missing_overlay_dir_is_an_error_and_creates_nothing(tool, unpacked, workdir, tmp_path):
    shutil.rmtree(PlanReader(io.StringIO(unpacked)).layers()[0]["overlay"])
    proc = mount_tool(tool, str(tmp_path / "rootfs"), plan=unpacked, check=1)
    assert "is missing; run tosi-unpack again" in proc.stderr
    assert not os.path.exists(tmp_path / "rootfs")


def test_clean_without_unmount_is_a_usage_error(tool, tmp_path):
    proc = mount_tool(tool, "--clean", str(tmp_path / "rootfs"), check=2)
    assert proc.stderr.startswith("tosi-mount: error: --clean goes with --unmount")


def test_not_root_without_a_way_to_mount_is_a_clear_error(unpacked, tmp_path):
    # A world-readable copy of the layers, so only the missing privilege can fail;
    # no fuse-overlayfs, and user namespaces not chosen (tests/test_rootless.py mounts).
    shared = tempfile.mkdtemp(prefix="tosi-mount-nonroot-")
    try:
        os.chmod(shared, 0o755)
        plan = build_unpacked(os.path.join(shared, "workdir"), TWO_LAYERS)
        target = os.path.join(shared, "rootfs")
        proc = subprocess.run(
            [shutil.which("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
             sys.executable, os.path.join(BIN, "tosi-mount"), target],
            input=plan, capture_output=True, text=True, timeout=60,
            env={**os.environ, "HOME": "/nonexistent", "TOSI_ROOTLESS_MOUNT": "fuse", "PATH": "/nonexistent"})
        assert proc.returncode == 1, proc.stderr
        assert "without root needs user namespaces" in proc.stderr and "fuse-overlayfs" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1
        assert not os.path.exists(target) and not os.path.exists(target + ".upper")
    finally:
        shutil.rmtree(shared)


@pytest.mark.parametrize("api", ["mount", "fsmount"])
def test_upper_and_work_paths_with_comma_colon_and_space_mount(workdir, tmp_path, mounts, api):
    plan = build_unpacked(workdir, TWO_LAYERS)
    base = tmp_path / "odd, name:here"
    base.mkdir()
    target, upper, work = str(base / "mnt"), str(base / "u"), str(base / "w")
    for path in (target, upper, work):
        os.mkdir(path)
    mounts.append(target)
    links = [layer["link"] for layer in PlanReader(io.StringIO(plan))][::-1]
    assert overlayfs.mount_overlay(target, links, upper, work,
                                 relative_to=os.path.join(workdir, "overlays"), api=api) == api
    assert overlayfs.mount_at(target)[0] == "overlay"
    open(os.path.join(target, "new"), "w").close()
    assert os.listdir(upper) == ["new"]


def test_mount2_with_options_longer_than_a_page_says_why(tmp_path):
    lowers = ["x" * 100] * 50
    with pytest.raises(MountError) as caught:
        overlayfs.mount_overlay(str(tmp_path), lowers, api="mount")
    assert "more than mount(2) accepts in one page" in str(caught.value)


def test_mount_restores_the_current_directory_when_it_fails(tmp_path):
    before = os.getcwd()
    with pytest.raises(MountError):
        overlayfs.mount_overlay(str(tmp_path / "missing"), ["a", "b"], relative_to=str(tmp_path))
    assert os.getcwd() == before


def test_new_api_mounts_with_upper_and_work_paths_longer_than_fsconfig_takes(workdir, tmp_path,
                                                                              mounts):
    plan = build_unpacked(workdir, TWO_LAYERS)
    deep = tmp_path / ("d" * 120) / ("e" * 120)
    upper, work, target = str(deep / "upper"), str(deep / "work"), str(tmp_path / "mnt")
    for path in (upper, work, target):
        os.makedirs(path)
    assert len(upper) > overlayfs.FSCONFIG_MAX_STRING
    mounts.append(target)
    links = [layer["link"] for layer in PlanReader(io.StringIO(plan))][::-1]
    overlayfs.mount_overlay(target, links, upper, work, relative_to=os.path.join(workdir, "overlays"),
                          api="fsmount")
    open(os.path.join(target, "new"), "w").close()
    assert os.listdir(upper) == ["new"]


def test_unknown_architecture_says_why_the_new_mount_api_is_not_used(monkeypatch):
    monkeypatch.setattr(overlayfs.platform, "machine", lambda: "pdp11")
    assert "syscall numbers on pdp11" in overlayfs.new_api_unavailable_reason()


def test_a_layer_repeated_in_the_image_is_mounted_once(tool, workdir, tmp_path, mounts):
    records = [json.loads(line) for line in build_unpacked(workdir, [
        {"f": "bottom\n", "only-bottom": "x\n"}, {"f": "middle\n", "only-middle": "y\n"}]).splitlines()]
    records.append(dict(records[1], index=2))  # the bottom layer again, on top
    records[0]["layerCount"] = 3
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, target, plan="".join(json.dumps(r) + "\n" for r in records), check=0)
    assert tree(target) == {"f": "bottom\n", "only-bottom": "x\n", "only-middle": "y\n"}


def test_plan_without_workdir_finds_the_overlays_through_the_workdir_flag(tool, workdir, tmp_path,
                                                                           mounts):
    records = [json.loads(line) for line in build_unpacked(workdir, TWO_LAYERS).splitlines()]
    del records[0]["workdir"]
    for record in records[1:]:
        del record["overlay"]
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    mount_tool(tool, "--workdir", workdir, target,
               plan="".join(json.dumps(r) + "\n" for r in records), check=0)
    assert tree(target)["app/run"] == "app\n"


def failing_syscall(number, error):
    """A preexec_fn that makes syscall `number` fail with `error` in the child (a
    seccomp filter), so a test can show how tosi-mount copes with an older kernel."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    load_nr, jump_if_equal, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    program = (SockFilter * 4)(SockFilter(load_nr, 0, 0, 0), SockFilter(jump_if_equal, 0, 1, number),
                               SockFilter(ret, 0, 0, 0x00050000 | error),  # SECCOMP_RET_ERRNO
                               SockFilter(ret, 0, 0, 0x7FFF0000))  # SECCOMP_RET_ALLOW

    def install():
        libc = ctypes.CDLL(None, use_errno=True)
        fprog = SockFprog(len(program), program)
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
    return install


@pytest.fixture
def long_plan(workdir):
    plan = build_unpacked(workdir, [{f"f{i}": "x"} for i in range(200)])
    links = [layer["link"] for layer in PlanReader(io.StringIO(plan))]
    assert not overlayfs.fits_in_page(overlayfs.option_string(links, "/u", "/w"))
    return plan


def mount_on_older_kernel(target, plan, syscall_name, error):
    return subprocess.run(
        [sys.executable, os.path.join(BIN, "tosi-mount"), target], input=plan, capture_output=True,
        text=True, timeout=60,
        preexec_fn=failing_syscall(overlayfs._SYSCALL[syscall_name], error))


def test_kernel_without_the_new_mount_api_is_told_apart(long_plan, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = mount_on_older_kernel(target, long_plan, "fsopen", errno.ENOSYS)
    assert proc.returncode == 1
    assert f"more than mount(2) accepts in one page ({overlayfs.page_size()})" in proc.stderr
    assert "has no new mount API (fsopen, Linux 5.2 or newer)" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not os.path.exists(target) and not os.path.exists(target + ".upper")


def test_overlayfs_without_lowerdir_plus_is_told_apart(long_plan, tmp_path, mounts):
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = mount_on_older_kernel(target, long_plan, "fsconfig", errno.EINVAL)
    assert proc.returncode == 1
    assert 'has no "lowerdir+" option (Linux 6.8 or newer)' in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not os.path.exists(target)
