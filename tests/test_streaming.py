"""Download streamed into extraction (issue 6): blobstream.FollowingReader reads a blob
behind its downloader, and the umbrella `tosi` unpacks each layer as its bytes arrive,
publishing it only once the downloader has verified the blob."""

import gzip
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from tests.conftest import BIN
from tests.support.faultproxy import Rule
from tests.support.images import file_entry, make_layer, sha256
from tests.support.plans import plan_records
from tosi_tools import blobstream, compression, pipeline
from tosi_tools.blobs import BlobDownload, Cancelled
from tosi_tools.cache import DROP_LAG, DROP_STEP, Workdir
from tosi_tools.errors import DigestMismatch, NotFound, UnsafeEntry
from tosi_tools.fetch import Fetcher
from tosi_tools.registry import RegistryClient

WAIT = 20  # seconds: generous bounds, so that a hang fails the test instead of the suite


def two_file_layer(first=200_000, second=300_000, compression=None):
    """A layer whose first file is complete well before the blob's end."""
    return make_layer([file_entry("first", os.urandom(first)), file_entry("second", os.urandom(second))],
                      compression=compression)


def local_download(tmp_path, data):
    """A BlobDownload this test drives itself, as the downloader would (partial file, counts)."""
    download = BlobDownload(sha256(data), len(data), str(tmp_path / "blob"))
    open(download.partial_path, "wb").close()
    return download


def deliver(download, data):
    with open(download.partial_path, "ab") as f:
        f.write(data)
    download._set_written(download.written + len(data))


def verdict(download, error=None):
    if error is None:
        os.replace(download.partial_path, download.final_path)
    download._finish(error)


def read_in_thread(reader, n=-1):
    out = {}

    def run():
        try:
            out["data"] = reader.read(n)
        except BaseException as exc:  # handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def pull_in_thread(options):
    out = {}

    def run():
        try:
            out["plan"] = pipeline.pull(options)
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, name="test pull")
    thread.start()
    return thread, out


def wait_until(predicate, what):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def proxied_reference(proxy, image):
    return f"{proxy.url.split('://', 1)[1]}/{image.repo}:{image.tag}"


def tosi_threads():
    return {t for t in threading.enumerate() if t.name.startswith(("tosi-fetch", "unpack", "decompress"))}


# ---------------------------------------------------------------- the reader alone

def test_the_reader_delivers_bytes_as_they_arrive_and_ends_only_at_the_verdict(tmp_path):
    data = os.urandom(3000)
    download = local_download(tmp_path, data)
    reader = blobstream.FollowingReader(download)
    deliver(download, data[:1000])
    assert reader.read(1000) == data[:1000]
    deliver(download, data[1000:])
    assert reader.read(5000) == data[1000:]
    thread, out = read_in_thread(reader, 10)
    thread.join(0.3)
    assert thread.is_alive(), "the end of the stream came before the download's verdict"
    verdict(download)
    thread.join(WAIT)
    assert out == {"data": b""}


def test_the_reader_raises_the_downloads_error_instead_of_ending(tmp_path):
    data = os.urandom(3000)
    download = local_download(tmp_path, data)
    reader = blobstream.FollowingReader(download)
    deliver(download, data)
    assert reader.read(3000) == data
    verdict(download, DigestMismatch("blob: content hashes to something else"))
    with pytest.raises(DigestMismatch, match="hashes to"):
        reader.read(1)


def test_a_reader_opened_after_the_rename_reads_the_final_file(tmp_path):
    data = os.urandom(2000)
    download = local_download(tmp_path, data)
    deliver(download, data)
    verdict(download)
    assert blobstream.following(download) is None  # verified: read the cached file itself
    assert blobstream.FollowingReader(download).read() == data


def resident_bytes(path):
    """How much of the file is in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def on_disk(path):
    """Whether `path` is on a filesystem whose pages can be dropped (tmpfs's cannot)."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", str(path)], check=True, capture_output=True,
                          text=True).stdout.strip()
    return kind not in ("tmpfs", "ramfs")


