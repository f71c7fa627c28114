"""One transport under every request (issue 16, point 1): manifests, tokens and blobs
are retried under one policy (the same temporary statuses, Retry-After honoured),
redirects never carry credentials to another origin, errors keep their status when
re-worded, and credentials come from one keychain that says which source gave them."""

import email.utils
import time

import pytest

from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import file_entry, make_layer
from tests.support.plans import plan_records, random_layer
from tosi_tools.auth import Credentials
from tosi_tools.cache import Workdir
from tosi_tools.errors import NotFound, RegistryError, Unavailable, Unreachable
from tosi_tools.fetch import Fetcher
from tosi_tools.keychain import EnvironmentSource, FlagSource, Keychain, StoredSources, from_flags
from tosi_tools.registry import RegistryClient
from tosi_tools.resolve import resolve_image
from tosi_tools.transport import RetryPolicy, Temporary, rewrap


def _layers():
    return [make_layer([file_entry("f", b"transport\n")])]


def _host(proxy):
    return proxy.url.split("://")[1]


def _gap(requests):
    first, second = requests[:2]
    return second.time - first.time


# ---------------------------------------------------------------- one retry policy

@pytest.mark.parametrize("retry_after", ["1", "date"])
def test_a_manifest_answered_429_is_asked_again_after_its_retry_after(registry, pusher, repo_name, workdir,
                                                                     retry_after):
    if retry_after == "date":  # whole seconds: 2 s ahead is at least 1 s
        retry_after = lambda: email.utils.formatdate(time.time() + 2, usegmt=True)  # noqa: E731
    image = pusher.push_image(repo_name, "v1", _layers())
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=429, headers={"Retry-After": retry_after},
                       times=1))
        record, _ = resolve_image(f"{_host(proxy)}/{repo_name}:v1", workdir)
        asked = proxy.seen("GET", "/manifests/")
    assert record["digest"] == image.digest
    assert len(asked) == 2 and _gap(asked) >= 0.95


def test_a_manifest_answered_500_is_asked_again_as_a_blob_would_be(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers())
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=500, times=1))
        record, _ = resolve_image(f"{_host(proxy)}/{repo_name}:v1", workdir)
        assert proxy.count("GET", "/manifests/") == 2
    assert record["digest"] == image.digest


def test_a_token_server_answering_503_is_asked_again_after_its_retry_after(
        token_registry, token_server, token_pusher, repo_name, workdir):
    repo = f"public/{repo_name}"
    image = token_pusher.push_image(repo, "v1", _layers())
    service = token_server.registry_config()["token"]["service"]
    with FaultProxy(token_server.realm.rsplit("/", 1)[0]) as tokens, FaultProxy(token_registry.url) as proxy:
        tokens.add(Rule("status", path="^/token", status=503, headers={"Retry-After": "1"}, times=1))
        proxy.add(Rule("status", path="/manifests/", status=401, times=1, body=b"", headers={
            "WWW-Authenticate": f'Bearer realm="{tokens.url}/token",service="{service}"'}))
        record, _ = resolve_image(f"{_host(proxy)}/{repo}:v1", workdir)
        asked = proxy.seen("GET", "/manifests/")
        assert tokens.count("GET", "/token") == 1
    assert record["digest"] == image.digest
    assert _gap(asked) >= 0.95


def test_a_token_server_that_stays_down_is_reported_with_its_status_after_the_attempts(
        token_registry, token_server, token_pusher, repo_name, workdir):
    repo = f"public/{repo_name}"
    token_pusher.push_image(repo, "v1", _layers())
    service = token_server.registry_config()["token"]["service"]
    with FaultProxy(token_server.realm.rsplit("/", 1)[0]) as tokens, FaultProxy(token_registry.url) as proxy:
        tokens.add(Rule("status", path="^/token", status=502))
        proxy.add(Rule("status", path="/manifests/", status=401, body=b"", headers={
            "WWW-Authenticate": f'Bearer realm="{tokens.url}/token",service="{service}"'}))
        with pytest.raises(Unavailable) as failure:
            resolve_image(f"{_host(proxy)}/{repo}:v1", workdir)
        assert tokens.count("GET", "/token") == 3
    assert failure.value.status == 502
    assert "token server" in str(failure.value) and "giving up after 3 attempts" in str(failure.value)


