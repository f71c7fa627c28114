"""The workdir is a trust boundary: tosi runs as root with a default workdir in
world-writable /tmp, so another local user may have made the name first.

Every stage uses a workdir only when it (and each directory of it) is a real
directory owned by the invoking user that nobody else can write, below
directories only root or that user control (or sticky ones, like /tmp); a
workdir named only by a plan must also hold the marker .tosi-workdir; and a
reused blob, overlay dir or .diffid record must be this user's own. The
attacker's part runs as uid 65534 with the system python (the venv is not
theirs to run)."""

import json
import os
import shutil
import stat
import subprocess
import tempfile

import pytest

from tests.support.images import dir_entry, file_entry, make_layer
from tests.support.plans import parse_plan, records_text
from tosi_tools import overlayfs
from tosi_tools.cache import MARKER, Workdir

NOBODY = 65534


def as_nobody(script, *args):
    """Run a Python script as uid/gid 65534 with the system interpreter."""
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-c", script, *map(str, args)],
        capture_output=True, text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def shared_tmp():
    """A fresh world-writable sticky directory, as /tmp is."""
    path = tempfile.mkdtemp(prefix="tosi-trust-", dir="/tmp")
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def image(pusher, registry, repo_name):
    layers = [
        make_layer([dir_entry("bin"), file_entry("bin/sh", b"#!the image's shell\n", mode=0o755)]),
        make_layer([dir_entry("etc"), file_entry("etc/os-release", b"ID=image\n")]),
    ]
    pushed = pusher.push_image(repo_name, "1", layers)
    return pushed, f"{registry.host}/{repo_name}:1"


PLANT = r"""
import json, os, sys
root, layers = sys.argv[1], json.loads(sys.argv[2])
os.mkdir(root, 0o755)
for sub in ("layers", "configs", "manifests", "overlays"):
    os.mkdir(os.path.join(root, sub), 0o755)
for i, (digest, diff_id) in enumerate(layers):
    hexname = digest.split(":", 1)[1]
    with open(os.path.join(root, "layers", hexname), "wb") as f:
        f.write(b"junk, not the layer")
    layer_dir = os.path.join(root, "overlays", hexname)
    os.makedirs(os.path.join(layer_dir, "bin"))
    with open(os.path.join(layer_dir, "bin", "sh"), "w") as f:
        f.write("#!/bin/sh\necho planted\n")
    os.chmod(os.path.join(layer_dir, "bin", "sh"), 0o4755)
    with open(layer_dir + ".diffid", "w") as f:
        f.write(diff_id)
    short = "planted%d" % i
    os.symlink(hexname, os.path.join(root, "overlays", short))
    with open(layer_dir + ".link", "w") as f:
        f.write(short)
"""


def plant_workdir(root, pushed):
    layers = [[layer.digest, layer.diff_id] for layer in pushed.layers]
    as_nobody(PLANT, root, json.dumps(layers))
    assert os.stat(root).st_uid == NOBODY


def one_line_error(proc, prog="tosi"):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"{prog}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def owned_by_nobody(workdir):
    return (f"workdir {workdir} is owned by uid {NOBODY}, not by uid 0; another user may have "
            "made it: remove it, or choose another workdir")


# ---------------------------------------------------------------- a planted workdir

def test_a_planted_workdir_is_not_mounted(tool, image, shared_tmp, tmp_path, mounts):
    pushed, ref = image
    planted = os.path.join(shared_tmp, "tosi")
    plant_workdir(planted, pushed)
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = tool("tosi", "-image", ref, "-mount", target, "-workdir", planted)
    assert one_line_error(proc) == f"tosi: error: {owned_by_nobody(planted)} (-workdir DIR)\n"
    assert overlayfs.mount_at(target) is None and not os.path.lexists(target)


def test_a_planted_workdir_is_not_extracted(tool, image, shared_tmp, tmp_path):
    pushed, ref = image
    planted = os.path.join(shared_tmp, "tosi")
    plant_workdir(planted, pushed)
    target = tmp_path / "rootfs"
    proc = tool("tosi", "-image", ref, "-extractto", target, "-workdir", planted)
    assert one_line_error(proc) == f"tosi: error: {owned_by_nobody(planted)} (-workdir DIR)\n"
    assert not os.path.lexists(target)
    assert sorted(os.listdir(planted)) == ["configs", "layers", "manifests", "overlays"]


