"""Credential sources (issue 12): docker's config.json (inline auths, identity tokens,
credHelpers and credsStore run as docker-credential-NAME), containers' auth.json with
repository namespaces, and the order in which they are asked. The helpers are shell
scripts written here, speaking docker's helper protocol (`get`, server on stdin)."""

import base64
import json
import os
import stat
import time

import pytest

from tests.support.plans import random_layer
from tosi_tools import credstore
from tosi_tools.auth import Credentials, refresh_token_form
from tosi_tools.credstore import HUB_KEY, default_sources, file_sources, find_credentials, matching_keys

REGISTRY = "registry.example.com:5000"
SECRET = "s3cret-never-shown"


def b64(text):
    return base64.b64encode(text.encode()).decode()


class Helpers:
    """A PATH directory of docker-credential-* scripts; each logs the server it was asked about."""

    def __init__(self, root):
        self.bin = root / "helper-bin"
        self.bin.mkdir()
        self.log = root / "helper-calls"
        self.log.write_text("")

    def add(self, name, body):
        path = self.bin / f"docker-credential-{name}"
        path.write_text("#!/bin/sh\n"
                        '[ "$1" = get ] || { echo "only get: $1" >&2; exit 2; }\n'
                        "server=$(cat)\n"
                        f'echo "{name} $server" >> "{self.log}"\n' + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def answering(self, name, username, secret):
        answer = json.dumps({"ServerURL": "SERVER", "Username": username, "Secret": secret})
        self.add(name, f"printf '%s\\n' '{answer}' | sed \"s|SERVER|$server|\"\n")

    def calls(self):
        return self.log.read_text().splitlines()

    def environ(self, **extra):
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": "/nonexistent", **extra}


@pytest.fixture
def helpers(tmp_path):
    return Helpers(tmp_path)


def docker_config(tmp_path, config, name="docker"):
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory / "config.json")


def docker_sources(helpers, tmp_path, config, **options):
    return file_sources(docker_config(tmp_path, config), credstore.DOCKER_CONFIG_KIND,
                        helpers.environ(), **options)


def found(sources, registry=REGISTRY, repository="team/app"):
    credentials, _source = find_credentials(sources, registry, repository)
    return credentials


def pair(credentials):
    return None if credentials is None else (credentials.username, credentials.password)


def every_text(sources):
    return " ".join(credstore.source_warnings(sources) + [n for s in sources for n in s.notes])


# ---------------------------------------------------------------- credential helpers

def test_a_credential_helper_is_asked_with_the_server_on_stdin(helpers, tmp_path):
    helpers.answering("test", "alice", SECRET)
    sources = docker_sources(helpers, tmp_path, {"credHelpers": {REGISTRY: "test"}})
    credentials, source = find_credentials(sources, REGISTRY, "team/app")
    assert pair(credentials) == ("alice", SECRET) and credentials.registry == REGISTRY
    assert source.name.endswith("credHelpers: test") and "config.json" in source.name
    assert helpers.calls() == [f"test {REGISTRY}"]


def test_a_helper_runs_once_per_registry_however_often_it_is_asked(helpers, tmp_path):
    helpers.answering("test", "alice", SECRET)
    sources = docker_sources(helpers, tmp_path, {"credsStore": "test"})
    for repository in ("a", "b", "c"):
        assert pair(found(sources, repository=repository)) == ("alice", SECRET)
    assert pair(found(sources, "other.example.com")) == ("alice", SECRET)
    assert helpers.calls() == [f"test {REGISTRY}", "test other.example.com"]


def test_a_helper_answering_the_token_user_gives_an_identity_token(helpers, tmp_path):
    helpers.answering("test", "<token>", "refresh-token-1")
    credentials = found(docker_sources(helpers, tmp_path, {"credsStore": "test"}))
    assert credentials.identity_token == "refresh-token-1"
    assert credentials.password is None and credentials.username is None


def test_docker_hub_is_asked_for_under_its_v1_key(helpers, tmp_path):
    helpers.answering("hub", "bob", SECRET)
    sources = docker_sources(helpers, tmp_path, {"credHelpers": {HUB_KEY: "hub"}})
    assert pair(found(sources, "docker.io", "library/alpine")) == ("bob", SECRET)
    assert pair(found(sources, "index.docker.io", "library/alpine")) == ("bob", SECRET)
    assert found(sources, "quay.io", "x/y") is None
    assert helpers.calls() == [f"hub {HUB_KEY}"]


