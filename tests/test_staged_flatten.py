"""A flat extraction applies big layers above the first beside the target, in parallel
with the layers below, and moves them in when their turn comes (unpack._Stager,
tosi_tools.staging): the tree is the one applying them in order makes, whatever the
layer holds; what a move cannot make exactly is applied in the target instead.

Every case of tests/test_layout_equivalence.py also runs staged (Layouts.flat);
these are the mechanism's own: when it stages, what it leaves behind, how it fails.
They run on a disk filesystem (`disk_path`): into a tmpfs nothing is staged.
"""

import io
import logging
import os
import subprocess
import time

import pytest

from tests.support.images import (dir_entry, file_entry, hardlink_entry, make_layer, opaque_entry, symlink_entry,
                                  tar_bytes, whiteout_entry)
from tests.support.staging import snapshot
from tosi_tools import staging, unpack
from tosi_tools.cache import Workdir
from tosi_tools.errors import DigestMismatch, UnsafeEntry
from tosi_tools.plan import LayerRecord, new_layer_record


def L(*entries):
    return make_layer(raw_tar=tar_bytes(list(entries)))


def records_of(layers, diff_ids=None):
    return [LayerRecord(new_layer_record(i, layer.descriptor(),
                                         diffID=(diff_ids or {}).get(i, layer.diff_id)))
            for i, layer in enumerate(layers)]


def streams_of(layers):
    by_digest = {layer.digest: layer.data for layer in layers}
    return lambda record: io.BytesIO(by_digest[record.digest])


def extract(base, name, layers, staged, diff_ids=None, workdir=None):
    """The flat tree of `layers` in base/name: every layer above the first staged
    (TOSI_STAGE_MIN_BYTES=0) or none (off)."""
    target = base / name
    started = time.time_ns()
    os.environ["TOSI_STAGE_MIN_BYTES"] = "0" if staged else "off"
    try:
        list(unpack.apply_layers_into(target, records_of(layers, diff_ids),
                                      workdir or Workdir(str(base / "w")),
                                      open_stream=streams_of(layers), layer_count=len(layers),
                                      parallel=2))
    finally:
        del os.environ["TOSI_STAGE_MIN_BYTES"]
    # Directories the extraction changed have its time as mtime: two runs differ there.
    return {path: dict(info, mtime="now") if info.get("mtime", -1) >= started else info
            for path, info in snapshot(str(target), with_dir_mtimes=True).items()}


def moved_in(caplog):
    return sorted(r.getMessage().split(" ")[1] for r in caplog.records if r.getMessage().endswith("moved in"))


def applied_instead(caplog):
    return [r.getMessage() for r in caplog.records if "applying it in the target" in r.getMessage()]


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="tosi.unpack")


BASE = L(dir_entry("etc"), file_entry("etc/os-release", b"base"), dir_entry("usr"), dir_entry("usr/bin"),
         file_entry("usr/bin/old", b"old", mode=0o755), dir_entry("var"), dir_entry("var/cache"),
         file_entry("var/cache/junk", b"junk"), dir_entry("shared", mode=0o2775, gid=50))


def test_layers_above_the_first_are_moved_in_and_make_the_same_tree(disk_path, caplog):
    layers = [BASE,
              L(dir_entry("usr"), dir_entry("usr/bin"), file_entry("usr/bin/new", b"n", mode=0o755),
                dir_entry("opt", mode=0o750, uid=7), file_entry("opt/tool", b"t", uid=7)),
              L(dir_entry("etc", mode=0o700, mtime=1_000_000_000), file_entry("etc/os-release", b"top"))]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert moved_in(caplog) == []
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert moved_in(caplog) == ["1", "2"]


def test_whiteouts_and_opaque_directories_of_a_staged_layer_delete_lower_entries(disk_path, caplog):
    layers = [BASE,
              L(dir_entry("usr"), dir_entry("usr/bin"), whiteout_entry("usr/bin/old"),
                dir_entry("var"), dir_entry("var/cache"), opaque_entry("var/cache"),
                file_entry("var/cache/fresh", b"f"), whiteout_entry("etc"))]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert "usr/bin/old" not in flat and "var/cache/junk" not in flat and "etc" not in flat
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert moved_in(caplog) == ["1"]


