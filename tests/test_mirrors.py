"""Mirrors and pull-through caches, end to end against real registries.

The origin is the session's `registry`; a mirror is either a second
docker-registry configured as a pull-through cache of it (`pull_through`, as a
fleet would run CNCF distribution in proxy mode) or a fault proxy in front of
the origin (it serves the same content, counts what reached it, and injects
faults). registries.conf and daemon.json come from files the tests write
(TOSI_REGISTRIES_CONF, TOSI_DOCKER_DAEMON_JSON), never from /etc.
"""

import json
import os
import time

import pytest

from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import file_entry, make_layer
from tests.support.plans import parse_plan
from tests.support.registry import Registry

NO_CONFIG = {"TOSI_REGISTRIES_CONF": "", "TOSI_DOCKER_DAEMON_JSON": ""}


@pytest.fixture
def image(pusher, repo_name):
    layers = [make_layer([file_entry(f"etc/layer{i}", os.urandom(2048))]) for i in range(2)]
    return pusher.push_image(repo_name, "v1", layers)


@pytest.fixture
def pull_through(registry, tmp_path):
    """A docker-registry in proxy mode in front of `registry` (tests/../proxy-recipe)."""
    mirror = Registry(str(tmp_path / "mirror"), extra_config={"proxy": {"remoteurl": registry.url}})
    mirror.start()
    yield mirror
    mirror.stop()


@pytest.fixture
def mirror_proxy(registry):
    """A fault proxy in front of the origin, used as a mirror: same content, counted requests."""
    with FaultProxy(registry.url) as proxy:
        yield proxy


def proxy_host(proxy):
    return proxy.url.split("://", 1)[1]


def reference(registry, image):
    return f"{registry.host}/{image.repo}:{image.tag}"


def resolve_and_fetch(tool, workdir, ref, *flags, env=None, fetch_flags=()):
    """(resolve's plan, fetch's plan) of `tosi-resolve FLAGS REF | tosi-fetch`."""
    env = dict(NO_CONFIG, **(env or {}))
    resolved = tool("tosi-resolve", "--workdir", workdir, *flags, ref, env=env, check=0)
    fetched = tool("tosi-fetch", *fetch_flags, input=resolved.stdout, env=env, check=0)
    return parse_plan(resolved.stdout), parse_plan(fetched.stdout)


def stored_blob(registry, digest, timeout=10):
    """Whether `registry`'s storage holds the blob, waiting a little: a pull-through
    cache may finish writing it after it answered."""
    hex_ = digest.split(":", 1)[1]
    path = os.path.join(registry.storage, "docker/registry/v2/blobs/sha256", hex_[:2], hex_, "data")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.1)
    return False