def test_the_reader_lets_the_kernel_drop_the_pages_of_the_blob_it_has_passed(tmp_path):
    assert on_disk(tmp_path)
    size = 64 << 20
    data = os.urandom(size)
    download = local_download(tmp_path, data)
    deliver(download, data)
    with open(download.partial_path, "rb") as f:
        os.fsync(f.fileno())  # clean pages: only dirty ones may not be dropped
    assert resident_bytes(download.partial_path) == size
    reader = blobstream.FollowingReader(download)
    read = 0
    while read < size:
        read += len(reader.read(1 << 20))
    assert resident_bytes(download.partial_path) <= DROP_LAG + DROP_STEP


def test_a_blob_under_the_drop_lag_keeps_its_pages(tmp_path):
    assert on_disk(tmp_path)
    data = os.urandom(DROP_LAG)
    download = local_download(tmp_path, data)
    deliver(download, data)
    with open(download.partial_path, "rb") as f:
        os.fsync(f.fileno())
    reader = blobstream.FollowingReader(download)
    read = 0
    while read < DROP_LAG:
        read += len(reader.read(1 << 20))
    assert resident_bytes(download.partial_path) == DROP_LAG


def test_interrupt_stops_a_read_blocked_on_a_silent_download(tmp_path):
    download = local_download(tmp_path, os.urandom(1000))
    reader = blobstream.FollowingReader(download)
    thread, out = read_in_thread(reader, 10)
    thread.join(0.2)
    assert thread.is_alive()
    reader.interrupt()
    thread.join(WAIT)
    assert isinstance(out.get("error"), Cancelled)


# ---------------------------------------------------------------- against the registry

def test_decompressing_a_followed_download_gives_the_blob_digest_and_the_diff_id(fault_proxy, pusher,
                                                                                 repo_name, workdir):
    layer = two_file_layer(first=600_000, second=900_000, compression="gzip")
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("throttle", path=layer.digest, rate=4 << 20))  # arrives over ~0.3 s
    image_record, layer_record = plan_records(fault_proxy.url, image, workdir)
    fetcher = Fetcher(Workdir(workdir), lambda record: RegistryClient(record["endpoint"]))
    with fetcher.start(image_record, [layer_record]) as run:
        download = run.layers[0].download
        blob_hash = hashlib.sha256()
        tar_hash = hashlib.sha256()  # fed by the decompression thread, as the extraction does
        passed = _Tee(blobstream.FollowingReader(download), blob_hash)
        with compression.open_layer(passed, layer.media_type, hasher=tar_hash) as tar:
            tar.drain()
        delivered_before_verdict = passed.before_done
        path = download.result(WAIT)
    with open(path, "rb") as f:
        cached = f.read()
    assert f"sha256:{blob_hash.hexdigest()}" == sha256(cached) == layer.digest
    assert f"sha256:{tar_hash.hexdigest()}" == sha256(gzip.decompress(cached)) \
        == json.loads(image.config)["rootfs"]["diff_ids"][0]
    assert delivered_before_verdict > 0


class _Tee:
    """Hashes what a stream hands out and counts what it gave before its download ended."""

    def __init__(self, reader, hasher):
        self.reader = reader
        self.hasher = hasher
        self.before_done = 0

    def read(self, n=-1):
        data = self.reader.read(n)
        if not self.reader._download.done:
            self.before_done += len(data)
        self.hasher.update(data)
        return data


@pytest.mark.parametrize("flat", [False, True], ids=["overlay", "extractto"])
def test_a_layer_unpacks_while_the_tail_of_its_blob_is_still_stalled(fault_proxy, pusher, repo_name,
                                                                     workdir, tmp_path, flat):
    layer = two_file_layer()
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("stall", path=layer.digest, after=len(layer.data) - 2000))  # until released
    target = tmp_path / "rootfs"
    options = pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir,
                                   extract_to=str(target) if flat else None)
    overlays = Workdir(workdir).overlays
    hexname = layer.digest.split(":", 1)[1]

    def first_file_out():
        if flat:
            return (target / "first").is_file() and (target / "first").stat().st_size == 200_000
        temps = [n for n in os.listdir(overlays) if n.startswith(f".tmp-{hexname}")] \
            if os.path.isdir(overlays) else []
        return any(os.path.getsize(os.path.join(overlays, t, "first")) == 200_000
                   for t in temps if os.path.isfile(os.path.join(overlays, t, "first")))

    thread, out = pull_in_thread(options)
    try:
        wait_until(lambda: first_file_out() or not thread.is_alive(), "the first file is extracted")
        assert thread.is_alive(), out
        assert not os.path.exists(Workdir(workdir).layer_path(layer.digest)), "the blob is already complete"
        assert not os.path.exists(os.path.join(overlays, hexname))
    finally:
        fault_proxy.stopping.set()
        thread.join(WAIT)
    assert "error" not in out
    image_record, (record,) = out["plan"]
    assert record["path"] == Workdir(workdir).layer_path(layer.digest)
    root = target if flat else record["overlay"]
    assert sorted(os.listdir(root)) == ["first", "second"]
    if flat:
        assert record["applied"] is True


