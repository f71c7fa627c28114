"""Cheap warm runs: with the image cached and its layers extracted, `tosi -mount`
makes one manifest HEAD (none for a cached digest reference), skips the TLS probe
of a registry whose scheme it remembers, and imports none of the download
machinery; anything unusual falls back to the requests-based client."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import BIN
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import file_entry, make_layer
from tosi_tools import registry as registry_mod
from tosi_tools import transport
from tosi_tools.cache import Workdir
from tosi_tools.resolve import resolve_image

# What a warm run must not load: the HTTP client library and what only downloads
# or extractions need.
HEAVY_MODULES = ("requests", "urllib3", "tqdm", "zstandard", "tosi_tools.blobs", "tosi_tools.fetch",
                 "tosi_tools.blobstream", "tosi_tools.layer", "tosi_tools.compression")

# Runs cli.tosi.main (or any callable) and reports on stderr's last line which heavy modules it loaded.
_REPORTING_RUNNER = """\
import json, sys
from tosi_tools.cli.tosi import main
status = main(sys.argv[1:])
heavy = {heavy!r}
print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
sys.exit(status)
"""


def run_tosi_reporting_imports(*args):
    """(CompletedProcess, [heavy modules imported]) of `tosi ARGS` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(BIN))
    proc = subprocess.run([sys.executable, "-c", _REPORTING_RUNNER.format(heavy=HEAVY_MODULES), *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(proc.stderr.strip().splitlines()[-1])


def unmount(target):
    subprocess.run([sys.executable, os.path.join(BIN, "tosi-mount"), "--unmount", "--clean", target],
                   capture_output=True, timeout=60)


def layers():
    return [make_layer([file_entry("etc/os-release", b"ID=warm\n")]),
            make_layer([file_entry("app/run", b"run\n", mode=0o755)], compression="zstd")]


@pytest.fixture
def proxy(registry):
    with FaultProxy(registry.url) as proxy:
        yield proxy


def host_of(proxy):
    return proxy.url.split("://", 1)[1]


def pull_and_mount(reference, workdir, target):
    """A `tosi -mount` in a fresh interpreter, unmounted again; returns the heavy modules it loaded."""
    try:
        proc, heavy = run_tosi_reporting_imports("-workdir", workdir, "-image", reference, "-mount", target)
        with open(os.path.join(target, "etc", "os-release"), "rb") as f:
            assert f.read() == b"ID=warm\n"
        return heavy
    finally:
        unmount(target)


def test_warm_mount_of_a_tag_makes_one_manifest_head_and_imports_no_download_machinery(
        pusher, proxy, repo_name, workdir, tmp_path):
    pusher.push_image(repo_name, "1", layers())
    reference = f"{host_of(proxy)}/{repo_name}:1"
    pull_and_mount(reference, workdir, str(tmp_path / "cold"))
    before = len(proxy.seen())
    heavy = pull_and_mount(reference, workdir, str(tmp_path / "warm"))
    warm = [(r.method, r.path) for r in proxy.seen()[before:]]
    assert warm == [("HEAD", f"/v2/{repo_name}/manifests/1")]
    assert heavy == []


def test_warm_mount_head_sends_every_accepted_manifest_type(pusher, proxy, repo_name, workdir, tmp_path):
    from tosi_tools.manifest import ACCEPT

    pusher.push_image(repo_name, "1", layers())
    reference = f"{host_of(proxy)}/{repo_name}:1"
    pull_and_mount(reference, workdir, str(tmp_path / "cold"))
    before = len(proxy.seen())
    pull_and_mount(reference, workdir, str(tmp_path / "warm"))
    (head,) = proxy.seen()[before:]
    assert {k.lower(): v for k, v in head.headers.items()}["accept"] == ACCEPT


def test_warm_mount_of_a_cached_digest_reference_makes_no_request(pusher, proxy, repo_name, workdir,
                                                                  tmp_path):
    image = pusher.push_image(repo_name, "1", layers())
    reference = f"{host_of(proxy)}/{repo_name}@{image.digest}"
    pull_and_mount(reference, workdir, str(tmp_path / "cold"))
    before = len(proxy.seen())
    heavy = pull_and_mount(reference, workdir, str(tmp_path / "warm"))
    assert proxy.seen()[before:] == []
    assert heavy == []


def test_warm_head_answered_with_an_error_is_asked_again_through_the_client(
        pusher, proxy, repo_name, workdir, tmp_path):
    image = pusher.push_image(repo_name, "1", layers())
    reference = f"{host_of(proxy)}/{repo_name}:1"
    pull_and_mount(reference, workdir, str(tmp_path / "cold"))
    proxy.add(Rule("status", method="HEAD", path="/manifests/", status=503, times=1))
    before = len(proxy.seen())
    heavy = pull_and_mount(reference, workdir, str(tmp_path / "warm"))
    assert [r.method for r in proxy.seen()[before:]] == ["HEAD", "HEAD"]
    assert "requests" in heavy
    assert "tosi_tools.fetch" not in heavy  # still nothing to download
    assert os.path.exists(Workdir(workdir).manifest_path(host_of(proxy), repo_name, image.digest))


def test_warm_mount_behind_a_token_challenge_works_through_the_client(
        token_registry, token_pusher, workdir, tmp_path):
    repo = "public/warm-path"
    token_pusher.push_image(repo, "1", layers())
    with FaultProxy(token_registry.url) as proxy:
        reference = f"{host_of(proxy)}/{repo}:1"
        pull_and_mount(reference, workdir, str(tmp_path / "cold"))
        before = len(proxy.seen())
        pull_and_mount(reference, workdir, str(tmp_path / "warm"))
        warm = proxy.seen()[before:]
    # the plain HEAD (401), the client's HEAD (401), then the client's with its token
    assert [(r.method, "authorization" in {k.lower() for k in r.headers}) for r in warm] == [
        ("HEAD", False), ("HEAD", False), ("HEAD", True)]


def test_a_registry_that_challenged_the_plain_head_is_asked_through_the_client_next_time(
        token_registry, token_pusher, workdir, tmp_path):
    repo = "public/warm-path-again"
    token_pusher.push_image(repo, "1", layers())
    with FaultProxy(token_registry.url) as proxy:
        reference = f"{host_of(proxy)}/{repo}:1"
        for run in ("cold", "first-warm"):
            pull_and_mount(reference, workdir, str(tmp_path / run))
        before = len(proxy.seen())
        pull_and_mount(reference, workdir, str(tmp_path / "warm"))
        warm = proxy.seen()[before:]
    assert [(r.method, "authorization" in {k.lower() for k in r.headers}) for r in warm] == [
        ("HEAD", False), ("HEAD", True)]


def test_the_probed_scheme_of_a_loopback_registry_is_remembered_in_the_workdir(
        pusher, registry, repo_name, workdir):
    pusher.push_image(repo_name, "1", layers())
    resolve_image(f"{registry.host}/{repo_name}:1", workdir)
    with open(Workdir(workdir).scheme_path(registry.host)) as f:
        assert f.read() == "http\n"


def test_warm_resolve_of_a_tag_takes_the_remembered_scheme_without_a_tls_probe(
        pusher, registry, repo_name, workdir, monkeypatch):
    image = pusher.push_image(repo_name, "1", layers())
    reference = f"{registry.host}/{repo_name}:1"
    resolve_image(reference, workdir)
    probes = []
    monkeypatch.setattr(transport, "speaks_tls", lambda *a, **k: probes.append(a) or False)
    record, _ = resolve_image(reference, workdir)
    assert probes == []
    assert (record["endpoint"], record["digest"]) == (registry.url, image.digest)


def test_a_remembered_scheme_the_registry_no_longer_speaks_is_probed_again(
        pusher, registry, repo_name, workdir):
    image = pusher.push_image(repo_name, "1", layers())
    reference = f"{registry.host}/{repo_name}:1"
    resolve_image(reference, workdir)
    scheme_file = Workdir(workdir).scheme_path(registry.host)
    with open(scheme_file, "w") as f:
        f.write("https\n")  # stale: the registry speaks plain http
    record, _ = resolve_image(reference, workdir)
    assert (record["endpoint"], record["digest"]) == (registry.url, image.digest)
    with open(scheme_file) as f:
        assert f.read() == "http\n"


def test_a_remembered_scheme_is_not_taken_for_a_registry_that_must_speak_https(workdir):
    scheme_file = Workdir(workdir).scheme_path("registry.example.com")
    os.makedirs(os.path.dirname(scheme_file))
    with open(scheme_file, "w") as f:
        f.write("http\n")
    assert transport.detect_endpoint("registry.example.com", scheme_file=scheme_file,
                                        probe=False) == "https://registry.example.com"


def test_warm_resolve_over_tls_verifies_with_the_ca_file_without_requests(
        tls_registry, tls_pusher, workdir):
    image = tls_pusher.push_image("warm/tls", "1", layers())
    reference = f"{tls_registry.host}/warm/tls:1"
    code = (
        "import json, sys\n"
        "from tosi_tools.resolve import resolve_image\n"
        f"record, _ = resolve_image({reference!r}, {workdir!r}, ca_file={tls_registry.ca_file!r})\n"
        "print(json.dumps([record['endpoint'], record['digest'], 'requests' in sys.modules]))\n")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(BIN))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=60, check=True) for _ in range(2)]
    cold, warm = (json.loads(run.stdout) for run in runs)
    assert cold == [tls_registry.url, image.digest, True]
    assert warm == [tls_registry.url, image.digest, False]


def test_warm_head_over_tls_refuses_a_server_it_cannot_verify(tls_registry, tls_pusher):
    tls_pusher.push_image("warm/untrusted", "1", layers())
    path = registry_mod.manifest_url("warm/untrusted", "1")
    assert transport.quick_head(tls_registry.url, path, {}) is None
    status, headers = transport.quick_head(tls_registry.url, path, {}, insecure=True)
    assert status == 200 and headers["docker-content-digest"].startswith("sha256:")


def test_warm_head_is_left_to_the_client_when_the_environment_names_a_proxy(
        pusher, registry, repo_name, monkeypatch):
    pusher.push_image(repo_name, "1", layers())
    path = registry_mod.manifest_url(repo_name, "1")
    assert transport.quick_head(registry.url, path, {})[0] == 200
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert transport.quick_head(registry.url, path, {}) is None
