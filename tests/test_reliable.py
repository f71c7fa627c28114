"""Nothing lost, nothing half-trusted (issue 11): bytes corrupted on their way are
downloaded again from byte 0 (and a layer unpacked from them is unpacked again), what
the cache publishes is on disk before its name, and a corrupt cached blob is moved to
the quarantine and fetched again in the same run.

Faults come from tests/support/faultproxy.py in front of the real registry;
`Rule("corrupt", per_path=True, times=N)` flips one byte (at a random offset unless
`at=` says where) in the first N answers for every blob, as a chaos run would.
"""

import io
import itertools
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import BIN
from tests.support.faultproxy import Rule
from tests.support.images import DOCKER_LAYER_GZIP, Layer, file_entry, make_layer, sha256
from tests.support.plans import assert_cached, plan_text, random_layer
from tests.support.staging import snapshot
from tosi_tools import blobs, cache, pipeline
from tosi_tools.cache import Workdir
from tosi_tools.errors import DigestMismatch


def two_file_layer(compression=None, first=200_000, second=300_000):
    return make_layer([file_entry("first", os.urandom(first)), file_entry("second", os.urandom(second))],
                      compression=compression)


def proxied_reference(proxy, image):
    return f"{proxy.url.split('://', 1)[1]}/{image.repo}:{image.tag}"


def ranges_of(proxy, digest):
    return [r.headers.get("Range") for r in proxy.seen("GET", digest)]


@pytest.fixture
def image(pusher, repo_name):
    return pusher.push_image(repo_name, "v1", [random_layer(200_000), random_layer(500_000)])


def fetch(tool, proxy, image, workdir, check):
    return tool("tosi-fetch", "--workdir", workdir, input=plan_text(proxy.url, image, workdir), check=check)


# ---------------------------------------------------------------- tosi-fetch

def test_a_byte_flipped_in_transit_is_downloaded_again_from_byte_0(tool, fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=300_000, times=1))
    proc = fetch(tool, fault_proxy, image, workdir, check=0)
    assert proc.stderr.count("error") == 0
    assert ranges_of(fault_proxy, layer.digest) == [None, None]
    assert_cached(workdir, image.layers)
    assert not os.path.exists(Workdir(workdir).partial_path(layer.digest))


def test_a_mismatch_after_a_range_resume_restarts_from_byte_0(tool, fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("drop", path=layer.digest, after=250_000, times=1))
    fault_proxy.add(Rule("corrupt", path=layer.digest, header="Range", at=10_000, times=1))
    fetch(tool, fault_proxy, image, workdir, check=0)
    ranges = ranges_of(fault_proxy, layer.digest)
    assert len(ranges) == 3 and ranges[0] is None and ranges[1].startswith("bytes=")
    assert ranges[2] is None  # not resumed from the bytes before the bad ones
    assert_cached(workdir, image.layers)


def test_the_final_error_says_how_many_downloads_hashed_to_what(tool, fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=10, times=2))
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=20, times=3))
    proc = fetch(tool, fault_proxy, image, workdir, check=1)
    assert proc.stderr.count("\n") == 1
    found = re.search(r"giving up after 3 downloads \(2 hashed to (sha256:\w+), 1 to (sha256:\w+)\)",
                      proc.stderr)
    assert found and found[1] != found[2] and layer.digest not in found.groups()
    assert f"layer 1 ({layer.digest})" in proc.stderr
    assert fault_proxy.count("GET", layer.digest) == 3
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))


def test_a_flipped_config_or_manifest_is_fetched_again(tool, fault_proxy, image, workdir, tmp_path):
    fault_proxy.add(Rule("corrupt", path="/manifests/", at=30, times=1))
    fault_proxy.add(Rule("corrupt", path=f"/blobs/{sha256(image.config)}", at=5, times=1))
    tool("tosi", "-image", proxied_reference(fault_proxy, image), "-workdir", workdir,
         "-extractto", tmp_path / "root", check=0)
    assert fault_proxy.count("GET", f"/blobs/{sha256(image.config)}") == 2
    assert (tmp_path / "root" / "blob.bin").stat().st_size == 500_000


# ---------------------------------------------------------------- streamed into unpack

