"""tosi-fetch against the real registry, through a fault-injecting proxy where failures are needed."""

import email.utils
import fcntl
import hashlib
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from urllib.parse import urljoin

import pytest
import requests

from tests.conftest import BIN
from tests.support.faultproxy import Rule
from tests.support.plans import (
    assert_cached, parse_plan, plan_records, plan_text, random_layer, records_text,
)
from tosi_tools.cache import Workdir


@pytest.fixture
def image(pusher, repo_name):
    """Three layers of 200-600 KiB: big enough to break a download in the middle."""
    layers = [random_layer(200_000), random_layer(400_000), random_layer(600_000)]
    return pusher.push_image(repo_name, "v1", layers)


def blob_path(image, layer):
    return f"/v2/{image.repo}/blobs/{layer.digest}"


def fetch(tool, fault_proxy, image, workdir, *flags, check=None, **plan_kwargs):
    return tool("tosi-fetch", "--workdir", workdir, *flags,
                input=plan_text(fault_proxy.url, image, workdir, **plan_kwargs), check=check)


def start_fetch(plan, workdir, **popen):
    """tosi-fetch in the background with `plan` already on its stdin."""
    proc = subprocess.Popen([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir],
                            stdin=subprocess.PIPE, text=True, **popen)
    proc.stdin.write(plan)
    proc.stdin.close()
    return proc


def layer_files(workdir):
    return sorted(os.listdir(Workdir(workdir).layers))


# ---------------------------------------------------------------- the plan and the cache

def test_fetch_puts_each_blob_in_layers_hex_and_writes_the_plan_with_paths(tool, fault_proxy, image, workdir):
    proc = fetch(tool, fault_proxy, image, workdir, check=0)
    records = parse_plan(proc.stdout)
    cache = Workdir(workdir)
    assert [r["type"] for r in records] == ["image", "layer", "layer", "layer"]
    assert [r["digest"] for r in records[1:]] == [layer.digest for layer in image.layers]
    assert [r["path"] for r in records[1:]] == [cache.layer_path(layer.digest) for layer in image.layers]
    assert all(r["path"] == os.path.join(workdir, "layers", r["digest"].split(":")[1]) for r in records[1:])
    assert_cached(workdir, image.layers)


def test_fetch_downloads_a_missing_config_into_configs(tool, fault_proxy, image, workdir):
    proc = fetch(tool, fault_proxy, image, workdir, check=0)
    config = parse_plan(proc.stdout)[0]["config"]
    with open(config["path"], "rb") as f:
        assert f.read() == image.config
    assert config["path"] == Workdir(workdir).config_path(config["digest"])


def test_fetch_keeps_fields_it_does_not_know(tool, fault_proxy, image, workdir):
    records = plan_records(fault_proxy.url, image, workdir)
    records[0]["futureField"] = {"x": 1}
    records[2]["annotations"] = {"org.example": "kept"}
    text = records_text(records)
    proc = tool("tosi-fetch", "--workdir", workdir, input=text, check=0)
    out = parse_plan(proc.stdout)
    assert out[0]["futureField"] == {"x": 1}
    assert out[2]["annotations"] == {"org.example": "kept"}


def test_cached_blobs_are_reused_without_a_request(tool, fault_proxy, image, workdir):
    fetch(tool, fault_proxy, image, workdir, check=0)
    before = fault_proxy.count("GET", "/blobs/")
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert fault_proxy.count("GET", "/blobs/") == before
    assert fault_proxy.count() == before


def test_validate_cache_replaces_a_corrupt_cached_blob(tool, fault_proxy, image, workdir):
    fetch(tool, fault_proxy, image, workdir, check=0)
    bad = Workdir(workdir).layer_path(image.layers[1].digest)
    with open(bad, "r+b") as f:
        f.write(b"X")
    fetch(tool, fault_proxy, image, workdir, "--validate-cache", check=0)
    assert_cached(workdir, image.layers)
    assert fault_proxy.count("GET", blob_path(image, image.layers[1])) == 2
    assert fault_proxy.count("GET", blob_path(image, image.layers[0])) == 1


def test_a_blob_listed_twice_is_downloaded_once(tool, fault_proxy, pusher, repo_name, workdir):
    layer = random_layer(100_000)
    image = pusher.push_image(repo_name, "v1", [layer, random_layer(1000), layer])
    proc = fetch(tool, fault_proxy, image, workdir, check=0)
    records = parse_plan(proc.stdout)
    assert records[1]["path"] == records[3]["path"]
    assert fault_proxy.count("GET", blob_path(image, layer)) == 1