def test_a_credential_helper_for_the_registry_wins_over_the_credentials_store(helpers, tmp_path):
    helpers.answering("own", "own-user", SECRET)
    helpers.answering("store", "store-user", SECRET)
    helpers.add("broken", "echo 'keyring locked' >&2\nexit 1\n")
    sources = docker_sources(helpers, tmp_path, {
        "credsStore": "store",
        "credHelpers": {REGISTRY: "own", "failing.example.com": "broken"}})
    assert pair(found(sources)) == ("own-user", SECRET)
    assert pair(found(sources, "elsewhere.example.com")) == ("store-user", SECRET)
    # As docker: a registry with its own helper is never handed to the store.
    assert found(sources, "failing.example.com") is None
    assert helpers.calls() == [f"own {REGISTRY}", "store elsewhere.example.com",
                               "broken failing.example.com"]


def test_a_failing_helper_gives_no_credentials_and_one_warning_with_its_stderr(helpers, tmp_path):
    helpers.add("broken", "echo 'cannot reach the keyring daemon' >&2\nexit 3\n")
    sources = docker_sources(helpers, tmp_path, {"credHelpers": {REGISTRY: "broken"}})
    assert found(sources) is None and found(sources) is None
    warnings = credstore.source_warnings(sources)
    assert len(warnings) == 1
    assert "docker-credential-broken" in warnings[0] and "exit status 3" in warnings[0]
    assert "cannot reach the keyring daemon" in warnings[0] and REGISTRY in warnings[0]


def test_a_helpers_complaint_is_quoted_on_one_line_and_at_most_200_characters(helpers, tmp_path):
    helpers.add("noisy", "printf 'line one\\nline two %0300d\\n' 0 >&2\nexit 1\n")
    sources = docker_sources(helpers, tmp_path, {"credsStore": "noisy"})
    assert found(sources) is None
    [warning] = credstore.source_warnings(sources)
    assert "\n" not in warning and "line one line two 000" in warning
    assert warning.endswith("...") and len(warning.split(": ", 2)[-1]) <= 203


def test_a_helper_without_credentials_for_the_server_is_a_note_not_a_warning(helpers, tmp_path):
    helpers.add("empty", "echo 'credentials not found in native keychain'\nexit 1\n")
    sources = docker_sources(helpers, tmp_path, {"credsStore": "empty"})
    assert found(sources) is None
    assert credstore.source_warnings(sources) == []
    [note] = sources[-1].notes
    assert "docker-credential-empty" in note and REGISTRY in note


def test_a_missing_helper_gives_no_credentials_and_a_warning_naming_it(helpers, tmp_path):
    sources = docker_sources(helpers, tmp_path, {"credHelpers": {REGISTRY: "absent"}})
    assert found(sources) is None
    [warning] = credstore.source_warnings(sources)
    assert "docker-credential-absent" in warning and "not on PATH" in warning


def test_a_helper_name_that_is_a_path_is_not_run(helpers, tmp_path):
    helpers.answering("test", "alice", SECRET)
    escape = f"../{helpers.bin.name}/docker-credential-test"
    sources = docker_sources(helpers, tmp_path, {"credsStore": escape})
    assert found(sources) is None
    assert helpers.calls() == [] and "not a plain program name" in credstore.source_warnings(sources)[0]


def test_a_slow_helper_is_killed_at_the_timeout(helpers, tmp_path):
    pidfile = tmp_path / "slow.pid"
    helpers.add("slow", f"echo $$ > {pidfile}\nsleep 30\n")
    sources = docker_sources(helpers, tmp_path, {"credsStore": "slow"}, timeout=0.5)
    started = time.monotonic()
    assert found(sources) is None
    assert time.monotonic() - started < 5
    [warning] = credstore.source_warnings(sources)
    assert "docker-credential-slow" in warning and "no answer within 0.5 s" in warning
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)