def test_a_blob_that_stays_unavailable_fails_with_its_status_kept(fault_proxy, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", [random_layer(10_000)])
    fault_proxy.add(Rule("status", path=image.layers[0].digest, status=503))
    image_record, *layers = plan_records(fault_proxy.url, image, workdir)
    fetcher = Fetcher(Workdir(workdir), lambda image: RegistryClient(image["endpoint"]), retries=1)
    with fetcher.start(image_record, layers) as run, pytest.raises(RegistryError) as failure:
        run.layers[0].result(timeout=60)
    assert isinstance(failure.value, Unreachable)  # Unavailable: both, so callers may catch either
    assert failure.value.status == 503
    assert str(failure.value).startswith(f"layer 0 ({image.layers[0].digest})")
    assert str(failure.value).endswith("(giving up after 2 attempts)")


def test_rewording_an_error_keeps_its_type_status_and_code():
    error = NotFound("blob x: 404 BLOB_UNKNOWN", status=404, code="BLOB_UNKNOWN")
    again = rewrap(error, "layer 0: blob x: 404 BLOB_UNKNOWN")
    assert type(again) is NotFound and (again.status, again.code) == (404, "BLOB_UNKNOWN")
    assert str(again) == "layer 0: blob x: 404 BLOB_UNKNOWN" and str(error) == "blob x: 404 BLOB_UNKNOWN"


def test_the_retry_budget_stops_waits_longer_than_it_allows():
    calls = []

    def busy():
        calls.append(time.monotonic())
        raise Temporary(Unavailable("busy: 503", status=503), retry_after=60)

    with pytest.raises(Unavailable, match=r"giving up after 1 attempts"):
        RetryPolicy(retries=5, budget=10).run(busy)
    assert len(calls) == 1


def test_retry_after_is_capped():
    assert RetryPolicy(retry_after_cap=120).delay(0, retry_after=86400) == 120
    assert 0.25 <= RetryPolicy(backoff_base=0.5).delay(0) <= 0.5


# ---------------------------------------------------------------- one redirect policy

def test_a_manifest_redirected_to_another_host_is_asked_for_without_credentials(
        htpasswd_registry, htpasswd_pusher, repo_name, workdir):
    image = htpasswd_pusher.push_image(repo_name, "v1", _layers())
    user, password = next(iter(htpasswd_registry.users.items()))
    with FaultProxy(htpasswd_registry.url, reject_authorization=True,
                    upstream_auth=(user, password)) as elsewhere, FaultProxy(htpasswd_registry.url) as front:
        # Once challenged, the client sends its credentials to the front; its redirect must not carry them.
        front.add(Rule("redirect", path="/manifests/", to=elsewhere.url, header="Authorization"))
        record, _ = resolve_image(f"{_host(front)}/{repo_name}:v1", workdir,
                                  credentials=Credentials(user, password))
        assert any("Authorization" in r.headers for r in front.seen("GET", "/manifests/"))
        assert elsewhere.seen("GET", "/manifests/")
        assert [r.headers.get("Authorization") for r in elsewhere.seen()] == [None] * len(elsewhere.seen())
    assert record["digest"] == image.digest


# ---------------------------------------------------------------- one keychain

class _Named:
    def __init__(self, name, answer):
        self.name = name
        self.answer = answer
        self.asked = []

    def lookup(self, registry, repository):
        self.asked.append((registry, repository))
        return self.answer


def test_the_first_source_that_answers_gives_the_credentials_and_is_remembered():
    silent = _Named("silent", None)
    first = _Named("first", Credentials("a", "1", "r.example"))
    second = _Named("second", Credentials("b", "2", "r.example"))
    keychain = Keychain([silent, first, second])
    assert keychain.credentials("r.example", "app") is first.answer
    assert keychain.answered("r.example", "app") == "first"
    assert silent.asked == [("r.example", "app")] and second.asked == []


def test_flag_credentials_are_bound_to_the_registry_they_are_asked_for(monkeypatch):
    monkeypatch.setenv("TOSI_USERNAME", "env-user")
    keychain = from_flags("alice", "secret")
    assert [type(s) for s in keychain.sources] == [FlagSource]
    found = keychain.credentials("r.example:5000", "app")
    assert (found.username, found.registry) == ("alice", "r.example:5000")


def test_without_flags_the_environment_comes_before_the_stored_credentials(monkeypatch):
    monkeypatch.setenv("TOSI_USERNAME", "env-user")
    monkeypatch.setenv("TOSI_PASSWORD", "env-secret")
    keychain = from_flags(ca_file="/ca.pem", insecure=True)
    assert [type(s) for s in keychain.sources] == [EnvironmentSource, StoredSources]
    assert keychain.credentials("r.example").username == "env-user"
    assert keychain.answered("r.example") == "TOSI_USERNAME"
    tls = keychain.tls_for("r.example")
    assert (tls.ca_file, tls.client_cert, tls.insecure) == ("/ca.pem", None, True)


def test_verbose_resolve_names_the_source_of_the_credentials_never_the_secret(
        tool, htpasswd_registry, htpasswd_pusher, repo_name, workdir):
    htpasswd_pusher.push_image(repo_name, "v1", _layers())
    user, password = next(iter(htpasswd_registry.users.items()))
    proc = tool("tosi-resolve", "-v", "--workdir", workdir, f"{htpasswd_registry.host}/{repo_name}:v1",
                env={"TOSI_USERNAME": user, "TOSI_PASSWORD": password, "DOCKER_CONFIG": workdir}, check=0)
    assert f"tosi-resolve: credentials for {htpasswd_registry.host} from TOSI_USERNAME" in proc.stderr
    assert password not in proc.stderr