def test_layer_records_are_written_as_soon_as_their_blob_is_verified(fault_proxy, image, workdir):
    # The top layer is held back by the proxy; the bottom one must come out meanwhile.
    fault_proxy.add(Rule("delay", path=image.layers[2].digest, seconds=5))
    started = time.monotonic()
    proc = start_fetch(plan_text(fault_proxy.url, image, workdir), workdir,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        first_two = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert time.monotonic() - started < 4
        assert proc.poll() is None
        assert first_two[1]["index"] == 0 and "path" in first_two[1]
    finally:
        fault_proxy.stopping.set()  # ends the delay
        proc.stdout.read()
        proc.wait(30)
    assert proc.returncode == 0


@pytest.mark.parametrize("parallel, expected", [("1", 1), ("2", 2), ("0", 3)])
def test_parallel_bounds_how_many_blobs_download_at_once(
        tool, fault_proxy, image, workdir, parallel, expected):
    fault_proxy.add(Rule("delay", path="/blobs/", seconds=0.5))
    fetch(tool, fault_proxy, image, workdir, "--parallel", parallel, check=0, cache_config=True)
    assert fault_proxy.max_in_flight == expected


def test_downloads_share_kept_alive_connections(tool, fault_proxy, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", [random_layer(20_000) for _ in range(6)])
    fetch(tool, fault_proxy, image, workdir, "--parallel", "2", check=0)
    connections = {r.client for r in fault_proxy.seen("GET", "/blobs/")}
    assert fault_proxy.count("GET", "/blobs/") == 7
    assert len(connections) <= 2


def test_stdout_carries_only_the_plan_even_with_progress_bars(tool, fault_proxy, image, workdir):
    proc = fetch(tool, fault_proxy, image, workdir, "--progress", "always", check=0)
    assert len(parse_plan(proc.stdout)) == 4
    assert "total" in proc.stderr and "B/s" in proc.stderr


def test_progress_auto_draws_nothing_when_stderr_is_not_a_terminal(tool, fault_proxy, image, workdir):
    proc = fetch(tool, fault_proxy, image, workdir, check=0)
    assert proc.stderr == ""


def test_a_blob_named_by_sha512_is_verified_with_sha512(tool, fault_proxy, registry, image, workdir):
    data = os.urandom(70_000)
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    upload = requests.post(f"{registry.url}/v2/{image.repo}/blobs/uploads/", timeout=10)
    location = urljoin(registry.url, upload.headers["Location"])
    sep = "&" if "?" in location else "?"
    requests.put(f"{location}{sep}digest={digest}", data=data, timeout=10).raise_for_status()
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": len(data)}]
    proc = fetch(tool, fault_proxy, image, workdir, check=0, layers=layers)
    path = parse_plan(proc.stdout)[1]["path"]
    assert os.path.basename(path) == digest.split(":")[1] and len(os.path.basename(path)) == 128
    with open(path, "rb") as f:
        assert f.read() == data


def test_progress_auto_draws_bars_when_stderr_is_a_terminal(fault_proxy, image, workdir):
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # rows, columns
    try:
        proc = start_fetch(plan_text(fault_proxy.url, image, workdir), workdir,
                           stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        terminal = None
        out = proc.stdout.read()
        assert proc.wait(30) == 0
        drawn = b""
        while select.select([main], [], [], 0.5)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal's other end is gone: all was read
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
        if terminal is not None:
            os.close(terminal)
    assert b"total" in drawn and b"B/s" in drawn
    assert len(parse_plan(out)) == 4


def test_an_empty_blob_is_cached_without_a_request(tool, fault_proxy, image, workdir):
    empty = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 0,
             "digest": "sha256:" + hashlib.sha256(b"").hexdigest()}
    proc = fetch(tool, fault_proxy, image, workdir, check=0, layers=[empty])
    path = parse_plan(proc.stdout)[1]["path"]
    assert os.path.getsize(path) == 0
    assert fault_proxy.count("GET", empty["digest"]) == 0


# ---------------------------------------------------------------- bad input

def test_a_malformed_plan_is_a_usage_error(tool, workdir):
    proc = tool("tosi-fetch", "--workdir", workdir, input="{not json\n")
    assert proc.returncode == 2
    assert proc.stderr.startswith("tosi-fetch: error: ") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("flags", [["--parallel", "-1"], ["--parallel", "1e20"], ["--parallel", "1" + "0" * 20],
                                   ["--parallel", "65"], ["--retries", "-1"], ["--read-timeout", "0"],
                                   ["--progress", "sometimes"], ["--password", "x", "--password-stdin"]])
def test_bad_flags_are_a_usage_error_in_one_line(tool, workdir, flags):
    proc = tool("tosi-fetch", "--workdir", workdir, *flags, input="")
    assert proc.returncode == 2
    assert proc.stderr.startswith("tosi-fetch: error: ") and proc.stderr.count("\n") == 1


def test_a_layer_without_a_size_is_refused(tool, fault_proxy, image, workdir):
    records = plan_records(fault_proxy.url, image, workdir)
    del records[2]["size"]
    proc = tool("tosi-fetch", "--workdir", workdir, input=records_text(records))
    assert proc.returncode == 2
    assert "layer 1 has no valid size" in proc.stderr
    assert fault_proxy.count() == 0


@pytest.mark.parametrize("field", ["repository", "endpoint"])
def test_an_image_record_without_where_to_fetch_from_is_refused(tool, fault_proxy, image, workdir, field):
    records = plan_records(fault_proxy.url, image, workdir)
    records[0].pop(field)
    if field == "endpoint":
        records[0].pop("registry")
    proc = tool("tosi-fetch", "--workdir", workdir, input=records_text(records))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert fault_proxy.count() == 0


def test_a_blob_longer_than_its_descriptor_is_rejected_without_writing_beyond_the_size(
        tool, fault_proxy, image, workdir):
    records = plan_records(fault_proxy.url, image, workdir)
    records[1]["size"] -= 10
    proc = tool("tosi-fetch", "--workdir", workdir, input=records_text(records))
    assert proc.returncode == 1
    assert f"layer 0 ({image.layers[0].digest})" in proc.stderr
    assert image.layers[0].digest.split(":")[1] not in layer_files(workdir)
    assert not os.path.exists(Workdir(workdir).partial_path(image.layers[0].digest))


# ---------------------------------------------------------------- a plan's size against a good blob

def plan_with_size(fault_proxy, image, workdir, index, delta):
    """The plan of `image` with layer `index`'s size off by `delta` bytes."""
    records = plan_records(fault_proxy.url, image, workdir)
    records[1 + index]["size"] += delta
    return records_text(records)


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("flags", [(), ("--validate-cache",)], ids=["reused", "validate-cache"])
@pytest.mark.parametrize("delta", [-10, 10], ids=["smaller", "larger"])
def test_a_wrong_plan_size_for_a_good_cached_blob_is_a_usage_error_and_the_blob_stays(
        tool, fault_proxy, image, workdir, flags, delta):
    fetch(tool, fault_proxy, image, workdir, check=0)
    layer = image.layers[1]
    path = Workdir(workdir).layer_path(layer.digest)
    before = fault_proxy.count("GET", layer.digest)
    proc = tool("tosi-fetch", "--workdir", workdir, *flags,
                input=plan_with_size(fault_proxy, image, workdir, 1, delta), check=2)
    assert proc.stderr == (
        f"tosi-fetch: error: layer 1 ({layer.digest}): the plan says {len(layer.data) + delta} bytes, "
        f"but the blob is {len(layer.data)} bytes and matches its digest: the plan is wrong "
        "(the blob stays in the cache)\n")
    assert read(path) == layer.data
    assert fault_proxy.count("GET", layer.digest) == before
    assert os.listdir(Workdir(workdir).quarantine) == []


def test_a_downloaded_blob_shorter_than_the_plan_says_but_matching_its_digest_is_kept_and_refused(
        tool, fault_proxy, image, workdir):
    layer = image.layers[0]
    proc = tool("tosi-fetch", "--workdir", workdir,
                input=plan_with_size(fault_proxy, image, workdir, 0, 1000), check=2)
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"tosi-fetch: error: layer 0 ({layer.digest}): the plan says "
                                  f"{len(layer.data) + 1000} bytes, but the blob is {len(layer.data)} bytes")
    assert fault_proxy.count("GET", layer.digest) == 1  # not retried: the blob was whole
    assert read(Workdir(workdir).layer_path(layer.digest)) == layer.data
    assert not os.path.exists(Workdir(workdir).partial_path(layer.digest))
    assert all(r.get("index") != 0 for r in parse_plan(proc.stdout))


def test_a_cached_blob_not_of_the_plans_size_and_not_matching_its_digest_is_fetched_again(
        tool, fault_proxy, image, workdir):
    fetch(tool, fault_proxy, image, workdir, check=0)
    layer = image.layers[2]
    path = Workdir(workdir).layer_path(layer.digest)
    with open(path, "r+b") as f:
        f.truncate(1000)
    fetch(tool, fault_proxy, image, workdir, check=0)  # without --validate-cache
    assert read(path) == layer.data


# ---------------------------------------------------------------- faults

def test_a_blob_corrupt_on_every_download_is_rejected_naming_the_layer_and_absent_from_the_cache(
        tool, fault_proxy, image, workdir):
    fault_proxy.add(Rule("corrupt", path=image.layers[1].digest, at=1234))
    proc = fetch(tool, fault_proxy, image, workdir, check=1)
    digest = image.layers[1].digest
    assert proc.stderr.count("\n") == 1
    assert f"layer 1 ({digest})" in proc.stderr and "hashes to" in proc.stderr
    assert "giving up after 3 downloads (3 hashed to sha256:" in proc.stderr
    assert fault_proxy.count("GET", digest) == 3
    cache = Workdir(workdir)
    assert not os.path.exists(cache.layer_path(digest))
    assert not os.path.exists(cache.partial_path(digest))
    assert all(r.get("index") != 1 for r in parse_plan(proc.stdout))


def test_the_first_failure_stops_the_other_downloads_and_is_the_error_reported(
        tool, fault_proxy, image, workdir):
    fault_proxy.add(Rule("stall", path=image.layers[0].digest, after=100_000, seconds=30))
    # Layer 0 reaches its stall before layer 2 fails.
    fault_proxy.add(Rule("delay", path=image.layers[2].digest, seconds=0.5))
    fault_proxy.add(Rule("corrupt", path=image.layers[2].digest, at=5))
    started = time.monotonic()
    proc = fetch(tool, fault_proxy, image, workdir, check=1)
    assert time.monotonic() - started < 10
    assert f"layer 2 ({image.layers[2].digest})" in proc.stderr and "hashes to" in proc.stderr
    assert all(r["type"] == "image" for r in parse_plan(proc.stdout))
    assert os.path.getsize(Workdir(workdir).partial_path(image.layers[0].digest)) >= 100_000


def test_a_dropped_download_resumes_with_a_range_request(tool, fault_proxy, image, workdir):
    layer = image.layers[2]
    fault_proxy.add(Rule("drop", path=layer.digest, after=250_000, times=1))
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    ranges = [r.headers.get("Range") for r in fault_proxy.seen("GET", layer.digest)]
    assert ranges[0] is None
    assert len(ranges) == 2 and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    assert int(ranges[1][len("bytes="):-1]) >= 65_536  # the bytes before the drop were kept


def test_a_server_ignoring_range_gets_a_full_redownload(tool, fault_proxy, image, workdir):
    layer = image.layers[2]
    fault_proxy.add(Rule("drop", path=layer.digest, after=250_000, times=1))
    fault_proxy.add(Rule("ignore_range", path=layer.digest))
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    assert fault_proxy.count("GET", layer.digest) == 2


def test_a_refused_range_is_followed_by_a_whole_download_that_keeps_the_partial_bytes(
        tool, fault_proxy, image, workdir):
    layer = image.layers[2]
    fault_proxy.add(Rule("drop", path=layer.digest, after=250_000, times=1))
    fault_proxy.add(Rule("status", path=layer.digest, status=416, header="Range", times=1))
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    ranges = [r.headers.get("Range") for r in fault_proxy.seen("GET", layer.digest)]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[2] is None


def test_server_errors_are_retried_until_success(tool, fault_proxy, image, workdir):
    fault_proxy.add(Rule("status", path=image.layers[0].digest, status=500, times=2))
    fault_proxy.add(Rule("status", path=image.layers[1].digest, status=503, times=1))
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    assert fault_proxy.count("GET", image.layers[0].digest) == 3


@pytest.mark.parametrize("retry_after", ["1", "date"])
def test_429_is_retried_after_the_retry_after_delay(tool, fault_proxy, image, workdir, retry_after):
    if retry_after == "date":  # the HTTP-date form, whole seconds: 2 s ahead is at least 1 s
        retry_after = lambda: email.utils.formatdate(time.time() + 2, usegmt=True)  # noqa: E731
    fault_proxy.add(Rule("status", path=image.layers[0].digest, status=429,
                         headers={"Retry-After": retry_after}, times=1))
    fetch(tool, fault_proxy, image, workdir, check=0)
    first, second = fault_proxy.seen("GET", image.layers[0].digest)
    assert second.time - first.time >= 0.95


def test_408_is_retried(tool, fault_proxy, image, workdir):
    fault_proxy.add(Rule("status", path=image.layers[0].digest, status=408, times=1))
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert fault_proxy.count("GET", image.layers[0].digest) == 2


def test_an_exhausted_retry_budget_is_one_clean_error(tool, fault_proxy, image, workdir):
    fault_proxy.add(Rule("status", path=image.layers[1].digest, status=502))
    proc = fetch(tool, fault_proxy, image, workdir, "--retries", "2", check=1)
    assert fault_proxy.count("GET", image.layers[1].digest) == 3
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"layer 1 ({image.layers[1].digest})" in proc.stderr and "3 attempts" in proc.stderr
    assert image.layers[1].digest.split(":")[1] not in layer_files(workdir)


def test_a_client_error_fails_at_once(tool, fault_proxy, image, workdir):
    fault_proxy.add(Rule("status", path=image.layers[0].digest, status=403))
    proc = fetch(tool, fault_proxy, image, workdir, check=1)
    assert fault_proxy.count("GET", image.layers[0].digest) == 1
    assert "403" in proc.stderr


def test_an_unknown_blob_fails_at_once_naming_the_layer(tool, fault_proxy, image, workdir):
    missing = random_layer(1000)
    layers = [image.layers[0].descriptor(), missing.descriptor()]
    proc = fetch(tool, fault_proxy, image, workdir, check=1, layers=layers)
    assert fault_proxy.count("GET", missing.digest) == 1
    assert f"layer 1 ({missing.digest})" in proc.stderr and "404" in proc.stderr


@pytest.mark.parametrize("location", ["ftp://storage.example/blob", "http://[::1/blob"])
def test_a_blob_redirect_to_no_http_url_fails_at_once_in_one_line(tool, fault_proxy, image, workdir, location):
    fault_proxy.add(Rule("status", path=image.layers[0].digest, status=307, headers={"Location": location}))
    proc = fetch(tool, fault_proxy, image, workdir, check=1)
    assert fault_proxy.count("GET", image.layers[0].digest) == 1
    assert proc.stderr.count("\n") == 1 and "internal error" not in proc.stderr
    assert image.layers[0].digest in proc.stderr


def test_a_stalled_download_times_out_and_resumes(tool, fault_proxy, image, workdir):
    layer = image.layers[1]
    fault_proxy.add(Rule("stall", path=layer.digest, after=100_000, seconds=20, times=1))
    started = time.monotonic()
    fetch(tool, fault_proxy, image, workdir, "--read-timeout", "0.5", check=0)
    assert time.monotonic() - started < 10
    assert_cached(workdir, image.layers)
    assert fault_proxy.seen("GET", layer.digest)[1].headers.get("Range", "").startswith("bytes=")


def test_an_unreachable_registry_is_retried_then_reported(tool, image, workdir):
    from tests.support.registry import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    proc = tool("tosi-fetch", "--workdir", workdir, "--retries", "1",
                input=plan_text(endpoint, image, workdir), check=1)
    assert "unreachable" in proc.stderr and "2 attempts" in proc.stderr


# ---------------------------------------------------------------- concurrency and crashes

def test_two_concurrent_processes_both_succeed_and_download_each_blob_once(fault_proxy, image, workdir):
    # Slow blobs make the two runs overlap for certain.
    fault_proxy.add(Rule("delay", path="/blobs/", seconds=0.3))
    plan = plan_text(fault_proxy.url, image, workdir)
    procs = [subprocess.Popen([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = [p.communicate(plan, timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _out, err in outputs]
    for layer in image.layers:
        assert fault_proxy.count("GET", layer.digest) == 1
    assert_cached(workdir, image.layers)
    assert all(len(parse_plan(out)) == 4 for out, _err in outputs)


def test_concurrent_validating_runs_replace_a_corrupt_blob_once(fault_proxy, image, workdir):
    plan = plan_text(fault_proxy.url, image, workdir)
    first = start_fetch(plan, workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert first.wait(30) == 0
    bad = Workdir(workdir).layer_path(image.layers[2].digest)
    with open(bad, "r+b") as f:
        f.write(b"corrupt")
    fault_proxy.add(Rule("delay", path=image.layers[2].digest, seconds=0.3))
    procs = [subprocess.Popen([sys.executable, os.path.join(BIN, "tosi-fetch"), "--workdir", workdir,
                               "--validate-cache"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(plan, timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert fault_proxy.count("GET", image.layers[2].digest) == 2  # the first run, and one replacement
    assert_cached(workdir, image.layers)


def test_a_run_killed_mid_download_is_completed_by_the_next_run(tool, fault_proxy, image, workdir):
    layer = image.layers[2]
    fault_proxy.add(Rule("stall", path=layer.digest, after=300_000, times=1))
    partial = Workdir(workdir).partial_path(layer.digest)
    proc = start_fetch(plan_text(fault_proxy.url, image, workdir), workdir,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(partial) and os.path.getsize(partial) >= 300_000):
            assert time.monotonic() < deadline, "the download never reached the stall"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    assert fault_proxy.seen("GET", layer.digest)[-1].headers["Range"] == "bytes=300000-"
    assert not os.path.exists(partial)


def test_a_complete_partial_file_is_verified_and_renamed_without_a_request(tool, fault_proxy, image, workdir):
    # What a run killed between the last write and the rename leaves behind.
    layer = image.layers[1]
    cache = Workdir(workdir).ensure()
    with open(cache.partial_path(layer.digest), "wb") as f:
        f.write(layer.data)
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert fault_proxy.count("GET", layer.digest) == 0
    assert_cached(workdir, image.layers)


def test_a_partial_file_with_wrong_bytes_is_downloaded_again_from_the_start(
        tool, fault_proxy, image, workdir):
    layer = image.layers[1]
    cache = Workdir(workdir).ensure()
    with open(cache.partial_path(layer.digest), "wb") as f:
        f.write(b"\0" * 100_000)  # what a crash without fsync can leave
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    ranges = [r.headers.get("Range") for r in fault_proxy.seen("GET", layer.digest)]
    assert ranges == ["bytes=100000-", None]


def test_a_wrong_digest_after_the_budget_of_fresh_downloads_is_final(tool, fault_proxy, image, workdir):
    layer = image.layers[1]
    cache = Workdir(workdir).ensure()
    with open(cache.partial_path(layer.digest), "wb") as f:
        f.write(layer.data[:100_000])
    fault_proxy.add(Rule("corrupt", path=layer.digest, at=150_000))
    proc = fetch(tool, fault_proxy, image, workdir, check=1)
    # The resumed earlier run's partial file, then three downloads from byte 0.
    ranges = [r.headers.get("Range") for r in fault_proxy.seen("GET", layer.digest)]
    assert ranges == ["bytes=100000-", None, None, None]
    # The flip lands 100000 bytes further into the blob when resumed: another digest.
    assert re.search(r"giving up after 4 downloads \(3 hashed to sha256:\w+, 1 to sha256:\w+\)", proc.stderr)
    assert not os.path.exists(cache.partial_path(layer.digest))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0.05, 0.2, 0.4, 0.7, 1.0, 1.5])
def test_a_run_killed_at_any_moment_is_completed_by_the_next_run(
        tool, fault_proxy, pusher, repo_name, workdir, kill_after):
    image = pusher.push_image(repo_name, "v1", [random_layer(1_000_000) for _ in range(4)])
    # About a second of downloading, so the kills land before, during and after it.
    fault_proxy.add(Rule("throttle", path="/blobs/", rate=2_000_000))
    proc = start_fetch(plan_text(fault_proxy.url, image, workdir), workdir,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(kill_after)
    proc.kill()
    proc.wait()
    fault_proxy.clear()
    fetch(tool, fault_proxy, image, workdir, check=0)
    assert_cached(workdir, image.layers)
    assert not [name for name in layer_files(workdir) if name.endswith(".partial")]
