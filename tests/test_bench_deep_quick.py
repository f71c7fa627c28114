"""bench/deep --quick runs in the suite so that it cannot rot (it times nothing here:
the depth ratios it prints are for a person, or CI, to judge on a quiet machine)."""

import pytest

from tests.test_bench_quick import QuickRun, assert_measured

QUICK_DEPTHS = ["250", "500", "1000"]


@pytest.fixture(scope="module")
def bench_deep(tmp_path_factory):
    return QuickRun("deep", tmp_path_factory)


def test_bench_deep_quick_builds_one_deep_path_per_depth(bench_deep):
    images = bench_deep.results["images"]
    assert sorted(images, key=int) == QUICK_DEPTHS
    assert all(i["layers"] == 2 and i["entries"] == 2 for i in images.values())


@pytest.mark.parametrize("command", ["tosi-extractto-cold", "tosi-mount-cold", "tosi-mount-walk",
                                     "tosi-version"])
def test_bench_deep_quick_measures_every_command_at_every_depth(bench_deep, command):
    assert_measured(bench_deep.rows(command), QUICK_DEPTHS)


def test_bench_deep_quick_gives_the_deepest_over_the_shallowest_per_command(bench_deep):
    ratios = bench_deep.results["depthRatios"]
    assert {(r["fs"], r["command"]) for r in ratios} == {
        (fs, c) for fs in ("tmpfs", "disk") for c in ("tosi-extractto-cold", "tosi-mount-cold", "tosi-mount-walk")}
    for r in ratios:
        assert (r["shallow"], r["deep"], r["linear"]) == (250, 1000, 4.0)
        assert r["ratio"] > 0 and r["met"] == (r["ratio"] <= r["goal"])
    out = bench_deep.proc.stdout
    assert "time at depth 1,000 / time at depth 250 (linear: 4x, quadratic: 16x" in out
    assert out.count("tosi-mount-walk") == 2
