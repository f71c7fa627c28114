"""The benchmarks' quick mode runs in the suite so that bench/run and bench/unpack cannot rot.

Each script runs once per module (small synthetic images, one run per command,
its own throwaway registry) and the tests read its JSON and output.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class QuickRun:
    def __init__(self, script, tmp_path_factory):
        out = tmp_path_factory.mktemp(f"bench-{script}")
        self.json_path = out / "results.json"
        start = time.monotonic()
        self.proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "bench", script), "--quick", "--json", str(self.json_path)],
            capture_output=True, text=True, timeout=180,
        )
        self.seconds = time.monotonic() - start
        assert self.proc.returncode == 0, f"bench/{script} --quick failed:\n{self.proc.stderr[-3000:]}"
        with open(self.json_path) as f:
            self.results = json.load(f)

    def rows(self, command):
        return [r for r in self.results["rows"] if r["command"] == command]

    def ratios(self, numerator, denominator):
        return [r for r in self.results["ratios"]
                if r["numerator"] == numerator and r["denominator"] == denominator]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    return QuickRun("run", tmp_path_factory)


@pytest.fixture(scope="module")
def bench_unpack(tmp_path_factory):
    return QuickRun("unpack", tmp_path_factory)


def assert_measured(rows, images, filesystems=("tmpfs", "ext4")):
    assert {(r["image"], r["fs"]) for r in rows} == {(i, fs) for i in images for fs in filesystems}
    for r in rows:
        assert r["status"] == "ok", r
        assert len(r["times"]) == 1 and r["times"][0] > 0
        assert r["min"] <= r["median"] <= r["max"]
        assert r["maxRssKiB"] > 0


def assert_measured_if_installed(rows, tools, images):
    if all(shutil.which(t) for t in tools):
        assert_measured(rows, images)
    else:
        assert rows and all(r["status"] == "not-installed" for r in rows), rows


# ---------------------------------------------------------------- bench/run

def test_bench_run_quick_stays_a_quick_variant(bench_run):
    # About 40 s on a quiet machine, 60-100 s under a loaded CI; a full run takes many minutes.
    assert bench_run.seconds < 300


def test_bench_run_quick_builds_the_three_images(bench_run):
    images = bench_run.results["images"]
    assert sorted(images) == ["a", "b", "c"]
    assert images["a"]["layers"] == 3
    assert images["b"]["layers"] == 2 and images["b"]["entries"] > 1000
    assert images["c"]["layers"] == 4 and images["c"]["blobBytes"] >= images["c"]["unpackedBytes"]


def test_bench_run_quick_measures_tar_and_curl_on_tmpfs_and_a_loop_mounted_ext4(bench_run):
    assert bench_run.results["filesystems"] == ["tmpfs", "ext4"]
    assert_measured(bench_run.rows("tar-xzf"), "abc")
    assert_measured_if_installed(bench_run.rows("curl"), ("curl",), "abc")


def test_bench_run_quick_measures_skopeo_with_umoci_when_installed(bench_run):
    for command in ("skopeo-umoci", "skopeo-copy", "umoci-unpack"):
        assert_measured_if_installed(bench_run.rows(command), ("skopeo", "umoci"), "abc")


def test_bench_run_quick_measures_podman_pull_twice_when_installed(bench_run):
    for command in ("podman-pull", "podman-pull-again"):
        assert_measured_if_installed(bench_run.rows(command), ("podman",), "abc")


@pytest.mark.parametrize("command", ["tosi-extractto-cold", "tosi-extractto-warm",
                                     "tosi-mount-warm", "tosi-mount-cold", "tosi-version"])
def test_bench_run_quick_measures_tosi(bench_run, command):
    assert_measured(bench_run.rows(command), "abc")


def test_bench_run_quick_computes_every_goal_ratio(bench_run):
    for numerator, denominator, goal in [
        ("tosi-extractto-cold", "tar-xzf", {"a": 0.8, "b": 1.1, "c": 0.8}),
        ("tosi-extractto-cold", "skopeo-umoci", 0.35),
        ("tosi-extractto-cold", "podman-pull", 0.6),
        ("tosi-mount-warm", "tosi-extractto-cold", 0.1),
        ("tosi-mount-warm", "podman-pull-again", 3.0),
    ]:
        found = [r for r in bench_run.ratios(numerator, denominator) if not r["label"].startswith("stretch")]
        assert len(found) == 6, (numerator, denominator)
        for r in found:
            assert r["goal"] == (goal[r["image"]] if isinstance(goal, dict) else goal)
            rows = {x["status"] for x in bench_run.results["rows"] if x["image"] == r["image"]
                    and x["fs"] == r["fs"] and x["command"] in (numerator, denominator)}
            if rows == {"ok"}:
                assert r["ratio"] > 0 and r["met"] == (r["ratio"] <= r["goal"])
            else:
                assert r["ratio"] is None and r["met"] is None


def test_bench_run_quick_checks_tosi_peak_rss_on_the_random_image(bench_run):
    (tmpfs, ext4) = [r for r in bench_run.results["rss"] if r["image"] == "c"]
    assert tmpfs["limitMiB"] == ext4["limitMiB"] == 100
    assert 10 < tmpfs["peakMiB"] < 1000


def test_bench_run_quick_prints_a_table_with_ratios(bench_run):
    out = bench_run.proc.stdout
    for heading in ("(a) rootfs", "(b) small-files", "(c) random", "tmpfs median", "ext4 median",
                    "ratio (tosi / other)", "-extractto cold / tar -xzf", "peak RSS of tosi"):
        assert heading in out
    assert re.search(r"tar -xzf of the layer blobs, in order +\d+\.\d+s", out)


def test_bench_run_quick_leaves_no_mount_no_loop_device_and_no_scratch_directory(bench_run):
    scratch = re.search(r"tmpfs at (\S+)/tmpfs", bench_run.proc.stderr).group(1)
    loop = re.search(r"ext4 \((/dev/loop\d+), direct I/O\) at " + re.escape(scratch), bench_run.proc.stderr).group(1)
    assert not os.path.exists(scratch)
    with open("/proc/self/mountinfo") as f:
        assert scratch not in f.read()
    backing = subprocess.run(["losetup", "--noheadings", "--output", "BACK-FILE", loop],
                             capture_output=True, text=True).stdout
    assert scratch not in backing


# ---------------------------------------------------------------- bench/unpack

def test_bench_unpack_quick_measures_tar_and_tosi_unpack(bench_unpack):
    assert sorted(bench_unpack.results["images"]) == ["a", "b"]
    assert bench_unpack.results["images"]["b"]["layers"] == 1
    assert_measured(bench_unpack.rows("tar-xzf"), "ab")
    assert_measured(bench_unpack.rows("tosi-unpack-into"), "ab")


def test_bench_unpack_quick_measures_umoci_when_installed(bench_unpack):
    assert_measured_if_installed(bench_unpack.rows("umoci-unpack"), ("skopeo", "umoci"), "ab")


def test_bench_unpack_quick_judges_ratios_and_rss_against_the_goals(bench_unpack):
    tar = bench_unpack.ratios("tosi-unpack-into", "tar-xzf")
    assert len(tar) == 4 and all(r["goal"] == 1.3 and r["ratio"] > 0 for r in tar)
    assert all(r["met"] == (r["ratio"] <= 1.3) for r in tar)
    rss = bench_unpack.results["rss"]
    assert len(rss) == 4 and all(r["limitMiB"] == 150 and r["met"] == (r["peakMiB"] < 150) for r in rss)
