"""bench/fetch --quick runs in the suite so the fetch benchmark cannot rot."""

import pytest

from tests.test_bench_quick import QuickRun, assert_measured


@pytest.fixture(scope="module")
def bench_fetch(tmp_path_factory):
    return QuickRun("fetch", tmp_path_factory)


def test_bench_fetch_quick_measures_tosi_fetch_and_curl_sequential_and_parallel(bench_fetch):
    for command in ("tosi-fetch", "curl", "curl-parallel"):
        assert_measured(bench_fetch.rows(command), ["c"])


def test_bench_fetch_quick_prints_the_ratio_to_parallel_curl_and_the_peak_rss(bench_fetch):
    ratios = bench_fetch.ratios("tosi-fetch", "curl-parallel")
    assert {r["fs"] for r in ratios} == {"tmpfs", "ext4"}
    assert all(r["ratio"] > 0 and r["goal"] == 1.25 for r in ratios)
    assert all(r["peakMiB"] > 0 for r in bench_fetch.results["rss"])
    assert "tosi-fetch --parallel 4 / parallel curl" in bench_fetch.proc.stdout
    assert "peak RSS of tosi-fetch" in bench_fetch.proc.stdout
