"""Registry auth against real registries: the Bearer token flow and HTTP Basic (htpasswd)."""

import io
import itertools
import os
import subprocess
import sys

import pytest

from tests.conftest import BIN
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import file_entry, make_layer
from tosi_tools.auth import Credentials, TokenCache
from tosi_tools.errors import Unauthorized
from tosi_tools.plan import PlanReader
from tosi_tools.imageplatform import parse_platform
from tosi_tools.registry import RegistryClient
from tosi_tools.resolve import resolve_image


def _layers(n=1):
    return [make_layer([file_entry(f"f{i}", f"{i}\n".encode())]) for i in range(n)]


def _plan(proc):
    reader = PlanReader(io.StringIO(proc.stdout))
    return reader.image, reader.layers()


def _user(reg):
    return next(iter(reg.users.items()))


@pytest.fixture
def public_repo(repo_name):
    return f"public/{repo_name}"


def _files_contain(root, secret):
    for directory, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                if secret.encode() in f.read():
                    return True
    return False


# ------------------------------------------------------------ token auth

def test_anonymous_pull_of_public_repository_uses_a_bearer_token(tool, token_registry, token_server,
                                                                   token_pusher, public_repo, workdir):
    image = token_pusher.push_image(public_repo, "v1", _layers())
    before = len(token_server.token_requests())
    proc = tool("tosi-resolve", "--workdir", workdir, f"{token_registry.host}/{public_repo}:v1", check=0)
    assert _plan(proc)[0]["digest"] == image.digest
    path, query, had_credentials = token_server.token_requests()[before]
    assert query["service"] == ["tosi-test-registry"]
    assert query["scope"] == [f"repository:{public_repo}:pull"]
    assert not had_credentials


def test_one_token_serves_every_request_of_a_resolution(token_registry, token_server, token_pusher,
                                                        public_repo, workdir):
    images = [token_pusher.push_image(public_repo, None, _layers(), oci=True, arch=arch)
              for arch in ("amd64", "arm64")]
    token_pusher.push_index(public_repo, "multi", images)
    before = len(token_server.token_requests())
    # index, then the arm64 manifest, then its config: three registry requests
    image, _ = resolve_image(f"{token_registry.host}/{public_repo}:multi", workdir,
                             platform=parse_platform("linux/arm64"))
    assert image["digest"] == images[1].digest
    assert len(token_server.token_requests()) - before == 1


def test_token_response_with_only_access_token_is_accepted(token_registry, token_server, token_pusher,
                                                           public_repo, workdir):
    image = token_pusher.push_image(public_repo, "v1", _layers())
    token_server.token_fields = ("access_token",)
    try:
        record, _ = resolve_image(f"{token_registry.host}/{public_repo}:v1", workdir)
    finally:
        token_server.token_fields = ("token", "access_token")
    assert record["digest"] == image.digest


def test_private_repository_with_right_credentials_resolves(tool, token_registry, token_server,
                                                             token_pusher, repo_name, workdir):
    image = token_pusher.push_image(repo_name, "v1", _layers())
    user, password = _user(token_registry)
    before = len(token_server.token_requests())
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", user, "--password", password,
                f"{token_registry.host}/{repo_name}:v1", check=0)
    assert _plan(proc)[0]["digest"] == image.digest
    assert token_server.token_requests()[before][2], "the token request carried no credentials"


def test_private_repository_with_wrong_password_is_unauthorized(tool, token_registry, token_pusher,
                                                                repo_name, workdir):
    token_pusher.push_image(repo_name, "v1", _layers())
    user, _ = _user(token_registry)
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", user, "--password", "not-it",
                f"{token_registry.host}/{repo_name}:v1", check=1)
    assert proc.stderr.startswith(f"tosi-resolve: error: credentials rejected by {token_registry.host} "
                                  "(its token server ")
    assert proc.stderr.endswith(" answered 401; from --username)\n")


