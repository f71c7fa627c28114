"""bench/deep --quick runs in the suite so that it cannot rot (it times nothing here:
the depth ratios it prints are for a person, or CI, to judge on a quiet machine)."""

import pytest

from tests.test_bench_quick import QuickRun, assert_measured

QUICK_DEPTHS = [250, 1000]
IMAGES = [str(d) for d in QUICK_DEPTHS] + [f"{d}-named" for d in QUICK_DEPTHS]
COMMANDS = ["tosi-extractto-cold", "tosi-mount-cold", "tosi-mount-walk"]


@pytest.fixture(scope="module")
def bench_deep(tmp_path_factory):
    return QuickRun("deep", tmp_path_factory)


def test_bench_deep_quick_builds_one_deep_path_per_depth_with_and_without_its_directories(bench_deep):
    images = bench_deep.results["images"]
    assert sorted(images) == sorted(IMAGES)
    for key, image in images.items():
        named = key.endswith("-named")
        assert image["layers"] == 2 and image["variant"] == ("named" if named else "implicit")
        assert image["entries"] == 2 + (image["depth"] if named else 0)


@pytest.mark.parametrize("command", COMMANDS + ["tosi-version"])
def test_bench_deep_quick_measures_every_command_at_every_depth_on_tmpfs(bench_deep, command):
    assert bench_deep.results["filesystems"] == ["tmpfs"]
    assert_measured(bench_deep.rows(command), IMAGES, filesystems=("tmpfs",))


def test_bench_deep_quick_gives_the_deepest_over_the_shallowest_per_command(bench_deep):
    ratios = bench_deep.results["depthRatios"]
    assert {(r["variant"], r["fs"], r["command"]) for r in ratios} == {
        (v, "tmpfs", c) for v in ("implicit", "named") for c in COMMANDS}
    for r in ratios:
        assert (r["shallow"], r["deep"], r["linear"]) == (250, 1000, 4.0)
        assert r["ratio"] > 0 and r["met"] == (r["ratio"] <= r["goal"])
    out = bench_deep.proc.stdout
    assert "time at depth 1,000 / time at depth 250 (linear: 4x, quadratic: 16x" in out
    assert out.count("tosi-mount-walk") == 2