def test_a_helper_answer_that_is_not_json_is_a_warning_that_quotes_none_of_it(helpers, tmp_path):
    helpers.add("garbled", f"echo '{{\"Username\": \"alice\", \"Secret\": \"{SECRET}\"'\n")
    sources = docker_sources(helpers, tmp_path, {"credsStore": "garbled"})
    assert found(sources) is None
    [warning] = credstore.source_warnings(sources)
    assert "not JSON" in warning and SECRET not in warning


def test_a_failing_helper_that_printed_json_is_not_quoted(helpers, tmp_path):
    helpers.add("leaky", f"echo '{{\"Username\": \"alice\", \"Secret\": \"{SECRET}\"}}'\nexit 1\n")
    sources = docker_sources(helpers, tmp_path, {"credsStore": "leaky"})
    assert found(sources) is None
    assert "exit status 1" in every_text(sources) and SECRET not in every_text(sources)


def test_a_helper_answer_over_the_limit_is_refused(helpers, tmp_path, monkeypatch):
    monkeypatch.setattr(credstore, "MAX_HELPER_ANSWER", 1000)
    helpers.add("flood", "head -c 100000 /dev/zero | tr '\\0' x\n")
    sources = docker_sources(helpers, tmp_path, {"credsStore": "flood"})
    assert found(sources) is None
    assert "an answer over 1000 bytes" in credstore.source_warnings(sources)[0]


# ---------------------------------------------------------------- inline auths

def test_inline_auth_username_password_and_identity_token_entries(helpers, tmp_path):
    sources = docker_sources(helpers, tmp_path, {"auths": {
        "a.example.com": {"auth": b64(f"alice:{SECRET}")},
        "b.example.com": {"username": "bob", "password": SECRET},
        "c.example.com": {"auth": b64("carol:"), "identitytoken": "refresh-token-2"},
        "d.example.com": {}}})
    assert pair(found(sources, "a.example.com")) == ("alice", SECRET)
    assert pair(found(sources, "b.example.com")) == ("bob", SECRET)
    token = found(sources, "c.example.com")
    assert (token.username, token.password, token.identity_token) == ("carol", None, "refresh-token-2")
    assert found(sources, "d.example.com") is None


@pytest.mark.parametrize("key", [REGISTRY, f"https://{REGISTRY}", f"http://{REGISTRY}", f"{REGISTRY}/",
                                 f"https://{REGISTRY}/v1/", f"https://{REGISTRY}/v2/"])
def test_docker_config_keys_match_with_or_without_scheme_slash_and_api_path(helpers, tmp_path, key):
    sources = docker_sources(helpers, tmp_path, {"auths": {key: {"auth": b64(f"alice:{SECRET}")}}})
    assert pair(found(sources)) == ("alice", SECRET)
    assert found(sources, "registry.example.com") is None


@pytest.mark.parametrize("key", [HUB_KEY, "docker.io", "index.docker.io", "https://index.docker.io/v1",
                                 "registry-1.docker.io"])
def test_docker_hubs_key_and_aliases_match_docker_io(helpers, tmp_path, key):
    sources = docker_sources(helpers, tmp_path, {"auths": {key: {"auth": b64(f"alice:{SECRET}")}}})
    assert pair(found(sources, "docker.io", "library/alpine")) == ("alice", SECRET)


