"""Transport: https with verification, a private CA by flag or environment, and plain http policy."""

import io

from tests.support.images import file_entry, make_layer
from tosi_tools.plan import PlanReader
from tosi_tools.transport import detect_endpoint, endpoint_for


def _push(pusher, repo):
    return pusher.push_image(repo, "v1", [make_layer([file_entry("f", b"tls\n")])])


def _image_record(proc):
    return PlanReader(io.StringIO(proc.stdout)).image


def test_untrusted_certificate_is_a_tls_error(tool, tls_registry, tls_pusher, repo_name, workdir):
    _push(tls_pusher, repo_name)
    proc = tool("tosi-resolve", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", check=1,
                env={"REQUESTS_CA_BUNDLE": "", "CURL_CA_BUNDLE": ""})
    assert proc.stderr.startswith(f"tosi-resolve: error: {tls_registry.host}: TLS failure: ")
    assert "CERTIFICATE_VERIFY_FAILED" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert proc.stdout == ""


def test_ca_file_flag_verifies_the_registry(tool, tls_registry, tls_pusher, repo_name, workdir):
    image = _push(tls_pusher, repo_name)
    proc = tool("tosi-resolve", "--workdir", workdir, "--ca-file", tls_registry.ca_file,
                f"{tls_registry.host}/{repo_name}:v1", check=0)
    record = _image_record(proc)
    assert (record["digest"], record["endpoint"]) == (image.digest, tls_registry.url)
    assert (record["caFile"], record["insecure"]) == (tls_registry.ca_file, False)


def test_requests_ca_bundle_environment_verifies_the_registry(tool, tls_registry, tls_pusher, repo_name,
                                                              workdir):
    image = _push(tls_pusher, repo_name)
    proc = tool("tosi-resolve", "--workdir", workdir, f"{tls_registry.host}/{repo_name}:v1", check=0,
                env={"REQUESTS_CA_BUNDLE": tls_registry.ca_file})
    assert _image_record(proc)["digest"] == image.digest


def test_insecure_skips_certificate_verification(tool, tls_registry, tls_pusher, repo_name, workdir):
    image = _push(tls_pusher, repo_name)
    proc = tool("tosi-resolve", "--workdir", workdir, "--insecure", f"{tls_registry.host}/{repo_name}:v1",
                check=0, env={"REQUESTS_CA_BUNDLE": tls_registry.ca_file + ".missing"})
    record = _image_record(proc)
    assert (record["digest"], record["endpoint"], record["insecure"]) == (image.digest, tls_registry.url, True)


def test_missing_ca_file_is_usage_error(tool, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, "--ca-file", "/no/such/ca.pem", "127.0.0.1:1/img",
                check=2)
    assert proc.stderr == "tosi-resolve: error: --ca-file /no/such/ca.pem: no such file\n"


def test_loopback_registry_without_tls_is_reached_over_http(registry):
    assert detect_endpoint(registry.host) == registry.url


def test_loopback_registry_with_tls_is_reached_over_https(tls_registry):
    assert detect_endpoint(tls_registry.host) == tls_registry.url


def test_remote_registry_is_https_unless_insecure():
    assert detect_endpoint("registry.example.com:5000") == "https://registry.example.com:5000"
    assert endpoint_for("registry.example.com", insecure=True) == "http://registry.example.com"
