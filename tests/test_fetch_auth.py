"""tosi-fetch against registries that need credentials: Basic (htpasswd) and Bearer tokens."""

import time

import pytest

from tests.support import tokenserver
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.plans import assert_cached, parse_plan, plan_text, random_layer


@pytest.fixture
def credentials(htpasswd_registry):
    user, password = next(iter(htpasswd_registry.users.items()))
    return user, password


@pytest.fixture
def env(credentials):
    return {"TOSI_USERNAME": credentials[0], "TOSI_PASSWORD": credentials[1]}


@pytest.fixture
def image(htpasswd_pusher, repo_name):
    return htpasswd_pusher.push_image(repo_name, "v1", [random_layer(300_000), random_layer(5000)])


@pytest.fixture
def proxy(htpasswd_registry):
    with FaultProxy(htpasswd_registry.url) as p:
        yield p


@pytest.fixture
def blob_storage(htpasswd_registry, credentials):
    """Another loopback port serving blobs, which refuses any Authorization header."""
    with FaultProxy(htpasswd_registry.url, reject_authorization=True, upstream_auth=credentials) as p:
        yield p


def test_credentials_from_the_environment_pull_from_a_protected_registry(tool, htpasswd_registry, image,
                                                                         workdir, env):
    tool("tosi-fetch", "--workdir", workdir, input=plan_text(htpasswd_registry.url, image, workdir),
         env=env, check=0)
    assert_cached(workdir, image.layers)


def test_password_stdin_takes_the_first_line_and_the_plan_follows(tool, htpasswd_registry, image,
                                                                  workdir, credentials):
    user, password = credentials
    proc = tool("tosi-fetch", "--workdir", workdir, "--username", user, "--password-stdin",
                input=password + "\n" + plan_text(htpasswd_registry.url, image, workdir), check=0)
    assert len(parse_plan(proc.stdout)) == 3
    assert password not in proc.stdout + proc.stderr


def test_without_credentials_a_protected_registry_fails_at_once(tool, proxy, image, workdir):
    proc = tool("tosi-fetch", "--workdir", workdir, input=plan_text(proxy.url, image, workdir),
                env={"TOSI_USERNAME": "", "DOCKER_CONFIG": workdir}, check=1)
    assert "authentication required" in proc.stderr and proc.stderr.count("\n") == 1
    assert all(proxy.count("GET", layer.digest) <= 1 for layer in image.layers)


def test_wrong_credentials_fail_without_retrying(tool, proxy, image, workdir):
    proc = tool("tosi-fetch", "--workdir", workdir, input=plan_text(proxy.url, image, workdir),
                env={"TOSI_USERNAME": "alice", "TOSI_PASSWORD": "wrong"}, check=1)
    assert "401" in proc.stderr
    # Per blob: one try without credentials, one with them; a Basic 401 is not retried.
    assert all(proxy.count("GET", layer.digest) <= 2 for layer in image.layers)


def test_a_redirect_to_blob_storage_is_followed_without_the_authorization_header(
        tool, proxy, blob_storage, image, workdir, env):
    # As a registry does: authenticate the client first, then send it to the storage.
    proxy.add(Rule("redirect", path=r"/blobs/sha256:", to=blob_storage.url, header="Authorization"))
    tool("tosi-fetch", "--workdir", workdir, input=plan_text(proxy.url, image, workdir), env=env, check=0)
    assert_cached(workdir, image.layers)
    assert blob_storage.count("GET", "/blobs/") == 3  # both layers and the config
    assert not any("Authorization" in r.headers for r in blob_storage.seen())
    assert any("Authorization" in r.headers for r in proxy.seen("GET", "/blobs/"))


def test_a_foreign_layer_comes_from_its_urls_without_registry_credentials(
        tool, proxy, blob_storage, htpasswd_pusher, image, repo_name, workdir, env):
    foreign = random_layer(20_000)
    elsewhere = repo_name + "-elsewhere"
    htpasswd_pusher.push_blob(elsewhere, foreign.data)
    descriptor = dict(foreign.descriptor(), urls=[
        "ftp://127.0.0.1/ignored",
        f"{blob_storage.url}/v2/{elsewhere}/blobs/{foreign.digest}"])
    layers = [image.layers[0].descriptor(), descriptor]
    tool("tosi-fetch", "--workdir", workdir, input=plan_text(proxy.url, image, workdir, layers=layers),
         env=env, check=0)
    assert_cached(workdir, [image.layers[0], foreign])
    assert proxy.count("GET", foreign.digest) >= 1  # the registry was asked first
    assert blob_storage.count("GET", foreign.digest) == 1
    assert not any("Authorization" in r.headers for r in blob_storage.seen())


def test_an_expired_token_is_renewed_in_the_middle_of_a_pull(tool, token_registry, token_server, token_pusher,
                                                            repo_name, workdir, monkeypatch):
    # Tokens good for 2 s: the client drops them after 1, while the proxy holds the blob for 3.
    monkeypatch.setattr(tokenserver, "TOKEN_LIFETIME", 2)
    layer = random_layer(300_000)
    image = token_pusher.push_image(repo_name, "v1", [layer])
    with FaultProxy(token_registry.url) as proxy:
        proxy.add(Rule("stall", path=layer.digest, after=100_000, seconds=3, times=1, header="Authorization"))
        proxy.add(Rule("drop", path=layer.digest, after=150_000, times=1, header="Authorization"))
        before = len(token_server.token_requests())
        user, password = next(iter(token_registry.users.items()))
        tool("tosi-fetch", "--workdir", workdir, input=plan_text(proxy.url, image, workdir),
             env={"TOSI_USERNAME": user, "TOSI_PASSWORD": password}, check=0)
        answers = proxy.seen("GET", layer.digest)
    assert_cached(workdir, [layer])
    assert len(token_server.token_requests()) - before >= 2
    assert answers[-1].headers.get("Range", "").startswith("bytes=")


def test_a_token_without_pull_access_fails_at_once(tool, token_registry, token_pusher, repo_name, workdir):
    image = token_pusher.push_image(repo_name, "v1", [random_layer(1000)])  # not under public/
    started = time.monotonic()
    proc = tool("tosi-fetch", "--workdir", workdir, input=plan_text(token_registry.url, image, workdir),
                env={"TOSI_USERNAME": "", "DOCKER_CONFIG": workdir}, check=1)
    assert time.monotonic() - started < 5
    assert "401" in proc.stderr and proc.stderr.count("\n") == 1
