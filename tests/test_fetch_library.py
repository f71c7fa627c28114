"""The fetch stage as a library (what a one-process pipeline builds on), against the real registry."""

import os
import threading
import time

import pytest

from tests.support.faultproxy import Rule
from tests.support.plans import assert_cached, plan_records, random_layer
from tosi_tools.blobs import Cancelled, Restarted
from tosi_tools.cache import Workdir
from tosi_tools.errors import DigestMismatch
from tosi_tools.fetch import NICE_STEP, Fetcher, fetch_plan
from tosi_tools.registry import RegistryClient


@pytest.fixture
def image(pusher, repo_name):
    return pusher.push_image(repo_name, "v1", [random_layer(100_000), random_layer(500_000)])


def fetcher_for(workdir, **kwargs):
    return Fetcher(Workdir(workdir), lambda image: RegistryClient(image["endpoint"]), **kwargs)


def test_a_download_can_be_read_behind_the_writer_before_it_is_verified(fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("stall", path=layer.digest, after=300_000))  # until released below
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    with fetcher_for(workdir).start(image_record, layers) as run:
        download = run.layers[1].download
        assert download.wait_for(300_000, timeout=20) >= 300_000
        assert not download.done
        with open(download.partial_path, "rb") as f:
            assert f.read(300_000) == layer.data[:300_000]
        fault_proxy.stopping.set()
        record = run.layers[1].result(timeout=20)
    assert record["path"] == download.final_path == Workdir(workdir).layer_path(layer.digest)
    assert download.written == download.size
    assert_cached(workdir, image.layers)


def test_waiting_past_the_end_raises_the_error_of_a_failed_download(fault_proxy, image, workdir):
    fault_proxy.add(Rule("corrupt", path=image.layers[1].digest, at=10))
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    with pytest.raises(DigestMismatch), fetcher_for(workdir).start(image_record, layers) as run:
        download = run.layers[1].download
        download.wait_for(download.size + 1, timeout=20)


def test_fetch_plan_yields_the_image_record_then_the_layers_in_order(fault_proxy, image, workdir):
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    records = list(fetch_plan(fetcher_for(workdir), image_record, layers))
    assert [r["type"] for r in records] == ["image", "layer", "layer"]
    assert records[0]["config"]["path"] == Workdir(workdir).config_path(records[0]["config"]["digest"])
    assert [r["index"] for r in records[1:]] == [0, 1]


def test_progress_reports_every_byte_of_every_blob(fault_proxy, image, workdir):
    seen = {}
    lock = threading.Lock()

    def progress(download, event, nbytes):
        with lock:
            if event in ("start", "advance"):
                seen[download.digest] = seen.get(download.digest, 0) + nbytes
    image_record, *layers = plan_records(fault_proxy.url, image, workdir, cache_config=True)
    list(fetch_plan(fetcher_for(workdir, progress=progress), image_record, layers))
    assert seen == {layer.digest: len(layer.data) for layer in image.layers}


def test_cancelling_stops_a_stalled_download_at_once_and_keeps_its_partial_file(fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("stall", path=layer.digest, after=200_000))
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    run = fetcher_for(workdir).start(image_record, layers)
    download = run.layers[1].download
    download.wait_for(200_000, timeout=20)
    started = time.monotonic()
    run.cancel()
    assert time.monotonic() - started < 5
    with pytest.raises(Cancelled):
        download.result(timeout=0)
    with open(download.partial_path, "rb") as f:
        assert f.read() == layer.data[:200_000]


def test_a_watched_download_never_goes_back_when_the_server_refuses_to_resume(fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("drop", path=layer.digest, after=200_000, times=1))
    fault_proxy.add(Rule("status", path=layer.digest, status=416, header="Range", times=1))
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    seen = []
    with fetcher_for(workdir).start(image_record, layers) as run:
        download = run.layers[1].download
        while not download.done:
            seen.append(download.wait_for(seen[-1] + 1 if seen else 1, timeout=20))
        run.layers[1].result()
    assert seen == sorted(seen) and download.restarts == 0
    assert fault_proxy.count("GET", layer.digest) == 3


def test_a_watched_download_with_wrong_bytes_starts_a_new_generation_its_old_watchers_hear_of(
        fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("delay", path=layer.digest, seconds=3, times=1))  # the watcher comes first
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=10, times=1))
    # Slow enough that the watcher sees the first bytes before the verdict on them.
    fault_proxy.add(Rule("throttle", path=layer.digest, rate=1_000_000, times=1))
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    with fetcher_for(workdir).start(image_record, layers) as run:
        download = run.layers[1].download
        download.wait_for(1, timeout=20, generation=0)
        with pytest.raises(Restarted, match="downloading it again from byte 0"):
            download.wait_for(download.size + 1, timeout=20, generation=0)
        assert download.generation == 1 and download.restarts == 1
        assert download.wait_for(download.size + 1, timeout=20, generation=1) == download.size
    assert_cached(workdir, image.layers)


def _nice_of_thread_downloading(download):
    """The nice value of the pool thread whose download is `download` (found by its stack)."""
    import sys

    for thread in threading.enumerate():
        frame = sys._current_frames().get(thread.ident)
        while frame is not None:
            if frame.f_code.co_name == "run" and frame.f_locals.get("download") is download:
                return os.getpriority(os.PRIO_PROCESS, thread.native_id)
            frame = frame.f_back
    raise AssertionError(f"no thread is downloading {download.what}")


def test_each_later_layer_downloads_at_a_lower_cpu_priority(fault_proxy, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", [random_layer(300_000) for _ in range(3)])
    for layer in image.layers:
        fault_proxy.add(Rule("stall", path=layer.digest, after=100_000))  # until released below
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    with fetcher_for(workdir).start(image_record, layers) as run:
        downloads = [handle.download for handle in run.layers]
        for download in downloads:
            assert download.wait_for(100_000, timeout=20) >= 100_000
        base = os.getpriority(os.PRIO_PROCESS, 0)
        nice = [_nice_of_thread_downloading(d) for d in downloads]
        fault_proxy.stopping.set()
        for handle in run.layers:
            handle.result(timeout=20)
    assert NICE_STEP > 0
    assert nice == [base, min(base + NICE_STEP, 19), min(base + 2 * NICE_STEP, 19)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the caller's own thread is left alone