def test_a_blob_corrupted_in_flight_leaves_no_overlay_and_no_cached_blob(fault_proxy, pusher, repo_name,
                                                                          workdir):
    layer = two_file_layer()
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=len(layer.data) - 20_000))  # in "second"
    options = pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir)
    with pytest.raises(DigestMismatch, match=re.escape(f"({layer.digest}): content hashes to")):
        pipeline.pull(options)
    overlays = Workdir(workdir).overlays
    assert [n for n in os.listdir(overlays) if not n.endswith(".lock")] == []
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))


def test_extractto_with_a_blob_corrupted_in_flight_says_the_target_is_partial(fault_proxy, pusher,
                                                                               repo_name, workdir,
                                                                               tmp_path):
    layers = [two_file_layer(), two_file_layer()]
    image = pusher.push_image(repo_name, "1", layers)
    # Late enough that layer 0 is in the target (sooner, the target is left empty and removed).
    fault_proxy.add(Rule("delay", path=layers[1].digest, seconds=1.0))
    fault_proxy.add(Rule("corrupt", path=layers[1].digest, at=len(layers[1].data) - 20_000))
    target = tmp_path / "rootfs"
    options = pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir,
                                   extract_to=str(target))
    with pytest.raises(DigestMismatch) as caught:
        pipeline.pull(options)
    message = str(caught.value)
    assert f"({layers[1].digest}): content hashes to" in message
    assert f"{target} is partially extracted" in message and "remove it" in message
    assert not os.path.exists(Workdir(workdir).layer_path(layers[1].digest))


@pytest.mark.parametrize("refusal", [
    Rule("status", status=416, header="Range", times=1),  # the downloader starts from zero again
    Rule("ignore_range"),  # the whole blob again, the bytes it has skipped
], ids=["416-restart", "range-ignored"])
def test_a_download_that_starts_over_after_a_drop_still_gives_the_right_tree(fault_proxy, pusher, repo_name,
                                                                             workdir, refusal):
    layer = two_file_layer(first=400_000)
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("drop", path=layer.digest, after=450_000, times=1))
    fault_proxy.add(refusal)
    _, (record,) = pipeline.pull(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir))
    assert fault_proxy.count("GET", layer.digest) >= 2
    with open(os.path.join(record["overlay"], "first"), "rb") as f:
        first = f.read()
    with open(os.path.join(record["overlay"], "second"), "rb") as f:
        second = f.read()
    assert sha256(first + second) == sha256(_file_data(layer, "first") + _file_data(layer, "second"))


def _file_data(layer, name):
    with tarfile.open(fileobj=io.BytesIO(layer.data)) as tar:
        return tar.extractfile(name).read()


def assert_fails_unhung(options, error_type):
    """The pull fails with `error_type` within WAIT, a download stalled meanwhile, and
    leaves none of its threads behind."""
    before = tosi_threads()
    thread, out = pull_in_thread(options)
    thread.join(WAIT)
    assert not thread.is_alive(), "the pull hung on the stalled download"
    assert isinstance(out.get("error"), error_type), out
    assert tosi_threads() <= before