def test_private_repository_without_credentials_is_unauthorized(tool, token_registry, token_pusher,
                                                                repo_name, workdir):
    token_pusher.push_image(repo_name, "v1", _layers())
    proc = tool("tosi-resolve", "--workdir", workdir, f"{token_registry.host}/{repo_name}:v1", check=1)
    assert proc.stderr.startswith(f"tosi-resolve: error: manifest {token_registry.host}/{repo_name}:v1: "
                                  "401 UNAUTHORIZED")
    assert proc.stderr.endswith(f"(no credentials for {token_registry.host}: give --username (or TOSI_USERNAME), "
                                "--authfile, or log in with docker or podman)\n")


def test_password_from_stdin_is_used(tool, token_registry, token_pusher, repo_name, workdir):
    image = token_pusher.push_image(repo_name, "v1", _layers())
    user, password = _user(token_registry)
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", user, "--password-stdin",
                f"{token_registry.host}/{repo_name}:v1", input=f"{password}\n", check=0)
    assert _plan(proc)[0]["digest"] == image.digest


def test_credentials_reach_neither_plan_nor_cache_nor_log(tool, token_registry, token_pusher, repo_name,
                                                          workdir):
    token_pusher.push_image(repo_name, "v1", _layers())
    user, password = _user(token_registry)
    proc = tool("tosi-resolve", "-vv", "--workdir", workdir, "--username", user, "--password-stdin",
                f"{token_registry.host}/{repo_name}:v1", input=password, check=0)
    assert password not in proc.stdout and password not in proc.stderr
    assert not _files_contain(workdir, password)


# ------------------------------------------------------------ basic auth

def test_basic_auth_with_right_credentials_resolves(tool, htpasswd_registry, htpasswd_pusher, repo_name,
                                                    workdir):
    image = htpasswd_pusher.push_image(repo_name, "v1", _layers())
    user, password = _user(htpasswd_registry)
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", user, "--password", password,
                f"{htpasswd_registry.host}/{repo_name}:v1", check=0)
    assert _plan(proc)[0]["digest"] == image.digest


def test_basic_auth_with_wrong_password_is_unauthorized(tool, htpasswd_registry, htpasswd_pusher,
                                                        repo_name, workdir):
    htpasswd_pusher.push_image(repo_name, "v1", _layers())
    user, _ = _user(htpasswd_registry)
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", user, "--password", "guess-7f3a",
                f"{htpasswd_registry.host}/{repo_name}:v1", check=1)
    assert proc.stderr.startswith(f"tosi-resolve: error: manifest {htpasswd_registry.host}/{repo_name}:v1: "
                                  f"credentials rejected by {htpasswd_registry.host} (401 UNAUTHORIZED")
    assert proc.stderr.endswith("; from --username)\n") and "guess-7f3a" not in proc.stderr


def test_basic_auth_without_credentials_asks_for_them(htpasswd_registry, htpasswd_pusher, repo_name,
                                                      workdir):
    htpasswd_pusher.push_image(repo_name, "v1", _layers())
    with pytest.raises(Unauthorized, match=r"authentication required; no credentials for .*: give --username"):
        resolve_image(f"{htpasswd_registry.host}/{repo_name}:v1", workdir)


def test_basic_credentials_fetch_the_config_too(htpasswd_registry, htpasswd_pusher, repo_name, workdir):
    image = htpasswd_pusher.push_image(repo_name, "v1", _layers())
    record, _ = resolve_image(f"{htpasswd_registry.host}/{repo_name}:v1", workdir,
                              credentials=Credentials(*_user(htpasswd_registry)))
    with open(record["config"]["path"], "rb") as f:
        assert f.read() == image.config


# ------------------------------------------------------------ flags

def test_password_without_username_is_usage_error(tool, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, "--password", "x", "127.0.0.1:1/img", check=2)
    assert proc.stderr == "tosi-resolve: error: a password needs --username\n"


def test_password_and_password_stdin_together_are_usage_error(tool, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", "u", "--password", "x",
                "--password-stdin", "127.0.0.1:1/img", check=2)
    assert "not allowed with argument" in proc.stderr