# Where the byte is flipped: the gzip decoder, the tar reader or only the digest notices.
FLIPS = {
    "tar-data": (None, lambda n: n - 20_000),  # in "second": found at the digest's verdict
    "tar-header": (None, lambda n: 20),  # the first header's name: its checksum fails first
    "gzip": ("gzip", lambda n: n // 2),
    "zstd": ("zstd", lambda n: n // 2),
}


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_a_layer_unpacked_from_flipped_bytes_is_unpacked_again_from_the_new_ones(
        fault_proxy, pusher, repo_name, workdir, tmp_path, flip):
    kind, where = FLIPS[flip]
    layer = two_file_layer(kind)
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=where(len(layer.data)), times=1))
    _, (record,) = pipeline.pull(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir))
    assert fault_proxy.count("GET", layer.digest) == 2
    extracted = {path: attrs for path, attrs in snapshot(record["overlay"]).items() if path != "."}
    assert extracted == reference_tree(layer, tmp_path / "reference")
    overlays = Workdir(workdir).overlays
    assert not [n for n in os.listdir(overlays) if n.startswith(".tmp-")]


def reference_tree(layer, target):
    """The snapshot of `layer` extracted as an overlay layer from its pushed bytes (its
    root's attributes left out: those are the layer directory's, not the layer's)."""
    from tosi_tools import layer as layer_mod

    os.makedirs(target)
    layer_mod.apply_layer(str(target), io.BytesIO(layer.data), layer.media_type, layer_mod.OVERLAY)
    return {path: attrs for path, attrs in snapshot(target).items() if path != "."}


def test_extractto_through_flipped_bytes_gives_the_exact_tree(tool, fault_proxy, pusher, repo_name,
                                                             workdir, tmp_path):
    layers = [two_file_layer("gzip"), make_layer([file_entry("first", b"replaced"),
                                                   file_entry("third", os.urandom(400_000))],
                                                  compression=None)]
    image = pusher.push_image(repo_name, "1", layers)
    # Late enough that layer 0 is in the target when layer 1's bytes turn out wrong.
    fault_proxy.add(Rule("delay", path=layers[1].digest, seconds=0.5, times=1))
    fault_proxy.add(Rule("corrupt", path=layers[1].digest, at=len(layers[1].data) - 1000, times=1))
    target = tmp_path / "rootfs"
    tool("tosi", "-image", proxied_reference(fault_proxy, image), "-workdir", workdir,
         "-extractto", target, check=0)
    assert fault_proxy.count("GET", layers[1].digest) == 2
    clean = tmp_path / "clean"
    tool("tosi", "-image", proxied_reference(fault_proxy, image), "-workdir", tmp_path / "w2",
         "-extractto", clean, check=0)
    assert snapshot(target) == snapshot(clean)
    assert (target / "first").read_bytes() == b"replaced"


@pytest.mark.parametrize("mode", ["extractto", "overlay"])
def test_a_pull_succeeds_when_every_blob_has_a_byte_flipped_twice(tool, fault_proxy, pusher, repo_name,
                                                                   workdir, tmp_path, mode):
    layers = [two_file_layer("gzip"), two_file_layer(None), two_file_layer("zstd")]
    image = pusher.push_image(repo_name, "1", layers)
    rule = fault_proxy.add(Rule("corrupt", path="/blobs/", per_path=True, times=2))
    flags = ["-extractto", tmp_path / "root"] if mode == "extractto" else []
    proc = tool("tosi", "-image", proxied_reference(fault_proxy, image), "-workdir", workdir, *flags,
                check=0)
    assert proc.returncode == 0
    assert fault_proxy.corrupted == rule.applied == 2 * (len(layers) + 1)
    assert_cached(workdir, layers)


def test_a_pull_fails_when_every_download_of_a_streamed_blob_is_corrupt(fault_proxy, pusher, repo_name,
                                                                        workdir):
    layer = two_file_layer("gzip")
    image = pusher.push_image(repo_name, "1", [layer])
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=len(layer.data) // 2))
    with pytest.raises(DigestMismatch, match=r"giving up after 3 downloads \(3 hashed to sha256:"):
        pipeline.pull(pipeline.PullOptions(proxied_reference(fault_proxy, image), workdir=workdir))
    assert fault_proxy.count("GET", layer.digest) == 3
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))


# ---------------------------------------------------------------- corrupt cached blobs

def corrupt_cached(workdir, layer, at):
    path = Workdir(workdir).layer_path(layer.digest)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