def test_a_directory_the_layer_does_not_name_keeps_the_lower_attributes(disk_path, caplog):
    layers = [L(dir_entry("d", mode=0o711, uid=3, mtime=1_000_000_000), file_entry("d/f", b"f")),
              L(file_entry("d/g", b"g"), file_entry("new/sub/h", b"h"))]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert flat["d"]["mode"] & 0o7777 == 0o711 and flat["d"]["uid"] == 3
    assert moved_in(caplog) == ["1"]


def test_unnamed_directories_below_a_setgid_directory_are_made_in_the_target(disk_path, caplog):
    # Flat mode makes them with the setgid directory's group and bit; a move could not.
    layers = [BASE, L(file_entry("shared/new/f", b"f"))]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert flat["shared/new"]["gid"] == 50 and flat["shared/new"]["mode"] & 0o2000
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert moved_in(caplog) == [] and "setgid" in applied_instead(caplog)[0]


def test_a_hardlink_to_a_lower_layer_file_is_applied_in_the_target(disk_path, caplog):
    layers = [BASE, L(dir_entry("usr"), dir_entry("usr/bin"), hardlink_entry("usr/bin/alias", "usr/bin/old"))]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert moved_in(caplog) == [] and "links to a file of a lower layer" in applied_instead(caplog)[0]


def test_a_directory_over_a_lower_symlink_is_applied_in_the_target(disk_path, caplog):
    # Flat mode resolves the entries below it through the symlink: no rename can.
    layers = [L(dir_entry("usr"), dir_entry("usr/lib"), file_entry("usr/lib/a", b"a"),
                symlink_entry("lib", "usr/lib")),
              L(dir_entry("lib"), file_entry("lib/b", b"b"))]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert moved_in(caplog) == [] and "where the root has a non-directory" in applied_instead(caplog)[0]


@pytest.mark.parametrize("then", [dir_entry("link"), file_entry("link", b"x"), symlink_entry("link", "usr"),
                                  whiteout_entry("link")], ids=["directory", "file", "symlink", "whiteout"])
def test_entries_through_a_lower_symlink_the_layer_then_replaces_are_applied_in_the_target(then, disk_path,
                                                                                            caplog):
    # Flat mode put link/f where the symlink leads before the layer replaced the name; the
    # staged tree has it below the name, where a deletion or a non-directory hides the symlink.
    layers = [L(dir_entry("real"), symlink_entry("link", "real")), L(file_entry("link/f", b"f"), then)]
    flat = extract(disk_path, "flat", layers, staged=False)
    assert "real/f" in flat
    assert extract(disk_path, "staged", layers, staged=True) == flat
    assert moved_in(caplog) == [] and applied_instead(caplog)


def test_nothing_staged_is_left_in_the_workdir(disk_path):
    workdir = Workdir(str(disk_path / "w"))
    layers = [BASE, L(file_entry("a", b"a")), L(hardlink_entry("b", "etc/os-release"))]
    extract(disk_path, "staged", layers, staged=True, workdir=workdir)
    assert [n for n in os.listdir(workdir.overlays) if not n.endswith(".lock")] == []


def test_a_killed_runs_staged_layer_is_removed(disk_path):
    workdir = Workdir(str(disk_path / "w")).ensure()
    left = workdir.overlay_temp_path("sha256:" + "ab" * 32)
    os.makedirs(os.path.join(left, "half"))
    extract(disk_path, "staged", [BASE, L(file_entry("a", b"a"))], staged=True, workdir=workdir)
    assert not os.path.exists(left)


def test_a_staged_layer_that_fails_its_diff_id_fails_the_extraction_as_applied(disk_path):
    layers = [BASE, L(file_entry("a", b"a"))]
    wrong = "sha256:" + "0" * 64
    workdir = Workdir(str(disk_path / "w"))
    with pytest.raises(DigestMismatch, match="partially extracted"):
        extract(disk_path, "staged", layers, staged=True, diff_ids={1: wrong}, workdir=workdir)
    assert [n for n in os.listdir(workdir.overlays) if not n.endswith(".lock")] == []