def test_credentials_are_not_sent_to_the_host_a_blob_redirects_to(htpasswd_registry, htpasswd_pusher,
                                                                  repo_name, workdir):
    image = htpasswd_pusher.push_image(repo_name, "v1", _layers())
    user, password = _user(htpasswd_registry)
    # Blob storage that refuses any Authorization header, as S3 does for presigned URLs.
    with FaultProxy(htpasswd_registry.url, reject_authorization=True, upstream_auth=(user, password)) as storage, \
            FaultProxy(htpasswd_registry.url) as front:
        front.add(Rule("redirect", path="/blobs/", to=storage.url))
        record, _ = resolve_image(f"{front.url.split('://')[1]}/{repo_name}:v1", workdir,
                                  credentials=Credentials(user, password))
        assert [r.headers.get("Authorization") for r in storage.seen("GET")] == [None]
    with open(record["config"]["path"], "rb") as f:
        assert f.read() == image.config


def test_clients_sharing_a_token_cache_authenticate_their_first_request(token_registry, token_server,
                                                                        token_pusher, public_repo, workdir):
    image = token_pusher.push_image(public_repo, "v1", _layers())
    tokens = TokenCache()
    with FaultProxy(token_registry.url) as proxy:
        resolve_image(f"{proxy.url.split('://')[1]}/{public_repo}:v1", workdir, token_cache=tokens)
        token_requests = len(token_server.token_requests())
        before = len(proxy.seen())
        client = RegistryClient(proxy.url, token_cache=tokens)
        try:
            resp = client.send("GET", client.blob_url(public_repo, image.layers[0].digest),
                               repository=public_repo)
            assert resp.status_code == 200
        finally:
            client.close()
        assert ["Authorization" in r.headers for r in proxy.seen()[before:]] == [True]
    assert len(token_server.token_requests()) == token_requests


def test_refused_cached_token_is_replaced(token_registry, token_server, token_pusher, public_repo):
    token_pusher.push_image(public_repo, "v1", _layers())
    client = RegistryClient(token_registry.url)
    try:
        client.check(client.send("HEAD", client.manifest_url(public_repo, "v1"), repository=public_repo), "m")
        key = next(iter(client.tokens._tokens))
        client.tokens.put(key, "not-a-valid-token", expires_in=300)
        before = len(token_server.token_requests())
        resp = client.send("HEAD", client.manifest_url(public_repo, "v1"), repository=public_repo)
        assert resp.status_code == 200
        assert len(token_server.token_requests()) == before + 1
    finally:
        client.close()


def test_empty_password_stdin_is_usage_error(tool, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, "--username", "u", "--password-stdin",
                "127.0.0.1:1/img", input="", check=2)
    assert proc.stderr == "tosi-resolve: error: --password-stdin: no password on stdin\n"


