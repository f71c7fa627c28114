"""An image's setuid files and device nodes are not handed to other local users by
default (issue 10, point 5): a mount other users can reach is nosuid,nodev (as
fstab's `user` option makes it), and an -extractto/--into tree they can reach that
received such files stays 0700 (as umoci's bundles and podman's storage are); an
option lifts either, with a one-line warning."""

import io
import os
import shutil
import stat
import tarfile

import pytest

from tests.support.images import dir_entry, file_entry, make_layer, special_entry
from tests.support.staging import run_unpack, stage_image
from tests.test_mount import build_unpacked, mount_tool
from tests.test_side_dirs import NOBODY, as_nobody, shared  # noqa: F401 (fixture)
from tosi_tools import mount as mount_stage
from tosi_tools.plan import PlanReader


def per_mount_options(target):
    """The per-mount (VFS) options /proc/self/mountinfo shows for the mount at `target`."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                found = set(fields[5].split(","))
    assert found is not None, f"{target} is not mounted"
    return found


@pytest.fixture
def setuid_image(workdir):
    """An unpacked plan (no registry needed) whose top layer holds `id` setuid root and
    `null`, a world-writable character device (1, 3)."""
    plan = build_unpacked(workdir, [{"base": "b\n"}, {"id": "", "null": ""}])
    top = PlanReader(io.StringIO(plan)).layers()[-1]["overlay"]
    shutil.copy("/usr/bin/id", os.path.join(top, "id"))
    os.chown(os.path.join(top, "id"), 0, 0)
    os.chmod(os.path.join(top, "id"), 0o4755)
    os.unlink(os.path.join(top, "null"))
    os.mknod(os.path.join(top, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(os.path.join(top, "null"), 0o666)
    return plan


def euid_of_setuid_id(target):
    proc = as_nobody(f"{target}/id -u")
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def nobody_can_write_the_device(target):
    return as_nobody(f"echo x > {target}/null").returncode == 0


@pytest.mark.parametrize("api", ["mount", "fsmount"])
def test_mount_reachable_by_others_is_nosuid_nodev(setuid_image, workdir, shared, mounts, api):
    target = os.path.join(shared, "m")
    mounts.append(target)
    records = PlanReader(io.StringIO(setuid_image)).layers()
    record = mount_stage.mount_image({}, records, target, workdir=workdir, api=api)
    assert record["options"] == ["nosuid", "nodev"]
    assert {"nosuid", "nodev"} <= per_mount_options(target)
    assert euid_of_setuid_id(target) == NOBODY
    assert not nobody_can_write_the_device(target)


@pytest.mark.parametrize("api", ["mount", "fsmount"])
def test_mount_options_reach_the_kernel_with_either_api(setuid_image, workdir, tmp_path, mounts, api):
    target = str(tmp_path / "m")
    mounts.append(target)
    records = PlanReader(io.StringIO(setuid_image)).layers()
    record = mount_stage.mount_image({}, records, target, workdir=workdir, api=api,
                                     mount_options=["noexec,noatime", "nodiratime"])
    assert record["options"] == ["noexec", "noatime", "nodiratime"]
    assert {"noexec", "noatime", "nodiratime"} <= per_mount_options(target)
    assert "nosuid" not in per_mount_options(target)  # only others reaching it imply that


def test_mount_only_root_can_reach_keeps_setuid_and_devices(tool, setuid_image, tmp_path,
                                                            mounts):
    target = str(tmp_path / "m")  # below pytest's 0700 directory
    mounts.append(target)
    proc = mount_tool(tool, target, plan=setuid_image, check=0)
    assert PlanReader(io.StringIO(proc.stdout)).image["mount"]["options"] == []
    assert not {"nosuid", "nodev"} & per_mount_options(target)
    assert proc.stderr == ""


def test_suid_and_dev_lift_the_default_with_one_warning_line(tool, setuid_image, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    proc = mount_tool(tool, "--mount-option", "suid", "--mount-option", "dev", target,
                      plan=setuid_image, check=0)
    assert proc.stderr.splitlines() == [
        f"tosi-mount: {target} is reachable by other users and mounted with suid,dev: the "
        "image's setuid files and devices work for them"]
    assert PlanReader(io.StringIO(proc.stdout)).image["mount"]["options"] == []
    assert euid_of_setuid_id(target) == 0
    assert nobody_can_write_the_device(target)


def test_suid_alone_keeps_nodev(tool, setuid_image, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    proc = mount_tool(tool, "--mount-option", "nosuid,suid", target, plan=setuid_image, check=0)
    assert "mounted with suid: the image's setuid files work for them" in proc.stderr
    assert "nodev" in per_mount_options(target) and "nosuid" not in per_mount_options(target)


@pytest.mark.parametrize("option,message", [
    ("bogus", "unknown mount option 'bogus'"),
    ("ro", "use --read-only"),
])
def test_bad_mount_option_is_a_usage_error_before_anything_is_made(tool, setuid_image, tmp_path,
                                                                   option, message):
    target = str(tmp_path / "m")
    proc = mount_tool(tool, "--mount-option", option, target, plan=setuid_image, check=2)
    assert message in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not os.path.lexists(target) and not os.path.lexists(target + ".upper")


def test_tosi_mount_option_reaches_the_mount(tool, pusher, registry, repo_name, shared, workdir,
                                             mounts):
    pusher.push_image(repo_name, "1", [make_layer([file_entry("a", b"a\n")])])
    target = os.path.join(shared, "m")
    mounts.append(target)
    proc = tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-workdir", workdir,
                "-mount", target, "-mount-option", "noexec", "-mount-option=suid", check=0)
    assert "mounted with suid" in proc.stderr
    options = per_mount_options(target)
    assert {"noexec", "nodev"} <= options and "nosuid" not in options


def test_tosi_mount_option_without_mount_is_a_usage_error(tool, tmp_path):
    proc = tool("tosi", "-image", "127.0.0.1:1/x:1", "-mount-option", "nosuid",
                "-extractto", tmp_path / "x", check=2)
    assert "-mount-option goes with -mount" in proc.stderr


# ---------------------------------------------------------------- -extractto / --into


@pytest.fixture
def stage(pusher, registry, repo_name, workdir):
    def _stage(*entries):
        text, _ = stage_image(pusher, registry, repo_name, [make_layer(list(entries))], workdir)
        return text
    return _stage


ROOT_751 = dir_entry(".", mode=0o751)
SETUID = file_entry("bin/su", b"#!/bin/sh\n", mode=0o4755)


def one_warning(proc):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tosi-unpack: "), proc.stderr
    return lines[0]


def mode_of(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("entry,said", [
    (SETUID, "1 setuid/setgid file"),
    (file_entry("bin/wall", b"x", mode=0o2755), "1 setuid/setgid file"),
    (special_entry("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666), "1 device node"),
    (special_entry("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660), "1 device node"),
])
def test_reachable_into_target_with_setuid_or_devices_stays_private(stage, shared, entry, said):
    target = os.path.join(shared, "rootfs")
    proc = run_unpack(stage(ROOT_751, entry), "--into", target)
    assert proc.returncode == 0, proc.stderr
    assert mode_of(target) == 0o700
    assert one_warning(proc) == (
        f"tosi-unpack: {target} is reachable by other users and received {said}: it stays "
        "0700 instead of the image's 0751; --keep-root-mode gives it "
        "the image's mode")


def test_reachable_into_target_without_them_gets_the_images_root_mode(stage, shared):
    target = os.path.join(shared, "rootfs")
    proc = run_unpack(stage(ROOT_751, file_entry("bin/sh", b"x", mode=0o755),
                            special_entry("run/fifo", tarfile.FIFOTYPE)), "--into", target)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert mode_of(target) == 0o751


def test_keep_root_mode_gives_a_reachable_target_the_images_mode(stage, shared):
    target = os.path.join(shared, "rootfs")
    proc = run_unpack(stage(ROOT_751, SETUID), "--into", target, "--keep-root-mode")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert mode_of(target) == 0o751
    assert mode_of(os.path.join(target, "bin/su")) == 0o4755


def test_into_target_only_root_can_reach_gets_the_images_mode(stage, tmp_path):
    target = str(tmp_path / "rootfs")
    proc = run_unpack(stage(ROOT_751, SETUID), "--into", target)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert mode_of(target) == 0o751


def test_image_root_others_cannot_search_needs_no_warning(stage, shared):
    target = os.path.join(shared, "rootfs")
    proc = run_unpack(stage(dir_entry(".", mode=0o700), SETUID), "--into", target)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert mode_of(target) == 0o700


def test_into_target_is_0700_while_the_layers_go_in(pusher, registry, repo_name, workdir,
                                                    shared):
    from tosi_tools import unpack

    _, records = stage_image(pusher, registry, repo_name,
                             [make_layer([ROOT_751, file_entry("a", b"a")])], workdir)
    layers = records[1:]
    target = os.path.join(shared, "rootfs")
    seen = []

    def open_stream(record):
        seen.append(mode_of(target))  # the layer is about to be read
        return open(record["path"], "rb")

    done = list(unpack.apply_layers_into(target, layers, workdir, open_stream=open_stream))
    assert len(done) == 1 and seen == [0o700]
    assert mode_of(target) == 0o751


def test_keep_root_mode_without_into_is_a_usage_error(stage):
    proc = run_unpack(stage(SETUID), "--keep-root-mode")
    assert proc.returncode == 2 and "--keep-root-mode goes with --into" in proc.stderr


def test_tosi_extractto_keeps_a_reachable_setuid_tree_private_unless_asked(
        tool, pusher, registry, repo_name, shared, workdir):
    pusher.push_image(repo_name, "1", [make_layer([ROOT_751, SETUID])])
    ref = f"{registry.host}/{repo_name}:1"
    private = os.path.join(shared, "private")
    proc = tool("tosi", "-image", ref, "-workdir", workdir, "-extractto", private, check=0)
    assert mode_of(private) == 0o700 and "-keep-root-mode" in proc.stderr
    kept = os.path.join(shared, "kept")
    proc = tool("tosi", "-image", ref, "-workdir", workdir, "-extractto", kept,
                "-keep-root-mode", check=0)
    assert mode_of(kept) == 0o751 and proc.stderr == ""