@pytest.mark.parametrize("kind", ["gzip", None], ids=["gzip-crc", "diffid"])
def test_a_corrupt_cached_blob_is_quarantined_and_fetched_again_in_the_same_run(
        tool, fault_proxy, pusher, repo_name, workdir, tmp_path, kind):
    layer = two_file_layer(kind)
    image = pusher.push_image(repo_name, "1", [layer])
    ref = proxied_reference(fault_proxy, image)
    fetch_only = tool("tosi-resolve", ref, "--workdir", workdir, check=0)
    tool("tosi-fetch", "--workdir", workdir, input=fetch_only.stdout, check=0)
    path = corrupt_cached(workdir, layer, len(layer.data) - 10_000)
    before = fault_proxy.count("GET", layer.digest)
    tool("tosi", "-image", ref, "-workdir", workdir, "-extractto", tmp_path / "root", check=0)
    assert fault_proxy.count("GET", layer.digest) == before + 1
    quarantined = os.path.join(Workdir(workdir).quarantine, os.path.basename(path))
    assert os.path.isfile(quarantined) and sha256(open(quarantined, "rb").read()) != layer.digest
    assert_cached(workdir, [layer])
    assert sorted(os.listdir(tmp_path / "root")) == ["first", "second"]


def test_tosi_unpack_moves_a_corrupt_cached_blob_aside_and_says_so(tool, fault_proxy, pusher, repo_name,
                                                                   workdir, tmp_path):
    layer = two_file_layer("gzip")
    image = pusher.push_image(repo_name, "1", [layer])
    plan = tool("tosi-resolve", proxied_reference(fault_proxy, image), "--workdir", workdir, check=0).stdout
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan, check=0).stdout
    path = corrupt_cached(workdir, layer, len(layer.data) // 2)
    proc = tool("tosi-unpack", "--workdir", workdir, input=plan, check=1)
    assert proc.stderr.count("\n") == 1 and "corrupt or truncated compressed data" in proc.stderr
    quarantined = os.path.join(Workdir(workdir).quarantine, os.path.basename(path))
    assert f"moved to {quarantined}, to be fetched again" in proc.stderr
    assert not os.path.exists(path)
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan, check=0).stdout
    tool("tosi-unpack", "--workdir", workdir, input=plan, check=0)