def test_a_planted_workdir_is_refused_by_the_stages(tool, image, shared_tmp):
    pushed, ref = image
    planted = os.path.join(shared_tmp, "tosi")
    plant_workdir(planted, pushed)
    proc = tool("tosi-resolve", "--workdir", planted, ref)
    assert one_line_error(proc, "tosi-resolve") == \
        f"tosi-resolve: error: {owned_by_nobody(planted)} (--workdir DIR)\n"


def test_a_workdir_that_is_a_symlink_to_another_users_directory_is_refused(
        tool, image, shared_tmp, tmp_path):
    _pushed, ref = image
    theirs = os.path.join(shared_tmp, "theirs")
    link = os.path.join(shared_tmp, "tosi")
    as_nobody("import os, sys; os.mkdir(sys.argv[1], 0o777); os.symlink(sys.argv[1], sys.argv[2])",
              theirs, link)
    proc = tool("tosi", "-image", ref, "-extractto", tmp_path / "rootfs", "-workdir", link)
    assert one_line_error(proc) == (
        f"tosi: error: workdir {link} is a symlink; another user may have made it: remove it, "
        "or choose another workdir (-workdir DIR)\n")
    assert os.listdir(theirs) == [] and not os.path.lexists(tmp_path / "rootfs")


def test_a_group_or_other_writable_directory_of_the_workdir_is_refused(tool, image, tmp_path):
    _pushed, ref = image
    workdir = tmp_path / "workdir"
    os.mkdir(workdir, 0o700)
    os.mkdir(workdir / "layers")
    os.chmod(workdir / "layers", 0o777)
    proc = tool("tosi", "-image", ref, "-extractto", tmp_path / "rootfs", "-workdir", workdir)
    assert one_line_error(proc) == (
        f"tosi: error: workdir directory {workdir}/layers is writable by others than you "
        "(mode 0777); make it private (chmod go-w), or choose another workdir (-workdir DIR)\n")
    assert os.listdir(workdir / "layers") == []


def test_a_workdir_below_a_directory_others_can_write_is_refused(tool, image, tmp_path):
    _pushed, ref = image
    open_dir = tempfile.mkdtemp(prefix="tosi-open-", dir="/tmp")
    try:
        os.chmod(open_dir, 0o777)  # writable by all and not sticky: anyone can rename our entries
        workdir = os.path.join(open_dir, "tosi")
        proc = tool("tosi", "-image", ref, "-extractto", tmp_path / "rootfs", "-workdir", workdir)
        assert one_line_error(proc) == (
            f"tosi: error: workdir {workdir} lies below {open_dir}, which others can write "
            "(mode 0777, not sticky); choose another workdir (-workdir DIR)\n")
        assert not os.path.lexists(workdir)
    finally:
        shutil.rmtree(open_dir)


def test_a_fresh_workdir_is_private(tool, image, shared_tmp, tmp_path):
    _pushed, ref = image
    workdir = os.path.join(shared_tmp, "tosi")
    tool("tosi", "-image", ref, "-extractto", tmp_path / "rootfs", "-workdir", workdir, check=0)
    for sub in ("", "layers", "configs", "manifests", "overlays", "quarantine"):
        st = os.lstat(os.path.join(workdir, sub))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700, sub
        assert st.st_uid == 0
    assert stat.S_ISREG(os.lstat(os.path.join(workdir, MARKER)).st_mode)


def test_a_fresh_separate_overlaydir_is_private(tool, image, tmp_path, mounts):
    _pushed, ref = image
    overlays = tmp_path / "ovl"
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", ref, "-mount", target, "-workdir", tmp_path / "w",
         "-overlaydir", overlays, check=0)
    assert stat.S_IMODE(os.stat(overlays).st_mode) == 0o700


def test_a_workdir_of_an_earlier_version_is_still_used(tool, image, tmp_path, mounts):
    """Earlier versions made the workdir 0755 and no marker: still ours, still used as is."""
    pushed, ref = image
    workdir = tmp_path / "workdir"
    tool("tosi", "-image", ref, "-extractto", tmp_path / "first", "-workdir", workdir, check=0)
    os.unlink(workdir / MARKER)
    shutil.rmtree(workdir / "quarantine")
    for sub in ("", "layers", "configs", "manifests", "overlays"):
        os.chmod(workdir / sub, 0o755)
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir, check=0)
    with open(os.path.join(target, "bin", "sh"), "rb") as f:
        assert f.read() == b"#!the image's shell\n"
    assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(workdir / "layers").st_mode) == 0o755
    assert os.path.isfile(workdir / MARKER)