def test_an_extraction_error_stops_a_flat_pull_whose_next_blob_is_stalled(fault_proxy, pusher, repo_name,
                                                                         workdir, tmp_path):
    bad = make_layer([file_entry("../escape", b"x")], compression=None)
    stalled = two_file_layer()
    image = pusher.push_image(repo_name, "1", [bad, stalled])
    fault_proxy.add(Rule("stall", path=stalled.digest, after=1000))  # until the proxy stops
    assert_fails_unhung(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir,
                                             extract_to=str(tmp_path / "rootfs")), UnsafeEntry)


@pytest.mark.parametrize("kind", [None, "gzip", "zstd"], ids=["tar", "gzip", "zstd"])
def test_a_download_error_stops_the_extraction_of_its_layer(fault_proxy, pusher, repo_name, workdir, kind):
    layer = two_file_layer(compression=kind)
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("status", path=layer.digest, status=404, header="Range"))
    fault_proxy.add(Rule("drop", path=layer.digest, after=250_000))
    before = tosi_threads()
    thread, out = pull_in_thread(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir))
    thread.join(WAIT)
    assert not thread.is_alive()
    assert isinstance(out.get("error"), NotFound), out  # the download's own error, not the unpacker's
    overlays = Workdir(workdir).overlays
    assert [n for n in os.listdir(overlays) if not n.endswith(".lock")] == []
    assert tosi_threads() <= before


@pytest.mark.parametrize("bad_index", [0, 1])
def test_an_extraction_error_cancels_the_other_downloads_of_an_overlay_pull(fault_proxy, pusher, repo_name,
                                                                           workdir, bad_index):
    bad = make_layer([file_entry("../escape", b"x")], compression=None)
    stalled = two_file_layer()
    layers = [bad, stalled] if bad_index == 0 else [stalled, bad]
    image = pusher.push_image(repo_name, "1", layers)
    fault_proxy.add(Rule("stall", path=stalled.digest, after=1000))  # until the proxy stops
    assert_fails_unhung(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir), UnsafeEntry)


def test_an_extraction_error_from_a_cached_blob_cancels_the_other_downloads_of_an_overlay_pull(
        fault_proxy, pusher, repo_name, workdir):
    # No download in flight to say the layer failed: its blob was cached by an earlier pull.
    bad = make_layer([file_entry("../escape", b"x")], compression=None)
    stalled = two_file_layer()
    earlier = pusher.push_image(repo_name, "earlier", [bad])
    with pytest.raises(UnsafeEntry):
        pipeline.pull(pipeline.PullOptions(proxied_reference(fault_proxy, earlier), workdir=workdir))
    assert os.path.isfile(Workdir(workdir).layer_path(bad.digest))
    image = pusher.push_image(repo_name, "1", [bad, stalled])
    fault_proxy.add(Rule("stall", path=stalled.digest, after=1000))  # until the proxy stops
    assert_fails_unhung(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir), UnsafeEntry)


def test_a_pull_fails_on_a_bad_blob_even_if_its_overlay_needs_no_extraction(fault_proxy, pusher, repo_name,
                                                                            workdir):
    layer = two_file_layer()
    image = pusher.push_image(repo_name, "1", [layer])
    options = pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir)
    pipeline.pull(options)
    os.unlink(Workdir(workdir).layer_path(layer.digest))  # the overlay stays
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=1000))
    with pytest.raises(DigestMismatch, match=re.escape(f"({layer.digest}): content hashes to")):
        pipeline.pull(options)
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))


def test_an_interrupt_stops_an_overlay_pull_whose_layer_is_half_extracted(fault_proxy, pusher, repo_name,
                                                                         workdir):
    layer = two_file_layer()
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("stall", path=layer.digest, after=250_000))  # until the proxy stops
    proc = subprocess.Popen([sys.executable, os.path.join(BIN, "tosi"), "-image",
                             proxied_reference(fault_proxy, image), "-workdir", workdir],
                            stderr=subprocess.PIPE, text=True)
    try:
        overlays = Workdir(workdir).overlays
        wait_until(lambda: proc.poll() is not None or any(
            os.path.isfile(os.path.join(overlays, n, "first"))
            for n in (os.listdir(overlays) if os.path.isdir(overlays) else ()) if n.startswith(".tmp-")),
            "the layer is being extracted")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert time.monotonic() - started < 5
    assert [n for n in os.listdir(overlays) if not n.endswith(".lock")] == []
