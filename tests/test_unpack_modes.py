"""tosi-unpack's two layouts, its plan output, its cache of per-layer directories and its failures."""

import json
import os
import re
import signal
import stat
import subprocess
import time

import pytest

from tests.support.images import (
    DOCKER_LAYER_GZIP, Layer, dir_entry, file_entry, make_layer, opaque_entry, sha256, tar_bytes,
    whiteout_entry,
)
from tests.support.staging import _tool, run_unpack, stage_image
from tosi_tools.digest import Digest
from tosi_tools.plan import PlanReader


@pytest.fixture
def stage(pusher, registry, repo_name, workdir):
    def _stage(layers):
        text, _ = stage_image(pusher, registry, repo_name, layers, workdir)
        return text
    return _stage


def records_of(stdout):
    reader = PlanReader(iter(stdout.splitlines()))
    return reader.image, reader.layers()


def one_error_line(proc, status):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tosi-unpack: error: "), proc.stderr
    return lines[0]


def overlays_of(workdir):
    return os.path.join(workdir, "overlays")


# ---------------------------------------------------------------- per layer

def test_per_layer_records_gain_overlay_dir_and_short_link(stage, workdir):
    layers = [make_layer([file_entry("a", b"a")]), make_layer([file_entry("b", b"b")])]
    proc = run_unpack(stage(layers), "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    _, records = records_of(proc.stdout)
    for record, layer in zip(records, layers):
        hexname = Digest(layer.digest).hex
        assert record["overlay"] == os.path.join(os.path.abspath(overlays_of(workdir)), hexname)
        assert re.fullmatch(r"[0-9a-z]{1,13}", record["link"])
        assert os.readlink(os.path.join(overlays_of(workdir), record["link"])) == hexname
        with open(record["overlay"] + ".link") as f:
            assert f.read().strip() == record["link"]
    assert os.listdir(records[0]["overlay"]) == ["a"]


def test_per_layer_whiteout_becomes_overlay_whiteout_device(stage, workdir):
    layers = [make_layer([file_entry("gone", b"x")]), make_layer([whiteout_entry("gone")])]
    proc = run_unpack(stage(layers), "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    _, records = records_of(proc.stdout)
    st = os.lstat(os.path.join(records[1]["overlay"], "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert os.listdir(records[1]["overlay"]) == ["gone"]


def test_per_layer_opaque_marker_becomes_opaque_xattr(stage, workdir):
    layers = [make_layer([dir_entry("d"), file_entry("d/old")]),
              make_layer([dir_entry("d"), file_entry("d/new"), opaque_entry("d")])]
    proc = run_unpack(stage(layers), "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    _, records = records_of(proc.stdout)
    top = os.path.join(records[1]["overlay"], "d")
    assert os.getxattr(top, "trusted.overlay.opaque") == b"y"
    assert os.listdir(top) == ["new"]


def test_second_run_reuses_extracted_layers(stage, workdir):
    plan = stage([make_layer([file_entry("a", b"a")])])
    first = run_unpack(plan, "--workdir", workdir)
    _, [record] = records_of(first.stdout)
    before = os.stat(record["overlay"])
    os.utime(os.path.join(record["overlay"], "a"), (0, 0))  # a re-extraction would restore it
    second = run_unpack(plan, "--workdir", workdir)
    assert second.returncode == 0, second.stderr
    _, [again] = records_of(second.stdout)
    assert again["overlay"] == record["overlay"] and again["link"] == record["link"]
    assert os.stat(again["overlay"]).st_ino == before.st_ino
    assert os.stat(os.path.join(again["overlay"], "a")).st_mtime == 0


def test_stale_temp_dir_of_a_killed_run_is_removed(stage, workdir):
    layer = make_layer([file_entry("a", b"a")])
    plan = stage([layer])
    stale = os.path.join(overlays_of(workdir), f".tmp-{Digest(layer.digest).hex}-dead")
    os.makedirs(os.path.join(stale, "half"))
    proc = run_unpack(plan, "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(stale)
    _, [record] = records_of(proc.stdout)
    assert os.listdir(record["overlay"]) == ["a"]


def test_killed_extraction_leaves_no_layer_a_later_run_trusts(stage, workdir):
    layer = make_layer([file_entry(f"f{i}", b"x" * 100) for i in range(30000)])
    plan = stage([layer])
    hexname = Digest(layer.digest).hex
    proc = subprocess.Popen(_tool("tosi-unpack") + ["--workdir", workdir], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    try:
        proc.stdin.write(plan)
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                n.startswith(f".tmp-{hexname}") for n in os.listdir(overlays_of(workdir))
                if os.path.isdir(overlays_of(workdir))):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "tosi-unpack finished before it could be killed"
    assert not os.path.exists(os.path.join(overlays_of(workdir), hexname))
    again = run_unpack(plan, "--workdir", workdir)
    assert again.returncode == 0, again.stderr
    _, [record] = records_of(again.stdout)
    assert len(os.listdir(record["overlay"])) == 30000
    assert [n for n in os.listdir(overlays_of(workdir)) if n.startswith(".tmp-")] == []


def test_overlaydir_flag_moves_the_layer_dirs(stage, workdir, tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    proc = run_unpack(stage([make_layer([file_entry("a")])]), "--workdir", workdir, "--overlaydir", elsewhere)
    assert proc.returncode == 0, proc.stderr
    _, [record] = records_of(proc.stdout)
    assert os.path.dirname(record["overlay"]) == elsewhere
    assert os.path.islink(os.path.join(elsewhere, record["link"]))


def test_parallel_extraction_keeps_plan_order(stage, workdir):
    layers = [make_layer([file_entry(f"layer{i}", bytes(i * 5000))]) for i in range(6)]
    proc = run_unpack(stage(layers), "--workdir", workdir, "--parallel", "3")
    assert proc.returncode == 0, proc.stderr
    _, records = records_of(proc.stdout)
    assert [r["index"] for r in records] == list(range(6))
    assert [os.listdir(r["overlay"]) for r in records] == [[f"layer{i}"] for i in range(6)]


def test_parallel_must_be_positive(tool, workdir):
    one_error_line(tool("tosi-unpack", "--workdir", workdir, "--parallel", "0", input=""), 2)


@pytest.mark.parametrize("value", ["65", "1e20", "1" + "0" * 20])
def test_parallel_is_at_most_64(tool, workdir, value):
    proc = tool("tosi-unpack", "--workdir", workdir, "--parallel", value, input="", timeout=20)
    one_error_line(proc, 2)
    assert "from 1 to 64" in proc.stderr


def test_repeated_layer_is_extracted_once(stage, workdir):
    a, b = make_layer([file_entry("a")]), make_layer([file_entry("b")])
    proc = run_unpack(stage([a, b, a]), "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    _, records = records_of(proc.stdout)
    assert records[0]["overlay"] == records[2]["overlay"] and records[0]["link"] == records[2]["link"]
    assert len([n for n in os.listdir(overlays_of(workdir)) if n.endswith(".link")]) == 2


# ---------------------------------------------------------------- --into

def test_into_sets_rootfs_and_marks_layers_applied(stage, workdir, tmp_path):
    target = str(tmp_path / "rootfs")
    proc = run_unpack(stage([make_layer([file_entry("a")]), make_layer([file_entry("b")])]),
                      "--workdir", workdir, "--into", target)
    assert proc.returncode == 0, proc.stderr
    image, records = records_of(proc.stdout)
    assert image["rootfs"] == target
    assert [r["applied"] for r in records] == [True, True]
    assert all("overlay" not in r for r in records)


def test_into_does_not_extract_into_the_overlay_cache(stage, workdir, tmp_path):
    proc = run_unpack(stage([make_layer([file_entry("a")])]), "--workdir", workdir, "--into", tmp_path / "rootfs")
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(overlays_of(workdir)) or os.listdir(overlays_of(workdir)) == []


def test_into_existing_empty_directory_is_fine(stage, workdir, tmp_path):
    target = tmp_path / "rootfs"
    target.mkdir()
    proc = run_unpack(stage([make_layer([file_entry("a")])]), "--workdir", workdir, "--into", target)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(target) == ["a"]


def test_into_non_empty_directory_is_usage_error_and_left_alone(stage, workdir, tmp_path):
    target = tmp_path / "rootfs"
    target.mkdir()
    (target / "mine").write_bytes(b"keep")
    proc = run_unpack(stage([make_layer([file_entry("a")])]), "--workdir", workdir, "--into", target)
    assert "not empty" in one_error_line(proc, 2)
    assert proc.stdout == ""
    assert os.listdir(target) == ["mine"] and (target / "mine").read_bytes() == b"keep"


def test_into_a_file_is_usage_error(tool, workdir, tmp_path):
    (tmp_path / "file").write_bytes(b"")
    line = one_error_line(tool("tosi-unpack", "--workdir", workdir, "--into", tmp_path / "file", input=""), 2)
    assert "not a directory" in line


def test_into_failure_midway_says_what_state_the_target_is_in(stage, workdir, tmp_path):
    target = str(tmp_path / "rootfs")
    layers = [make_layer([file_entry("a")]), make_layer([file_entry("b")]),
              make_layer([file_entry("../escape")]), make_layer([file_entry("d")])]
    line = one_error_line(run_unpack(stage(layers), "--workdir", workdir, "--into", target), 1)
    assert f"{target} is partially extracted (layers 0-1 applied); remove it" in line
    assert "layer 2" in line and "'../escape'" in line


def _break_layer_2(records, how):
    """Make layer record 2 (of 3) of a fetched plan fail the way `how` says."""
    if how == "missing-blob":
        os.unlink(records[3]["path"])
    elif how == "plan-cut-short":
        del records[3]
    elif how == "bad-digest":
        records[3]["digest"] = "sha256:" + "z" * 64
        del records[3]["path"]
    elif how == "unknown-media-type":
        records[3]["mediaType"] = "application/x-unknown"
    elif how == "bad-diff-id":
        records[3]["diffID"] = "md5:0"
    return records


@pytest.mark.parametrize("how", ["missing-blob", "unknown-media-type"])
def test_into_every_error_in_a_later_layer_says_the_target_is_partial(stage, workdir, tmp_path, how):
    target = str(tmp_path / "rootfs")
    plan = stage([make_layer([file_entry(name)]) for name in "abc"])
    records = _break_layer_2([json.loads(line) for line in plan.splitlines()], how)
    proc = run_unpack("".join(json.dumps(r) + "\n" for r in records), "--workdir", workdir, "--into", target)
    line = one_error_line(proc, 1)
    assert line.endswith(f"{target} is partially extracted (layers 0-1 applied); remove it"), line
    assert "internal error" not in line and sorted(os.listdir(target)) == ["a", "b"]


@pytest.mark.parametrize("how", ["plan-cut-short", "bad-digest", "bad-diff-id"])
def test_into_a_bad_later_layer_record_is_refused_before_anything_is_applied(stage, workdir, tmp_path, how):
    target = tmp_path / "rootfs"
    plan = stage([make_layer([file_entry(name)]) for name in "abc"])
    records = _break_layer_2([json.loads(line) for line in plan.splitlines()], how)
    proc = run_unpack("".join(json.dumps(r) + "\n" for r in records), "--workdir", workdir, "--into", target)
    line = one_error_line(proc, 2)
    assert "partially" not in line and "internal error" not in line
    assert not target.exists()


def test_into_an_error_before_anything_is_written_does_not_say_partial(stage, workdir, tmp_path):
    target = tmp_path / "rootfs"
    records = [json.loads(line) for line in stage([make_layer([file_entry("a")])]).splitlines()]
    os.unlink(records[1]["path"])
    proc = run_unpack("".join(json.dumps(r) + "\n" for r in records), "--workdir", workdir, "--into", target)
    line = one_error_line(proc, 1)
    assert "not in the cache" in line and "partially" not in line
    assert list(target.iterdir()) == []


# ---------------------------------------------------------------- bad blobs and plans

def _mislabelled(data, media_type):
    return Layer(data=data, media_type=media_type, diff_id=sha256(data))


def test_media_type_that_contradicts_the_magic_bytes_is_an_error(stage, workdir, tmp_path):
    zstd = make_layer([file_entry("a")], compression="zstd")
    layer = _mislabelled(zstd.data, DOCKER_LAYER_GZIP)
    line = one_error_line(run_unpack(stage([layer]), "--workdir", workdir, "--into", tmp_path / "r"), 1)
    assert "says gzip, but the blob is zstd-compressed" in line


def test_unsupported_compression_is_a_clear_error(stage, workdir, tmp_path):
    layer = _mislabelled(b"BZh91AY&SY" + bytes(100), "application/vnd.oci.image.layer.v1.tar+bzip2")
    line = one_error_line(run_unpack(stage([layer]), "--workdir", workdir, "--into", tmp_path / "r"), 1)
    assert "unsupported layer media type" in line and "bzip2" in line


def test_corrupt_gzip_is_a_clear_error(stage, workdir, tmp_path):
    good = make_layer([file_entry("a", os.urandom(50000))])
    layer = _mislabelled(good.data[:200] + bytes(2000), DOCKER_LAYER_GZIP)
    line = one_error_line(run_unpack(stage([layer]), "--workdir", workdir, "--into", tmp_path / "r"), 1)
    assert "corrupt or truncated" in line


def test_garbage_that_is_not_tar_is_a_clear_error(stage, workdir, tmp_path):
    layer = _mislabelled(b"this is not a tar archive at all " * 40, "application/vnd.oci.image.layer.v1.tar")
    line = one_error_line(run_unpack(stage([layer]), "--workdir", workdir, "--into", tmp_path / "r"), 1)
    assert "layer 0" in line and "tar" in line


def test_blob_missing_from_cache_is_reported(stage, workdir, tmp_path):
    records = [json.loads(line) for line in stage([make_layer([file_entry("a")])]).splitlines()]
    os.unlink(records[1]["path"])
    plan = "".join(json.dumps(r) + "\n" for r in records)
    line = one_error_line(run_unpack(plan, "--workdir", workdir), 1)
    assert "not in the cache" in line and "tosi-fetch" in line


def test_plan_cut_short_is_reported(stage, workdir):
    plan = stage([make_layer([file_entry("a")]), make_layer([file_entry("b")])])
    cut = "".join(plan.splitlines(keepends=True)[:2])
    line = one_error_line(run_unpack(cut, "--workdir", workdir), 2)
    assert "ended after 1 of 2 layers" in line


def test_whiteouts_never_appear_in_the_output(stage, workdir, tmp_path):
    layers = [make_layer([dir_entry("d"), file_entry("d/x")]),
              make_layer([whiteout_entry("d/x"), whiteout_entry("never-existed"), opaque_entry("d"),
                          file_entry("d/y")])]
    proc = run_unpack(stage(layers), "--workdir", workdir, "--into", tmp_path / "r")
    assert proc.returncode == 0, proc.stderr
    names = [n for _, dirs, files in os.walk(tmp_path / "r") for n in dirs + files]
    assert sorted(names) == ["d", "y"]


def test_tar_bytes_helper_round_trip_is_pax():
    # Sanity of the builder the corpus relies on: long names must survive as PAX records.
    data = tar_bytes([file_entry("x" * 300)])
    assert b"path=" + b"x" * 300 in data


def test_abandoned_temp_dir_of_another_layer_is_removed_too(stage, workdir):
    plan = stage([make_layer([file_entry("a", b"a")])])
    other = "ab" * 32
    stale = os.path.join(overlays_of(workdir), f".tmp-{other}-dead")
    os.makedirs(os.path.join(stale, "half"))
    proc = run_unpack(plan, "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(stale)


def test_concurrent_runs_share_one_extraction_per_layer(stage, workdir):
    plan = stage([make_layer([file_entry(f"f{i}", b"x" * 100) for i in range(3000)]),
                  make_layer([file_entry("top", b"t")])])
    procs = [subprocess.Popen(_tool("tosi-unpack") + ["--workdir", workdir], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(plan, timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    plans = [records_of(out)[1] for out, _ in outputs]
    assert plans[0] == plans[1] == plans[2]
    assert len(os.listdir(plans[0][0]["overlay"])) == 3000
    names = os.listdir(overlays_of(workdir))
    assert not [n for n in names if n.startswith(".tmp-")]
    assert len([n for n in names if os.path.islink(os.path.join(overlays_of(workdir), n))]) == 2


@pytest.mark.parametrize("per_layer", [False, True])
def test_zero_byte_blob_is_an_empty_layer(stage, workdir, tmp_path, per_layer):
    layer = _mislabelled(b"", "application/vnd.oci.image.layer.v1.tar")
    plan = stage([layer, make_layer([file_entry("a")])])
    args = ["--workdir", workdir] + ([] if per_layer else ["--into", tmp_path / "r"])
    proc = run_unpack(plan, *args)
    assert proc.returncode == 0, proc.stderr
    _, records = records_of(proc.stdout)
    if per_layer:
        assert os.listdir(records[0]["overlay"]) == []
    else:
        assert os.listdir(tmp_path / "r") == ["a"]