def test_a_malformed_entry_is_a_warning_and_the_next_match_is_used(helpers, tmp_path):
    sources = docker_sources(helpers, tmp_path, {"auths": {
        REGISTRY: {"auth": "%%% not base64"}, f"https://{REGISTRY}": {"auth": b64(f"alice:{SECRET}")}}})
    assert pair(found(sources)) == ("alice", SECRET)
    [warning] = credstore.source_warnings(sources)
    assert repr(REGISTRY) in warning and "not base64" in warning


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"auths": []}', '{"credHelpers": "x"}'])
def test_a_malformed_config_file_is_one_warning_naming_it(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    sources = file_sources(str(tmp_path / "config.json"), credstore.DOCKER_CONFIG_KIND, {"PATH": ""})
    assert found(sources) is None
    [warning] = credstore.source_warnings(sources)
    assert str(tmp_path / "config.json") in warning


# ---------------------------------------------------------------- auth.json namespaces

def test_the_most_specific_auth_json_entry_wins(tmp_path):
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {
        REGISTRY: {"auth": b64("registry-wide:p1")},
        f"{REGISTRY}/team/app": {"auth": b64("app-only:p3")},
        f"{REGISTRY}/team": {"auth": b64("team:p2")},
        "docker.io/library": {"auth": b64("hub-library:p4")}}}))
    sources = file_sources(str(path), credstore.AUTH_JSON_KIND, {})
    assert pair(found(sources, REGISTRY, "team/app")) == ("app-only", "p3")
    assert pair(found(sources, REGISTRY, "team/app/sub")) == ("app-only", "p3")
    assert pair(found(sources, REGISTRY, "team/other")) == ("team", "p2")
    assert pair(found(sources, REGISTRY, "teams/app")) == ("registry-wide", "p1")
    assert pair(found(sources, REGISTRY, None)) == ("registry-wide", "p1")
    assert pair(found(sources, "docker.io", "library/alpine")) == ("hub-library", "p4")
    assert found(sources, "docker.io", "someone/alpine") is None


def test_an_auth_json_namespace_key_does_not_name_its_whole_registry():
    keys = [f"{REGISTRY}/team", f"https://{REGISTRY}/v1/"]
    assert matching_keys(keys, REGISTRY, "other/app", docker_keys=False) == [f"https://{REGISTRY}/v1/"]
    assert matching_keys(keys, REGISTRY, "team/app", docker_keys=False) == keys
    # docker cuts every key at its first "/": there the namespace key names the registry too.
    assert matching_keys(keys, REGISTRY, "other/app", docker_keys=True) == keys


def test_auth_json_credential_helpers_are_asked_before_its_entries(helpers, tmp_path):
    helpers.answering("test", "from-helper", SECRET)
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"credHelpers": {REGISTRY: "test"},
                                "auths": {REGISTRY: {"auth": b64("inline:p")}}}))
    sources = file_sources(str(path), credstore.AUTH_JSON_KIND, helpers.environ())
    assert pair(found(sources)) == ("from-helper", SECRET)


# ---------------------------------------------------------------- precedence

def write_auth(path, user, registry=REGISTRY):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {registry: {"auth": b64(f"{user}:pw-{user}")}}}))
    return str(path)


@pytest.fixture
def every_file(tmp_path):
    """One file per place, each with its own user for REGISTRY; the environment naming them."""
    home = tmp_path / "home"
    environ = {
        "HOME": str(home),
        "REGISTRY_AUTH_FILE": write_auth(tmp_path / "env" / "auth.json", "registry-auth-file"),
        "XDG_RUNTIME_DIR": str(tmp_path / "run"),
        "PATH": "/usr/bin:/bin",
    }
    write_auth(tmp_path / "run" / "containers" / "auth.json", "xdg-runtime")
    write_auth(home / ".config" / "containers" / "auth.json", "config-home")
    write_auth(home / ".docker" / "config.json", "docker-home")
    return environ


def first_user(environ, **options):
    return found(default_sources(environ=environ, **options)).username


class FlagsSource:
    name = "flags"

    def lookup(self, registry, repository=None):
        return Credentials("from-flags", "pw", registry)