def write_conf(tmp_path, text, name="registries.conf"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- a pull-through cache


def test_a_pull_through_cache_serves_every_blob_and_keeps_it(tool, registry, pull_through, image, workdir):
    resolved, fetched = resolve_and_fetch(tool, workdir, reference(registry, image),
                                          "--mirror", pull_through.url)
    record, layers = fetched[0], fetched[1:]
    # An http:// URL is plain http by choice: "insecure", as for daemon.json's http:// mirrors.
    assert record["mirrors"] == [{"registry": pull_through.host, "endpoint": pull_through.url,
                                  "repository": image.repo, "insecure": True}]
    assert record["servedBy"] == pull_through.url
    assert record["config"]["servedBy"] == pull_through.url
    assert [layer["servedBy"] for layer in layers] == [pull_through.url] * 2
    for layer in image.layers:
        assert stored_blob(pull_through, layer.digest), f"{layer.digest} not in the mirror's storage"


def test_a_plan_resolved_through_a_mirror_is_fetched_from_the_origin_once_the_mirror_is_gone(
        tool, registry, pull_through, image, workdir):
    env = dict(NO_CONFIG)
    resolved = tool("tosi-resolve", "--workdir", workdir, "--mirror", pull_through.url,
                    reference(registry, image), env=env, check=0)
    pull_through.stop()
    fetched = parse_plan(tool("tosi-fetch", input=resolved.stdout, env=env, check=0).stdout)
    assert [layer["servedBy"] for layer in fetched[1:]] == [registry.url] * 2


def test_with_the_mirror_stopped_a_pull_falls_back_to_the_origin(tool, registry, pull_through, image,
                                                                 workdir):
    pull_through.stop()
    resolved, fetched = resolve_and_fetch(tool, workdir, reference(registry, image),
                                          "--mirror", pull_through.url)
    assert fetched[0]["servedBy"] == registry.url
    assert [layer["servedBy"] for layer in fetched[1:]] == [registry.url] * 2


def test_tosi_pulls_through_the_mirror_given_with_dash_mirror(tool, registry, pull_through, image, tmp_path):
    target = tmp_path / "rootfs"
    tool("tosi", "-workdir", tmp_path / "w", "-image", reference(registry, image), "-mirror", pull_through.url,
         "-extractto", target, env=NO_CONFIG, check=0)
    assert (target / "etc/layer1").exists()
    for layer in image.layers:
        assert stored_blob(pull_through, layer.digest)


# ---------------------------------------------------------------- mirrors that fail


def test_a_mirror_serving_a_tampered_blob_is_rejected_and_the_origin_used(tool, registry, mirror_proxy,
                                                                        image, workdir):
    tampered = image.layers[0].digest
    mirror_proxy.add(Rule("corrupt", path=f"/blobs/{tampered}"))
    _, fetched = resolve_and_fetch(tool, workdir, reference(registry, image), "--mirror", mirror_proxy.url)
    layers = fetched[1:]
    assert layers[0]["servedBy"] == registry.url
    assert layers[1]["servedBy"] == mirror_proxy.url
    assert mirror_proxy.count("GET", f"/blobs/{tampered}") == 1  # not asked again: the next source is
    with open(layers[0]["path"], "rb") as f:
        assert f.read() == image.layers[0].data


def test_a_mirror_sending_wrong_bytes_costs_no_digest_retry_of_the_origin(tool, registry, mirror_proxy,
                                                                         image, workdir):
    # The origin's own flipped bytes still get the retries (digest.DIGEST_RETRIES = 2):
    # the mirror's one bad answer is not counted against them.
    digest = image.layers[0].digest
    mirror_proxy.add(Rule("corrupt", path=f"/blobs/{digest}"))
    with FaultProxy(registry.url) as origin:
        origin.add(Rule("corrupt", path=f"/blobs/{digest}", times=2))
        resolved = tool("tosi-resolve", "--workdir", workdir, "--mirror", mirror_proxy.url,
                        reference(registry, image), env=NO_CONFIG, check=0)
        plan = parse_plan(resolved.stdout)
        plan[0]["endpoint"] = origin.url  # the origin, through a proxy that flips bytes twice
        text = "".join(json.dumps(r) + "\n" for r in plan)
        fetched = parse_plan(tool("tosi-fetch", input=text, env=NO_CONFIG, check=0).stdout)
        assert origin.count("GET", f"/blobs/{digest}") == 3
        assert fetched[1]["servedBy"] == origin.url


@pytest.mark.parametrize("status", [404, 500, 503, 401])
def test_a_mirror_failing_a_blob_falls_through_to_the_origin(tool, registry, mirror_proxy, image, workdir,
                                                             status):
    digest = image.layers[1].digest
    mirror_proxy.add(Rule("status", path=f"/blobs/{digest}", status=status))
    _, fetched = resolve_and_fetch(tool, workdir, reference(registry, image), "--mirror", mirror_proxy.url)
    assert fetched[2]["servedBy"] == registry.url
    assert fetched[1]["servedBy"] == mirror_proxy.url
    assert mirror_proxy.count("GET", f"/blobs/{digest}") == 1  # no retries against a failing mirror


@pytest.mark.parametrize("status", [404, 503])
def test_a_mirror_failing_the_manifest_falls_through_to_the_origin(tool, registry, mirror_proxy, image,
                                                                   workdir, status):
    mirror_proxy.add(Rule("status", path="/manifests/", status=status, method=None))
    resolved, _ = resolve_and_fetch(tool, workdir, reference(registry, image), "--mirror", mirror_proxy.url)
    assert resolved[0]["servedBy"] == registry.url
    assert resolved[0]["digest"] == image.digest
    assert resolved[0]["mirrors"][0]["endpoint"] == mirror_proxy.url  # fetch tries it all the same


def test_several_mirrors_are_tried_in_order(tool, registry, mirror_proxy, image, workdir):
    with FaultProxy(registry.url) as first:
        first.add(Rule("status", path="/", status=503, method=None))
        resolved, fetched = resolve_and_fetch(tool, workdir, reference(registry, image),
                                              "--mirror", first.url, "--mirror", mirror_proxy.url)
        assert first.count() > 0
        assert [m["endpoint"] for m in resolved[0]["mirrors"]] == [first.url, mirror_proxy.url]
    assert {layer["servedBy"] for layer in fetched[1:]} == {mirror_proxy.url}


def test_a_tag_from_a_mirror_is_what_the_mirror_says(tool, registry, image, tmp_path, workdir):
    # Only digests are checked: a mirror's answer for a tag is taken, as any registry's
    # would be (mirror-by-digest-only is how registries.conf keeps tags to the origin).
    stale = Registry(str(tmp_path / "stale")).start()
    try:
        from tests.support.images import Pusher

        other = Pusher(stale.url).push_image(image.repo, image.tag, [make_layer([file_entry("etc/stale", b"s")])])
        resolved, fetched = resolve_and_fetch(tool, workdir, reference(registry, image), "--mirror", stale.url)
    finally:
        stale.stop()
    assert resolved[0]["digest"] == other.digest != image.digest
    assert fetched[1]["digest"] == other.layers[0].digest
    assert fetched[1]["servedBy"] == stale.url


def test_credentials_given_for_the_origin_never_reach_a_mirror(tool, htpasswd_registry, htpasswd_pusher,
                                                              repo_name, workdir):
    layers = [make_layer([file_entry("etc/secret-layer", b"x")])]
    image = htpasswd_pusher.push_image(repo_name, "v1", layers)
    user, password = next(iter(htpasswd_registry.users.items()))
    with FaultProxy(htpasswd_registry.url) as mirror:
        resolved, fetched = resolve_and_fetch(
            tool, workdir, f"{htpasswd_registry.host}/{image.repo}:v1", "--mirror", mirror.url,
            "--username", user, "--password", password,
            fetch_flags=("--username", user, "--password", password))
        assert mirror.count() > 0
        assert not [r for r in mirror.requests if "Authorization" in r.headers]
    assert fetched[1]["servedBy"] == htpasswd_registry.url


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize("value", ["ftp://mirror.example.com", "mirror.example.com/Bad_NS",
                                   "https://user:pw@mirror.example.com", "", "http://"])
def test_a_malformed_mirror_is_a_usage_error(tool, value, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, "--mirror", value, "127.0.0.1:1/x:y", env=NO_CONFIG)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("tosi-resolve: error: --mirror")
    assert "pw@" not in proc.stderr  # a password in the URL is not repeated


def test_tosi_refuses_a_malformed_mirror_before_any_request(tool, tmp_path):
    proc = tool("tosi", "-workdir", tmp_path / "w", "-image", "127.0.0.1:1/x", "-mirror", "ftp://m",
                env=NO_CONFIG)
    assert proc.returncode == 2
    assert "-mirror" in proc.stderr and "Traceback" not in proc.stderr


def test_a_mirror_namespace_prefixes_the_repository(tool, registry, pusher, repo_name, workdir):
    # A Harbor-style proxy project: the mirror keeps docker.io/library/x as proj/library/x.
    layers = [make_layer([file_entry("etc/ns", b"ns")])]
    origin = pusher.push_image(repo_name, "v1", layers)
    pusher.push_image(f"proj/{repo_name}", "v1", layers)  # what the mirror serves under the namespace
    with FaultProxy(registry.url) as mirror:
        resolved, fetched = resolve_and_fetch(tool, workdir, f"{registry.host}/{origin.repo}:v1",
                                              "--mirror", f"{mirror.url}/proj")
        assert mirror.count("GET", f"/v2/proj/{repo_name}/blobs/") > 0
        assert fetched[1]["servedBy"] == mirror.url
    assert resolved[0]["mirrors"][0]["repository"] == f"proj/{repo_name}"


def test_tosi_fetch_mirror_replaces_the_plans_mirrors(tool, registry, mirror_proxy, image, workdir):
    with FaultProxy(registry.url) as planned:
        resolved = tool("tosi-resolve", "--workdir", workdir, "--mirror", planned.url,
                        reference(registry, image), env=NO_CONFIG, check=0)
        before = planned.count("GET", "/blobs/")
        fetched = parse_plan(tool("tosi-fetch", "--mirror", mirror_proxy.url, input=resolved.stdout,
                                  env=NO_CONFIG, check=0).stdout)
        assert planned.count("GET", "/blobs/") == before
    assert [m["endpoint"] for m in fetched[0]["mirrors"]] == [mirror_proxy.url]
    assert {layer["servedBy"] for layer in fetched[1:]} == {mirror_proxy.url}


# ---------------------------------------------------------------- registries.conf and daemon.json


def test_registries_conf_mirror_and_location_rewrite_end_to_end(tool, registry, mirror_proxy, image,
                                                                tmp_path, workdir):
    namespace, _, name = image.repo.partition("/")
    conf = write_conf(tmp_path, f"""
[[registry]]
prefix = "registry.example.com/apps"
location = "{registry.host}/{namespace}"

[[registry.mirror]]
location = "{proxy_host(mirror_proxy)}/{namespace}"
""")
    resolved, fetched = resolve_and_fetch(tool, workdir, f"registry.example.com/apps/{name}:v1",
                                          env={"TOSI_REGISTRIES_CONF": conf})
    record = resolved[0]
    assert record["reference"] == f"registry.example.com/apps/{name}:v1"
    assert (record["registry"], record["repository"]) == (registry.host, image.repo)
    assert record["mirrors"] == [{"registry": proxy_host(mirror_proxy), "endpoint": mirror_proxy.url,
                                  "repository": image.repo, "insecure": False}]
    assert record["digest"] == image.digest
    assert mirror_proxy.count("GET", f"/v2/{image.repo}/manifests/v1") == 1
    assert {layer["servedBy"] for layer in fetched[1:]} == {mirror_proxy.url}


def test_dash_mirror_replaces_the_mirrors_registries_conf_names(tool, registry, mirror_proxy, image,
                                                               tmp_path, workdir):
    with FaultProxy(registry.url) as configured:
        conf = write_conf(tmp_path, f"""
[[registry]]
location = "{registry.host}"
[[registry.mirror]]
location = "{proxy_host(configured)}"
""")
        resolved, fetched = resolve_and_fetch(tool, workdir, reference(registry, image),
                                              "--mirror", mirror_proxy.url, env={"TOSI_REGISTRIES_CONF": conf})
        assert configured.count() == 0
    assert [m["endpoint"] for m in resolved[0]["mirrors"]] == [mirror_proxy.url]
    assert {layer["servedBy"] for layer in fetched[1:]} == {mirror_proxy.url}


def test_mirror_by_digest_only_keeps_a_tag_to_the_origin(tool, registry, mirror_proxy, image, tmp_path,
                                                          workdir):
    conf = write_conf(tmp_path, f"""
[[registry]]
location = "{registry.host}"
mirror-by-digest-only = true
[[registry.mirror]]
location = "{proxy_host(mirror_proxy)}"
""")
    env = {"TOSI_REGISTRIES_CONF": conf}
    by_tag, fetched = resolve_and_fetch(tool, workdir, reference(registry, image), env=env)
    assert mirror_proxy.count() == 0
    assert "mirrors" not in by_tag[0]
    by_digest, fetched = resolve_and_fetch(tool, str(workdir) + "2", f"{registry.host}/{image.repo}@{image.digest}",
                                           env=env)
    assert by_digest[0]["mirrors"][0]["endpoint"] == mirror_proxy.url
    assert {layer["servedBy"] for layer in fetched[1:]} == {mirror_proxy.url}


def test_daemon_json_registry_mirrors_do_not_serve_other_registries(tool, registry, mirror_proxy, image,
                                                                    tmp_path, workdir):
    daemon = write_conf(tmp_path, f'{{"registry-mirrors": ["{mirror_proxy.url}"]}}', "daemon.json")
    resolved, _ = resolve_and_fetch(tool, workdir, reference(registry, image),
                                    env={"TOSI_DOCKER_DAEMON_JSON": daemon})
    assert "mirrors" not in resolved[0]
    assert mirror_proxy.count() == 0


def test_a_blocked_registry_is_refused_with_exit_2(tool, registry, image, tmp_path, workdir):
    conf = write_conf(tmp_path, f"""
[[registry]]
location = "{registry.host}"
blocked = true
""")
    proc = tool("tosi-resolve", "--workdir", workdir, reference(registry, image),
                env={"TOSI_REGISTRIES_CONF": conf, "TOSI_DOCKER_DAEMON_JSON": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("tosi-resolve: error: pulling ") and "blocked" in proc.stderr


def test_tosi_refuses_a_blocked_registry_with_exit_2(tool, registry, image, tmp_path):
    conf = write_conf(tmp_path, f"""
[[registry]]
location = "{registry.host}"
blocked = true
""")
    proc = tool("tosi", "-workdir", tmp_path / "w", "-image", reference(registry, image),
                env={"TOSI_REGISTRIES_CONF": conf, "TOSI_DOCKER_DAEMON_JSON": ""})
    assert proc.returncode == 2
    assert "blocked" in proc.stderr


def test_a_short_name_alias_resolves_to_its_registry(tool, registry, image, tmp_path, workdir):
    conf = write_conf(tmp_path, f"""
[aliases]
"myapp" = "{registry.host}/{image.repo}"
""")
    resolved, _ = resolve_and_fetch(tool, workdir, "myapp:v1", env={"TOSI_REGISTRIES_CONF": conf})
    assert resolved[0]["reference"] == f"{registry.host}/{image.repo}:v1"
    assert resolved[0]["digest"] == image.digest


def test_a_short_name_is_tried_at_each_search_registry_in_order(tool, registry, image, tmp_path, workdir):
    with FaultProxy(registry.url) as first:
        first.add(Rule("status", path="/manifests/", status=404, method=None))
        conf = write_conf(tmp_path, f"""
unqualified-search-registries = ["{proxy_host(first)}", "{registry.host}"]
""")
        resolved, _ = resolve_and_fetch(tool, workdir, f"{image.repo}:v1", env={"TOSI_REGISTRIES_CONF": conf})
        assert first.count(path="/manifests/") > 0
    assert resolved[0]["registry"] == registry.host


def test_an_ambiguous_short_name_in_enforcing_mode_is_exit_2(tool, tmp_path, workdir):
    conf = write_conf(tmp_path, """
short-name-mode = "enforcing"
unqualified-search-registries = ["a.example.com", "b.example.com"]
""")
    proc = tool("tosi-resolve", "--workdir", workdir, "someimage", env={"TOSI_REGISTRIES_CONF": conf,
                                                                        "TOSI_DOCKER_DAEMON_JSON": ""})
    assert proc.returncode == 2
    assert "ambiguous" in proc.stderr


# ---------------------------------------------------------------- the plan from stdin


def test_a_plans_mirrors_are_checked_when_it_is_read(tool, registry, image, workdir):
    resolved = tool("tosi-resolve", "--workdir", workdir, reference(registry, image), env=NO_CONFIG, check=0)
    plan = parse_plan(resolved.stdout)
    plan[0]["mirrors"] = [{"registry": "m.example.com", "endpoint": "file:///etc", "repository": "x"}]
    text = "".join(json.dumps(r) + "\n" for r in plan)
    proc = tool("tosi-fetch", input=text, env=NO_CONFIG)
    assert proc.returncode == 2
    assert "mirrors[0]" in proc.stderr and "endpoint" in proc.stderr