def test_a_staged_layer_that_leaves_the_root_is_refused_as_applied(disk_path):
    layers = [BASE, L(file_entry("../escape", b"x"))]
    with pytest.raises(UnsafeEntry, match="escape"):
        extract(disk_path, "staged", layers, staged=True)
    assert not os.path.exists(disk_path / "escape")


def test_no_layer_is_staged_where_the_workdir_is_on_another_filesystem(disk_path, caplog):
    other = disk_path / "other"
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(other)], check=True)
    try:
        layers = [BASE, L(file_entry("a", b"a"))]
        flat = extract(disk_path, "flat", layers, staged=False)
        assert extract(disk_path, "staged", layers, staged=True, workdir=Workdir(str(other / "w"))) == flat
        assert moved_in(caplog) == []
    finally:
        subprocess.run(["umount", str(other)], check=True)


def test_no_layer_is_staged_into_a_target_in_memory(disk_path, caplog):
    # tmpfs: nothing waits on a disk, so a second extraction would only share the CPUs.
    memory = disk_path / "memory"
    memory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(memory)], check=True)
    try:
        layers = [BASE, L(file_entry("a", b"a"))]
        tree = extract(memory, "staged", layers, staged=True, workdir=Workdir(str(memory / "w")))
        assert moved_in(caplog) == [] and tree["a"]["sha256"]
    finally:
        subprocess.run(["umount", str(memory)], check=True)


def test_stage_min_bytes_that_is_not_a_number_is_a_usage_error(disk_path, monkeypatch):
    from tosi_tools.errors import UsageError

    monkeypatch.setenv("TOSI_STAGE_MIN_BYTES", "lots")
    with pytest.raises(UsageError, match="TOSI_STAGE_MIN_BYTES"):
        list(unpack.apply_layers_into(disk_path / "t", records_of([BASE, BASE]), Workdir(str(disk_path / "w")),
                                      open_stream=streams_of([BASE]), layer_count=2))


# ---------------------------------------------------------------- the move itself

def test_merge_changes_nothing_when_it_refuses(disk_path):
    stage, root = disk_path / "stage", disk_path / "root"
    (stage / "a").mkdir(parents=True)
    (stage / "a" / "f").write_text("new")
    (stage / "x").write_text("x")
    root.mkdir()
    (root / "a").write_text("a file")
    (root / "x").mkdir()
    before = snapshot(str(root), with_dir_mtimes=True)
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (stage, root)]
    try:
        with pytest.raises(staging.Unmergeable):
            staging.merge(fds[0], fds[1], [(staging.DELETE, ("x",))], [], False)
    finally:
        for fd in fds:
            os.close(fd)
    assert snapshot(str(root), with_dir_mtimes=True) == before


# ---------------------------------------------------------------- through tosi

def test_tosi_extractto_moves_a_staged_layer_in_from_a_registry(tool, pusher, registry, repo_name, disk_path):
    pusher.push_image(repo_name, "v1", [BASE, L(dir_entry("usr"), file_entry("usr/new", b"n"))])
    proc = tool("tosi", "-v", "1", "-image", f"{registry.host}/{repo_name}:v1", "-extractto", disk_path / "root",
                "-workdir", disk_path / "w", env={"TOSI_STAGE_MIN_BYTES": "0"}, check=0)
    assert "layer 1 " in proc.stderr and "moved in" in proc.stderr
    assert (disk_path / "root" / "usr" / "new").read_bytes() == b"n"
    assert (disk_path / "root" / "etc" / "os-release").read_bytes() == b"base"


def test_tosi_with_a_stage_min_bytes_that_is_not_a_number_is_one_line_and_exit_2(tool, pusher, registry,
                                                                                 repo_name, disk_path):
    pusher.push_image(repo_name, "v1", [BASE, L(file_entry("a", b"a"))])
    proc = tool("tosi", "-image", f"{registry.host}/{repo_name}:v1", "-extractto", disk_path / "root",
                "-workdir", disk_path / "w", env={"TOSI_STAGE_MIN_BYTES": "lots"}, check=2)
    assert proc.stderr.strip().splitlines() == [
        "tosi: error: TOSI_STAGE_MIN_BYTES='lots' is neither a number nor \"off\""]