def test_sources_are_asked_in_the_documented_order(tmp_path, every_file):
    authfile = write_auth(tmp_path / "explicit.json", "authfile")
    assert first_user(every_file, flags_source=FlagsSource(), authfile=authfile) == "from-flags"
    assert first_user(every_file, authfile=authfile) == "authfile"
    assert first_user(every_file) == "registry-auth-file"
    del every_file["REGISTRY_AUTH_FILE"]
    assert first_user(every_file) == "xdg-runtime"
    os.remove(tmp_path / "run" / "containers" / "auth.json")
    assert first_user(every_file) == "config-home"
    os.remove(tmp_path / "home" / ".config" / "containers" / "auth.json")
    assert first_user(every_file) == "docker-home"
    every_file["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
    write_auth(tmp_path / "docker-config" / "config.json", "docker-config-env")
    assert first_user(every_file) == "docker-config-env"


def test_authfile_and_registry_auth_file_take_the_place_of_the_runtime_file_as_in_podman(tmp_path,
                                                                                       every_file):
    empty = write_auth(tmp_path / "empty.json", "nobody", registry="unrelated.example.com")
    assert first_user(every_file, authfile=empty) == "config-home"
    every_file["REGISTRY_AUTH_FILE"] = empty
    assert first_user(every_file) == "config-home"


def test_auth_json_wins_over_the_docker_configs_helpers(helpers, tmp_path):
    helpers.answering("test", "from-helper", SECRET)
    environ = helpers.environ(HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(tmp_path / "run"))
    write_auth(tmp_path / "run" / "containers" / "auth.json", "xdg-runtime")
    docker_config(tmp_path / "home", {"credsStore": "test"}, name=".docker")
    assert found(default_sources(environ=environ)).username == "xdg-runtime"
    assert found(default_sources(environ=environ), "other.example.com").username == "from-helper"


def test_a_file_named_by_the_environment_that_is_missing_is_a_warning(tmp_path):
    environ = {"HOME": str(tmp_path), "REGISTRY_AUTH_FILE": str(tmp_path / "typo.json")}
    sources = default_sources(environ=environ)
    assert found(sources) is None
    [warning] = credstore.source_warnings(sources)
    assert "REGISTRY_AUTH_FILE" in warning and "typo.json" in warning


def test_without_any_file_there_is_no_source_and_no_warning(tmp_path):
    sources = default_sources(environ={"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")})
    assert sources == [] and found(sources) is None


# ---------------------------------------------------------------- identity tokens

def test_the_refresh_token_form_trades_the_identity_token():
    credentials = Credentials("carol", None, "r.example.com", identity_token="refresh-token-3")
    assert refresh_token_form(credentials, "registry.docker.io", "repository:library/alpine:pull") == {
        "grant_type": "refresh_token", "refresh_token": "refresh-token-3", "client_id": "tosi",
        "service": "registry.docker.io", "scope": "repository:library/alpine:pull"}
    form = refresh_token_form(credentials, None, ["repository:a:pull", "repository:b:pull"], client_id="x")
    assert form["scope"] == ["repository:a:pull", "repository:b:pull"] and "service" not in form
    assert "scope" not in refresh_token_form(credentials, "s", None)
    with pytest.raises(ValueError):
        refresh_token_form(Credentials("u", "p"), "s", None)


def test_the_repr_of_credentials_hides_the_identity_token():
    text = repr(Credentials("carol", None, "r.example.com", identity_token="refresh-token-4"))
    assert "refresh-token-4" not in text and "identity_token=<hidden>" in text


# ---------------------------------------------------------------- the commands (until the transport)

def test_an_authfile_that_names_no_file_is_a_usage_error(tool, tmp_path):
    for cmd, flag in (("tosi-resolve", "--authfile"), ("tosi", "-authfile")):
        args = [flag, tmp_path / "missing.json"] + (["-image", "alpine"] if cmd == "tosi" else ["alpine"])
        proc = tool(cmd, *args, check=2)
        assert f"{flag} " in proc.stderr and "no such file" in proc.stderr


def test_resolve_and_fetch_log_in_with_the_authfile_and_name_it_at_v(tool, htpasswd_registry, htpasswd_pusher,
                                                                     repo_name, workdir, tmp_path):
    htpasswd_pusher.push_image(repo_name, "v1", [random_layer(3000)])
    user, password = next(iter(htpasswd_registry.users.items()))
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {f"{htpasswd_registry.host}/{repo_name}": {
        "auth": b64(f"{user}:{password}")}}}))
    env = {"TOSI_USERNAME": "", "TOSI_PASSWORD": "", "HOME": str(tmp_path), "DOCKER_CONFIG": "",
           "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    plan = tool("tosi-resolve", "-v", "--workdir", workdir, "--authfile", authfile,
                f"{htpasswd_registry.host}/{repo_name}:v1", env=env, check=0)
    assert f"from auth.json {authfile}" in plan.stderr and password not in plan.stderr
    fetched = tool("tosi-fetch", "-v", "--workdir", workdir, "--authfile", authfile, input=plan.stdout,
                   env=env, check=0)
    assert f"from auth.json {authfile}" in fetched.stderr