def test_a_bad_layer_whose_blob_matches_its_digest_stays_in_the_cache(tool, pusher, registry, repo_name,
                                                                      workdir, tmp_path):
    good = two_file_layer("gzip")
    bad = Layer(data=good.data[:len(good.data) // 2], media_type=DOCKER_LAYER_GZIP, diff_id=good.diff_id)
    image = pusher.push_image(repo_name, "1", [bad])
    proc = tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-workdir", workdir,
                "-extractto", tmp_path / "root", check=1)
    assert proc.stderr.count("\n") == 1
    assert "quarantine" not in proc.stderr
    assert os.path.exists(Workdir(workdir).layer_path(image.layers[0].digest))
    assert os.listdir(Workdir(workdir).quarantine) == []  # made empty (0700) with the workdir


# ---------------------------------------------------------------- durability

TRACED = "trace=fsync,fdatasync,syncfs,rename,renameat,renameat2,sync_file_range"


def traced_spans(argv, input_text, tmp_path):
    """Run a tool under strace; its successful fsync/syncfs/rename/sync_file_range calls
    with paths, in the order they started, as (call, start, end): where the call started
    and returned in the order of all the calls' starts and ends."""
    log = tmp_path / "strace.log"
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", TRACED, "-o", str(log), *argv], input=input_text,
                   text=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    # With -f, a call another thread interrupts is logged as "<unfinished ...>" with its
    # arguments, then "<... resumed>" with its result.
    spans, pending = [], {}
    for event, line in enumerate(log.read_text().splitlines()):
        pid, call = line.split(None, 1)
        if call.endswith("<unfinished ...>"):
            pending[pid] = (call, event)
        elif call.startswith("<..."):
            started = pending.pop(pid, None)
            if started is not None and re.search(r"= 0$", call):
                spans.append((started[0], started[1], event))
        elif re.search(r"= 0$", call):
            spans.append((call, event, event))
    return sorted(spans, key=lambda span: span[1])


def traced(argv, input_text, tmp_path):
    """Run a tool under strace; its fsync/syncfs/rename/sync_file_range calls, in the
    order they started, with paths."""
    return [call for call, _, _ in traced_spans(argv, input_text, tmp_path)]


def index_of(calls, pattern):
    for i, call in enumerate(calls):
        if re.search(pattern, call):
            return i
    raise AssertionError(f"no call matches {pattern!r} in {calls}")


def test_a_blob_is_fsynced_before_its_rename_and_its_directory_after(fault_proxy, image, workdir, tmp_path):
    layer_hex = image.layers[1].digest.split(":")[1]
    calls = traced([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir],
                   plan_text(fault_proxy.url, image, workdir), tmp_path)
    data = index_of(calls, rf"^fsync\(\d+<[^>]*/layers/{layer_hex}\.partial>")
    rename = index_of(calls, rf"^rename(at2?)?\(.*{layer_hex}\.partial.*/layers/{layer_hex}\"")
    directory = index_of(calls[rename:], r"^fsync\(\d+<[^>]*/layers>[) ]") + rename
    assert data < rename < directory


def test_manifests_and_configs_are_published_without_fsync_as_every_read_checks_them(fault_proxy, image, workdir,
                                                                                    tmp_path):
    ref = f"{fault_proxy.url.split('://', 1)[1]}/{image.repo}:{image.tag}"
    calls = traced([sys.executable, os.path.join(BIN, "tosi-resolve"), "--workdir", workdir, ref], "", tmp_path)
    config_hex = sha256(image.config).split(":")[1]
    manifest_hex = image.digest.split(":")[1]
    for published in (config_hex, manifest_hex):
        index_of(calls, rf"^rename(at2?)?\(.*/sha256:{published}\"")
        # (configs/v2:sha256:..., the config's "config" section saved for -saveconfig, is not
        # checked when read: it is synced.)
        assert not [c for c in calls if re.search(rf"^f(data)?sync\(\d+<[^>]*/(\.tmp-)?sha256:{published}", c)]


def test_an_overlay_dir_is_synced_before_its_rename_and_its_parent_after(fault_proxy, image, workdir,
                                                                         tmp_path):
    plan = subprocess.run([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir],
                          input=plan_text(fault_proxy.url, image, workdir), text=True, check=True,
                          capture_output=True).stdout
    layer_hex = image.layers[1].digest.split(":")[1]
    spans = traced_spans([sys.executable, os.path.join(BIN, "tosi-unpack"), "--workdir", workdir], plan, tmp_path)
    # Its last own writes: the records beside it, made after its files.
    written = max(end for call, _, end in spans
                  if re.search(rf"^rename(at2?)?\(.*/overlays/{layer_hex}\.(diffid|implicit)\"", call))
    published = next(start for call, start, _ in spans
                     if re.search(rf"^rename(at2?)?\(.*\.tmp-{layer_hex}-.*/overlays/{layer_hex}\"", call))
    # A syncfs of the overlays' filesystem, in whichever thread (layers that finish
    # together share one), that started after those writes and returned before the rename.
    assert any(re.search(r"^syncfs\(\d+<[^>]*/overlays[/>]", call) and written < start and end < published
               for call, start, end in spans), spans
    calls = [call for call, _, _ in spans]
    rename = index_of(calls, rf"^rename(at2?)?\(.*\.tmp-{layer_hex}-.*/overlays/{layer_hex}\"")
    index_of(calls[rename:], r"^fsync\(\d+<[^>]*/overlays>[) ]")


def test_a_blob_goes_to_disk_while_it_arrives_not_all_at_its_fsync(tool, pusher, repo_name, registry, workdir,
                                                                   tmp_path):
    # The fsync before the rename must not find the whole blob still to write: the disk
    # is started on every WRITEBACK_STEP bytes as they arrive (a cold pull's durability
    # cost, issue 11).
    step = blobs.WRITEBACK_STEP
    layer = make_layer([file_entry("big", os.urandom(3 * step))], compression=None)
    image = pusher.push_image(repo_name, "v1", [layer])
    layer_hex = layer.digest.split(":")[1]
    calls = traced([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir],
                   plan_text(registry.url, image, workdir), tmp_path)
    started = [call for call in calls
               if re.search(rf"^sync_file_range\(\d+<[^>]*/layers/{layer_hex}\.partial>", call)]
    ranges = [tuple(map(int, re.search(r">, (\d+), (\d+), SYNC_FILE_RANGE_WRITE\)", call).groups()))
              for call in started]
    # Each step of the blob as it was written, in order; the fsync is left the last one.
    assert [offset for offset, _ in ranges] == [0, *itertools.accumulate(n for _, n in ranges[:-1])]
    assert all(n >= step for _, n in ranges)
    assert 0 <= len(layer.data) - sum(n for _, n in ranges) < step
    assert calls.index(started[-1]) < index_of(calls, rf"^fsync\(\d+<[^>]*/layers/{layer_hex}\.partial>")


def test_a_big_file_of_an_overlay_layer_goes_to_disk_while_it_is_extracted(pusher, repo_name, registry,
                                                                          workdir, tmp_path):
    step = blobs.WRITEBACK_STEP
    layer = make_layer([file_entry("big", os.urandom(2 * step + 100_000))], compression=None)
    image = pusher.push_image(repo_name, "v1", [layer])
    plan = subprocess.run([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir],
                          input=plan_text(registry.url, image, workdir), text=True, check=True,
                          capture_output=True).stdout
    layer_hex = layer.digest.split(":")[1]
    calls = traced([sys.executable, os.path.join(BIN, "tosi-unpack"), "--workdir", workdir], plan, tmp_path)
    started = [call for call in calls
               if re.search(rf"^sync_file_range\(\d+<[^>]*/overlays/\.tmp-{layer_hex}-[^/>]*/big>", call)]
    assert len(started) == 2
    synced = index_of(calls, r"^syncfs\(")
    assert calls.index(started[-1]) < synced


# ---------------------------------------------------------------- how syncs are shared

def test_a_sync_asked_for_while_one_runs_waits_for_the_next_and_shares_it(monkeypatch, tmp_path):
    # Layers finishing together pay for one syncfs, but none is satisfied by a syncfs
    # that started before it asked: that one may have missed its last writes.
    gate, started = threading.Event(), []

    def slow_syncfs(fd, path):
        started.append(threading.current_thread().name)
        if len(started) == 1:
            gate.wait(10)

    monkeypatch.setattr(cache, "_syncfs_fd", slow_syncfs)
    first = threading.Thread(target=cache.sync_filesystem, args=(str(tmp_path),), name="first")
    first.start()
    deadline = time.monotonic() + 10
    while not started and time.monotonic() < deadline:
        time.sleep(0.001)
    assert started == ["first"]
    later = [threading.Thread(target=cache.sync_filesystem, args=(str(tmp_path),), name=f"later{i}")
             for i in range(3)]
    for thread in later:
        thread.start()
    time.sleep(0.1)
    assert started == ["first"] and all(thread.is_alive() for thread in later)
    gate.set()
    for thread in [first, *later]:
        thread.join(10)
    assert not any(thread.is_alive() for thread in [first, *later])
    assert len(started) == 2 and started[1].startswith("later")


def test_a_failed_sync_is_not_taken_for_done_by_those_waiting_for_it(monkeypatch, tmp_path):
    calls = []

    def failing_once(fd, path):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(cache, "_syncfs_fd", failing_once)
    with pytest.raises(OSError):
        cache.sync_filesystem(str(tmp_path))
    cache.sync_filesystem(str(tmp_path))
    assert len(calls) == 2


def test_writing_ahead_flushes_the_filesystem_while_held_and_stops_with_its_last_holder(monkeypatch, tmp_path):
    synced = []
    monkeypatch.setattr(cache, "WRITE_AHEAD_INTERVAL", 0.01)
    monkeypatch.setattr(cache, "_syncfs_fd", lambda fd, path: synced.append(os.fstat(fd).st_dev))
    with cache.writing_ahead(str(tmp_path)):
        with cache.writing_ahead(str(tmp_path)):  # a second layer: the same thread
            deadline = time.monotonic() + 10
            while len(synced) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [t.name for t in threading.enumerate()].count(cache.WRITE_AHEAD_THREAD) == 1
        assert len(synced) >= 3 and set(synced) == {os.stat(tmp_path).st_dev}
    count = len(synced)
    assert cache.WRITE_AHEAD_THREAD not in [t.name for t in threading.enumerate()]
    time.sleep(0.05)
    assert len(synced) == count