@pytest.mark.parametrize("cmd", ["tosi-resolve", "tosi-fetch", "tosi"])
def test_a_password_on_stdin_that_is_not_utf8_is_a_usage_error(cmd, workdir):
    args = {"tosi-resolve": ["--username", "u", "--password-stdin", "127.0.0.1:1/img"],
            "tosi-fetch": ["--username", "u", "--password-stdin"],
            "tosi": ["-image", "127.0.0.1:1/img", "-username", "u", "-password-stdin"]}[cmd]
    proc = subprocess.run([sys.executable, os.path.join(BIN, cmd), "-workdir" if cmd == "tosi" else "--workdir",
                           workdir, *args], input=b"pass\xffword\n", capture_output=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    flag = "-password-stdin" if cmd == "tosi" else "--password-stdin"
    assert proc.stderr == f"{cmd}: error: {flag}: the password on stdin is not UTF-8\n".encode()


# ------------------------------------------------------------ hostile token servers and challenges

def _challenge_for_own_token(proxy, realm=None):
    """Make every /v2/ answer of `proxy` a challenge for a token from its own /token (or `realm`)."""
    proxy.add(Rule("status", path="^/v2/", status=401, body=b"", headers={
        "WWW-Authenticate": f'Bearer realm="{realm or proxy.url + "/token"}",service="s"'}))
    return f"{proxy.url.split('://')[1]}/img:v1"


def test_a_token_answer_that_never_ends_is_refused_after_1_mib(tool, fault_proxy, workdir):
    ref = _challenge_for_own_token(fault_proxy)
    fault_proxy.add(Rule("status", path="^/token", status=200, body=itertools.repeat(b" " * 65536)))
    proc = tool("tosi-resolve", "--workdir", workdir, ref, check=1, timeout=30)
    assert proc.stderr == f"tosi-resolve: error: token server {fault_proxy.url}/token: more than the 1 MiB " \
        "allowed; refused\n"


@pytest.mark.parametrize("answer", [b'{"token": 12345}', b'{"token": "a\\r\\nX-Injected: 1"}',
                                    b'{"token": {"nested": "object"}}'])
def test_a_token_that_is_no_header_safe_string_is_refused(tool, fault_proxy, workdir, answer):
    ref = _challenge_for_own_token(fault_proxy)
    fault_proxy.add(Rule("status", path="^/token", status=200, body=answer))
    proc = tool("tosi-resolve", "--workdir", workdir, ref, check=1)
    assert proc.stderr == f"tosi-resolve: error: token server {fault_proxy.url}/token answered with a " \
        "malformed token\n"


@pytest.mark.parametrize("realm", ["file:///etc/passwd", "/token", "not a url"])
def test_a_realm_that_is_no_http_url_is_refused_without_retrying(tool, fault_proxy, workdir, realm):
    ref = _challenge_for_own_token(fault_proxy, realm=realm)
    proc = tool("tosi-resolve", "--workdir", workdir, ref, check=1)
    assert fault_proxy.count("GET", "/manifests/") == 1
    assert proc.stderr == f"tosi-resolve: error: {fault_proxy.url}: Bearer challenge realm {realm!r} is no " \
        "http(s) URL\n"


def test_a_bearer_challenge_offered_beside_basic_is_answered_with_a_token(tool, token_registry, token_server,
                                                                        token_pusher, public_repo, workdir):
    image = token_pusher.push_image(public_repo, "v1", _layers())
    with FaultProxy(token_registry.url) as proxy:
        # What requests makes of a registry sending two WWW-Authenticate headers.
        proxy.add(Rule("status", path="/manifests/", status=401, times=1, body=b"", headers={
            "WWW-Authenticate": f'Basic realm="registry", Bearer realm="{token_server.realm}",'
                                f'service="{token_server.registry_config()["token"]["service"]}"'}))
        proc = tool("tosi-resolve", "--workdir", workdir, f"{proxy.url.split('://')[1]}/{public_repo}:v1",
                    check=0)
    assert _plan(proc)[0]["digest"] == image.digest


def test_a_token_server_failing_for_a_moment_is_tried_again(tool, token_registry, token_server, token_pusher,
                                                           public_repo, workdir):
    image = token_pusher.push_image(public_repo, "v1", _layers())
    service = token_server.registry_config()["token"]["service"]
    with FaultProxy(token_server.realm.rsplit("/", 1)[0]) as busy_tokens, \
            FaultProxy(token_registry.url) as proxy:
        busy_tokens.add(Rule("status", path="^/token", status=503, times=1))
        proxy.add(Rule("status", path="/manifests/", status=401, times=1, body=b"", headers={
            "WWW-Authenticate": f'Bearer realm="{busy_tokens.url}/token",service="{service}"'}))
        proc = tool("tosi-resolve", "--workdir", workdir, f"{proxy.url.split('://')[1]}/{public_repo}:v1",
                    check=0)
        assert busy_tokens.count("GET", "/token") == 1
    assert _plan(proc)[0]["digest"] == image.digest
