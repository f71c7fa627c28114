"""Names tosi makes or follows beside a target (M.upper, M.work, the mount point, the
-extractto/--into target, -saveconfig's file) in a world-writable directory, where
another local user (uid 65534 here) can create them first: they are never followed
through a symlink and never used unless they are ours (issue 10, point 2)."""

import io
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from tests.support.images import file_entry, make_layer
from tests.test_mount import build_unpacked, mount_tool, tree, TWO_LAYERS
from tosi_tools import mount as mount_stage
from tosi_tools import overlayfs
from tosi_tools.plan import PlanReader

NOBODY = 65534


def as_nobody(script):
    """Run a shell script as uid/gid 65534 (the other local user); returns CompletedProcess."""
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                           "--clear-groups", "sh", "-c", script],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def shared():
    """A fresh world-writable sticky directory in /tmp, as /tmp itself is."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="tosi-shared-")
    os.chmod(path, 0o1777)
    yield path
    for name in os.listdir(path):
        full = os.path.join(path, name)
        while overlayfs.mount_at(full):
            overlayfs.unmount(full)
    shutil.rmtree(path)


@pytest.fixture
def secret():
    """A root-only directory with a file in it: what a planted symlink points at."""
    path = tempfile.mkdtemp(prefix="tosi-secret-")
    os.chmod(path, 0o700)
    with open(os.path.join(path, "file"), "w") as f:
        f.write("root only\n")
    yield path
    shutil.rmtree(path)


def state_of(path):
    st = os.lstat(path)
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), sorted(os.listdir(path)),
            open(os.path.join(path, "file")).read())


def error_line(proc, status):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def unpacked(workdir):
    return build_unpacked(workdir, TWO_LAYERS)


@pytest.mark.parametrize("side", ["upper", "work"])
def test_symlinked_side_dir_is_refused_and_its_target_unchanged(tool, unpacked, shared, secret,
                                                                mounts, side):
    target = os.path.join(shared, "m")
    mounts.append(target)
    before = state_of(secret)
    assert as_nobody(f"ln -s {secret} {target}.{side}").returncode == 0
    line = error_line(mount_tool(tool, target, plan=unpacked), 2)
    assert f"{target}.{side} is a symlink" in line and "remove it" in line
    assert state_of(secret) == before
    assert overlayfs.mount_at(target) is None
    assert os.path.islink(f"{target}.{side}")


def test_planted_upper_dir_of_another_user_is_refused(tool, unpacked, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    assert as_nobody(f"mkdir -p {target}.upper/bin && echo evil > {target}.upper/bin/sh"
                     ).returncode == 0
    line = error_line(mount_tool(tool, target, plan=unpacked, check=None), 2)
    assert f"upperdir {target}.upper is owned by uid {NOBODY}" in line
    assert overlayfs.mount_at(target) is None


def test_planted_empty_upper_dir_of_another_user_is_refused_even_with_keep_upper(
        tool, unpacked, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    assert as_nobody(f"mkdir {target}.upper").returncode == 0
    line = error_line(mount_tool(tool, "--keep-upper", target, plan=unpacked), 2)
    assert f"{target}.upper is owned by uid {NOBODY}" in line
    assert overlayfs.mount_at(target) is None


def test_planted_work_dir_of_another_user_is_refused(tool, unpacked, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    assert as_nobody(f"mkdir {target}.work").returncode == 0
    line = error_line(mount_tool(tool, target, plan=unpacked), 2)
    assert f"{target}.work is owned by uid {NOBODY}" in line
    assert overlayfs.mount_at(target) is None


def test_symlinked_mount_point_is_refused(tool, unpacked, shared, secret, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    mounts.append(secret)
    assert as_nobody(f"ln -s {secret} {target}").returncode == 0
    line = error_line(mount_tool(tool, target, plan=unpacked), 2)
    assert f"mount point {target} is a symlink" in line
    assert overlayfs.mount_at(secret) is None and overlayfs.mount_at(target) is None
    assert not os.path.lexists(target + ".upper")


def test_mount_point_made_by_another_user_is_refused(tool, unpacked, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    assert as_nobody(f"mkdir {target}").returncode == 0
    line = error_line(mount_tool(tool, target, plan=unpacked), 2)
    assert f"mount point {target} is owned by uid {NOBODY}" in line
    assert overlayfs.mount_at(target) is None


def test_mount_point_below_a_directory_others_can_write_is_refused(tool, unpacked, tmp_path,
                                                                   mounts):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)  # writable by all, not sticky: anyone can swap its entries
    target = str(open_dir / "m")
    mounts.append(target)
    line = error_line(mount_tool(tool, target, plan=unpacked), 2)
    assert f"lies below {open_dir}, which others can write" in line
    assert os.listdir(open_dir) == []


def test_mount_in_a_shared_directory_makes_upper_and_work_ours_and_private(
        tool, unpacked, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    work = os.lstat(target + ".work")
    assert stat.S_ISDIR(work.st_mode) and work.st_uid == 0 and stat.S_IMODE(work.st_mode) == 0o700
    assert tree(target)["app/run"] == "app\n"


def test_tosi_mark_on_the_upperdir_does_not_show_through_the_mount(tool, unpacked, shared,
                                                                   mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    assert mount_stage.UPPER_XATTR in os.listxattr(target + ".upper")
    assert not [key for key in os.listxattr(target) if "tosi" in key]


@pytest.fixture
def nobody_root(workdir):
    """An unpacked plan whose top layer's root belongs to uid 65534, mode 0777: the
    upperdir takes them, so it is neither owned by root nor private."""
    plan = build_unpacked(workdir, TWO_LAYERS)
    top = PlanReader(io.StringIO(plan)).layers()[-1]["overlay"]
    os.chown(top, NOBODY, NOBODY)
    os.chmod(top, 0o777)
    return plan


def test_upper_taking_the_image_roots_owner_is_still_reused_with_keep_upper(
        tool, nobody_root, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    mount_tool(tool, target, plan=nobody_root, check=0)
    assert os.lstat(target + ".upper").st_uid == NOBODY
    with open(os.path.join(target, "note"), "w") as f:
        f.write("kept\n")
    mount_tool(tool, "--unmount", target, check=0)
    mount_tool(tool, "--keep-upper", target, plan=nobody_root, check=0)
    assert tree(target)["note"] == "kept\n"


def test_upper_made_for_another_mount_point_is_not_taken_for_ours(tool, nobody_root, shared,
                                                                  mounts):
    first, second = os.path.join(shared, "a"), os.path.join(shared, "b")
    mounts.extend([first, second])
    mount_tool(tool, first, plan=nobody_root, check=0)
    mount_tool(tool, "--unmount", first, check=0)
    # Its owner (the image root's) moves it beside another mount point.
    assert as_nobody(f"mv {first}.upper {second}.upper").returncode == 0
    line = error_line(mount_tool(tool, "--keep-upper", second, plan=nobody_root), 2)
    assert f"upperdir {second}.upper is owned by uid {NOBODY}" in line


def test_unmount_clean_removes_what_the_mount_made(tool, nobody_root, shared, mounts):
    target = os.path.join(shared, "m")
    mounts.append(target)
    mount_tool(tool, target, plan=nobody_root, check=0)
    open(os.path.join(target, "note"), "w").close()
    mount_tool(tool, "--unmount", "--clean", target, check=0)
    assert os.listdir(shared) == []


def test_unmount_clean_keeps_a_mount_point_tosi_did_not_make(tool, unpacked, shared, mounts):
    target = os.path.join(shared, "m")
    os.mkdir(target)
    mounts.append(target)
    mount_tool(tool, target, plan=unpacked, check=0)
    mount_tool(tool, "--unmount", "--clean", target, check=0)
    assert os.listdir(shared) == ["m"]


def test_unmount_clean_leaves_a_symlinked_upper_and_its_target_alone(tool, unpacked, shared,
                                                                     secret):
    target = os.path.join(shared, "m")
    before = state_of(secret)
    assert as_nobody(f"ln -s {secret} {target}.upper && mkdir {target}.work").returncode == 0
    line = error_line(mount_tool(tool, "--unmount", "--clean", target), 2)
    assert f"upperdir {target}.upper is a symlink" in line
    assert f"overlay work dir {target}.work is owned by uid {NOBODY}" in line
    assert state_of(secret) == before
    assert os.path.islink(target + ".upper") and os.path.isdir(target + ".work")


def test_read_only_mount_refuses_a_symlink_for_the_empty_lowerdir(tool, workdir, tmp_path,
                                                                  secret, mounts):
    plan = build_unpacked(workdir, [{"only": "1\n"}])
    os.symlink(secret, os.path.join(workdir, "overlays", mount_stage.EMPTY_LOWER))
    target = str(tmp_path / "m")
    mounts.append(target)
    line = error_line(mount_tool(tool, "--read-only", target, plan=plan), 2)
    assert "empty lowerdir" in line and "a symlink" in line
    assert overlayfs.mount_at(target) is None


# ---------------------------------------------------------------- --into / -extractto


@pytest.fixture
def small_image(pusher, registry, repo_name):
    pusher.push_image(repo_name, "1", [make_layer([file_entry("a", b"a\n")])])
    return f"{registry.host}/{repo_name}:1"


def test_extractto_a_planted_symlink_is_refused(tool, small_image, shared, secret, workdir):
    target = os.path.join(shared, "rootfs")
    before = state_of(secret)
    assert as_nobody(f"ln -s {secret} {target}").returncode == 0
    line = error_line(tool("tosi", "-image", small_image, "-extractto", target,
                           "-workdir", workdir), 2)
    assert line.startswith(f"tosi: error: -extractto {target}: is a symlink")
    assert state_of(secret) == before


def test_extractto_a_directory_made_by_another_user_is_refused(tool, small_image, shared,
                                                               workdir):
    target = os.path.join(shared, "rootfs")
    assert as_nobody(f"mkdir {target} && chmod 777 {target}").returncode == 0
    line = error_line(tool("tosi", "-image", small_image, "-extractto", target,
                           "-workdir", workdir), 2)
    assert f"is owned by uid {NOBODY}" in line
    assert os.listdir(target) == []


def test_into_existing_directory_of_ours_gets_its_mode_back_when_no_layer_names_the_root(
        tool, small_image, workdir, tmp_path):
    # 0700 while the layers go in (tests/test_setuid_reach.py), its own mode at the end.
    target = tmp_path / "rootfs"
    target.mkdir()
    os.chmod(target, 0o777)
    tool("tosi", "-image", small_image, "-extractto", target, "-workdir", workdir, check=0)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777
    assert (target / "a").read_text() == "a\n"


# ---------------------------------------------------------------- -saveconfig


def test_saveconfig_onto_a_planted_symlink_writes_nothing_through_it(tool, small_image, shared,
                                                                     secret, workdir):
    saved = os.path.join(shared, "config.json")
    before = state_of(secret)
    assert as_nobody(f"ln -s {secret}/file {saved}").returncode == 0
    tool("tosi", "-image", small_image, "-saveconfig", saved, "-workdir", workdir, check=0)
    assert state_of(secret) == before
    st = os.lstat(saved)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0  # the link was replaced by our file
    assert not [name for name in os.listdir(shared) if name.startswith(".tmp-")]


def test_saveconfig_in_a_directory_others_can_write_is_refused_before_any_work(
        tool, small_image, tmp_path, workdir):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    line = error_line(tool("tosi", "-image", small_image, "-saveconfig", open_dir / "c.json",
                           "-workdir", workdir), 2)
    assert "which others can write" in line
    assert os.listdir(open_dir) == [] and not os.path.exists(workdir)


# ---------------------------------------------------------------- races
#
# Between the first look at a mount point and mount(2) another user may act: make a
# parent that was missing (then tosi's mount point lies in their directory, where they
# can swap it for a symlink to a directory of root's). What they do is played here at
# the moment it hurts most, so the outcome is the same on every run.

def test_parent_another_user_makes_after_the_first_look_is_refused_and_nothing_is_mounted(
        unpacked, workdir, shared, secret, mounts, monkeypatch):
    parent = os.path.join(shared, "p")
    target = os.path.join(parent, "m")
    mounts.extend([target, secret])
    real_prepare = mount_stage._prepare_mount_point

    def attacker_acts_first(path):
        assert as_nobody(f"mkdir -m 0777 {parent}").returncode == 0
        made = real_prepare(path)
        assert as_nobody(f"mv {target} {parent}/away && ln -s {secret} {target}").returncode == 0
        return made

    monkeypatch.setattr(mount_stage, "_prepare_mount_point", attacker_acts_first)
    records = PlanReader(io.StringIO(unpacked)).layers()
    with pytest.raises(mount_stage.UnsafePath) as refused:
        mount_stage.mount_image({}, records, target, workdir=workdir)
    assert f"lies below {parent}, owned by uid {NOBODY}" in str(refused.value)
    assert overlayfs.mount_at(secret) is None
    assert overlayfs.mount_at(os.path.join(parent, "away")) is None
    assert os.listdir(secret) == ["file"]


@pytest.mark.parametrize("api", ["mount", "fsmount"])
def test_overlay_goes_onto_the_held_directory_whatever_its_name_names_now(unpacked, workdir,
                                                                         tmp_path, secret, mounts,
                                                                         api):
    checked = tmp_path / "checked"
    checked.mkdir()
    name = str(tmp_path / "name")
    os.symlink(secret, name)
    mounts.extend([str(checked), secret])
    lowers = [tmp_path / "top", tmp_path / "bottom"]
    for lower in lowers:
        lower.mkdir()
    (lowers[0] / "from-the-image").write_text("x")
    fd = os.open(checked, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        overlayfs.mount_overlay(name, [str(lower) for lower in lowers], read_only=True, api=api,
                                target_fd=fd)
    finally:
        os.close(fd)
    assert overlayfs.mount_at(str(checked))[0] == "overlay"
    assert overlayfs.mount_at(secret) is None
    assert os.listdir(checked) == ["from-the-image"]


def test_into_target_whose_parent_another_user_makes_after_the_check_is_refused(shared,
                                                                                monkeypatch):
    from tosi_tools import unpack

    parent = os.path.join(shared, "p")
    target = os.path.join(parent, "rootfs")
    real_check = unpack.check_into_target

    def attacker_acts_after_the_check(path, flag_name=None):
        real_check(path, flag_name)
        assert as_nobody(f"mkdir -m 0777 {parent}").returncode == 0

    monkeypatch.setattr(unpack, "check_into_target", attacker_acts_after_the_check)
    with pytest.raises(unpack.UnsafePath) as refused:
        unpack._open_into_target(target, 0o022)
    assert f"lies below {parent}, owned by uid {NOBODY}" in str(refused.value)