# ---------------------------------------------------------------- the plan's workdir

def test_a_plan_naming_a_directory_that_is_not_a_tosi_workdir_is_refused_by_fetch(
        tool, image, tmp_path):
    _pushed, ref = image
    resolved = tool("tosi-resolve", "--workdir", tmp_path / "workdir", ref, check=0).stdout
    records = parse_plan(resolved)
    elsewhere = tmp_path / "not-a-workdir"  # root's own, like /etc
    os.mkdir(elsewhere, 0o755)
    records[0]["workdir"] = str(elsewhere)
    proc = tool("tosi-fetch", input=records_text(records))
    assert one_line_error(proc, "tosi-fetch") == (
        f"tosi-fetch: error: the plan's workdir {elsewhere} is not a tosi workdir of yours "
        f"(no {MARKER} of yours in it); pass --workdir DIR to choose the workdir yourself\n")
    assert os.listdir(elsewhere) == []


def test_a_plan_naming_a_directory_that_is_not_a_tosi_workdir_is_refused_by_unpack(
        tool, image, tmp_path):
    _pushed, ref = image
    resolved = tool("tosi-resolve", "--workdir", tmp_path / "workdir", ref, check=0).stdout
    fetched = tool("tosi-fetch", "--progress", "never", input=resolved, check=0).stdout
    records = parse_plan(fetched)
    elsewhere = tmp_path / "not-a-workdir"
    os.mkdir(elsewhere, 0o755)
    records[0]["workdir"] = str(elsewhere)
    proc = tool("tosi-unpack", input=records_text(records))
    assert "is not a tosi workdir of yours" in one_line_error(proc, "tosi-unpack")
    assert os.listdir(elsewhere) == []
    # Named by the user, the same directory is used.
    tool("tosi-unpack", "--workdir", tmp_path / "workdir", input=records_text(records), check=0)


def test_a_pipeline_uses_the_workdir_resolve_put_in_the_plan(tool, image, tmp_path):
    pushed, ref = image
    workdir = tmp_path / "workdir"
    resolved = tool("tosi-resolve", "--workdir", workdir, ref, check=0).stdout
    fetched = tool("tosi-fetch", "--progress", "never", input=resolved, check=0).stdout
    unpacked = tool("tosi-unpack", input=fetched, check=0).stdout
    tool("tosi-verify", input=fetched, check=0)
    for record in parse_plan(unpacked)[1:]:
        assert record["overlay"] == Workdir(str(workdir)).overlay_path(record["digest"])
    assert os.path.isfile(Workdir(str(workdir)).overlay_path(pushed.layers[0].digest) + "/bin/sh")


# ---------------------------------------------------------------- what is reused must be ours

def test_a_cached_blob_that_is_not_ours_is_refused(tool, image, tmp_path):
    pushed, ref = image
    workdir = tmp_path / "workdir"
    tool("tosi", "-image", ref, "-extractto", tmp_path / "first", "-workdir", workdir, check=0)
    blob = Workdir(str(workdir)).layer_path(pushed.layers[1].digest)
    os.chown(blob, NOBODY, NOBODY)
    proc = tool("tosi", "-image", ref, "-extractto", tmp_path / "second", "-workdir", workdir)
    assert f"{blob} is owned by uid {NOBODY}, not by uid 0, so tosi did not make it; remove it" \
        in one_line_error(proc)
    assert not os.path.lexists(tmp_path / "second" / "etc" / "os-release")


@pytest.mark.parametrize("what", ["overlay dir", "diffid record"])
def test_an_extracted_layer_that_is_not_ours_is_refused(tool, image, tmp_path, mounts, what):
    pushed, ref = image
    workdir = tmp_path / "workdir"
    first = str(tmp_path / "m1")
    mounts.append(first)
    tool("tosi", "-image", ref, "-mount", first, "-workdir", workdir, check=0)
    tool("tosi-mount", "--unmount", "--clean", first, check=0)
    path = Workdir(str(workdir)).overlay_path(pushed.layers[0].digest)
    if what == "diffid record":
        path += ".diffid"
    os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
    target = str(tmp_path / "m2")
    mounts.append(target)
    proc = tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir)
    assert f"{path} is owned by uid {NOBODY}, not by uid 0, so tosi did not make it" \
        in one_line_error(proc)
    assert overlayfs.mount_at(target) is None
