"""Where credentials come from, end to end against real registries (issue 12): the
precedence of flags, --authfile, auth.json and the docker config; auth.json namespace
entries; a credential helper written here (a shell script speaking docker's helper
protocol, on PATH) and one that fails; identity tokens traded at the token endpoint;
and what a refusal says (rejected credentials and where they came from, or none found)."""

import base64
import json
import stat

import pytest

from tests.support.plans import random_layer

HELPER = "tosi-test"


def b64(text):
    return base64.b64encode(text.encode()).decode()


class Home:
    """A HOME of its own for one test: files credentials are kept in, helpers on PATH,
    and the environment that makes tosi read only these."""

    def __init__(self, root):
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.docker_config = root / ".docker" / "config.json"
        self.runtime_auth = root / "run" / "containers" / "auth.json"

    def env(self, **extra):
        import os

        return {"HOME": str(self.root), "DOCKER_CONFIG": "", "REGISTRY_AUTH_FILE": "",
                "XDG_RUNTIME_DIR": str(self.root / "run"), "XDG_CONFIG_HOME": "",
                "TOSI_USERNAME": "", "TOSI_PASSWORD": "",
                "PATH": f"{self.bin}:{os.environ['PATH']}", **extra}

    def write(self, path, config):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return str(path)

    def helper(self, name, body):
        """docker-credential-NAME: answers `get` with `body` (shell, the server in $server)."""
        path = self.bin / f"docker-credential-{name}"
        path.write_text('#!/bin/sh\n[ "$1" = get ] || exit 2\nserver=$(cat)\n' + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def answering_helper(self, name, username, secret):
        self.helper(name, f'printf \'{{"ServerURL": "%s", "Username": "{username}", '
                          f'"Secret": "{secret}"}}\\n\' "$server"\n')


@pytest.fixture
def home(tmp_path):
    return Home(tmp_path / "home")


def auths(entries):
    """An auths map: {key: (user, password)}."""
    return {"auths": {key: {"auth": b64(f"{user}:{password}")} for key, (user, password) in entries.items()}}


def resolve(tool, workdir, reference, env, *flags, check=0, input=None):
    return tool("tosi-resolve", "-v", "--workdir", workdir, *flags, reference, env=env, check=check,
                input=input)


@pytest.fixture
def basic(htpasswd_registry, htpasswd_pusher, repo_name):
    """(registry, reference of a pushed image, user, password) on the htpasswd registry."""
    htpasswd_pusher.push_image(repo_name, "v1", [random_layer(2000)])
    user, password = next(iter(htpasswd_registry.users.items()))
    return htpasswd_registry, f"{htpasswd_registry.host}/{repo_name}:v1", user, password


# ---------------------------------------------------------------- precedence, end to end

LEVELS = ("flags", "--authfile", "auth.json", "docker config")


def configure(home, tmp_path, host, from_level, passwords):
    """Credentials for `host` at every level from `from_level` down, the password of level
    i being passwords[i]; returns (extra flags, the name tosi logs for `from_level`)."""
    user = "alice"
    flags, names = [], {}
    start = LEVELS.index(from_level)
    for level in LEVELS[start:]:
        password = passwords[LEVELS.index(level)]
        if level == "flags":
            flags += ["--username", user, "--password", password]
            names[level] = "--username"
        elif level == "--authfile":
            path = home.write(tmp_path / "explicit-auth.json", auths({host: (user, password)}))
            flags += ["--authfile", path]
            names[level] = f"auth.json {path}"
        elif level == "auth.json":
            names[level] = f"auth.json {home.write(home.runtime_auth, auths({host: (user, password)}))}"
        else:
            names[level] = f"docker config {home.write(home.docker_config, auths({host: (user, password)}))}"
    return flags, names[from_level]


@pytest.mark.parametrize("level", LEVELS)
def test_the_first_source_in_precedence_order_answers(tool, basic, home, tmp_path, workdir, level):
    registry, reference, _user, password = basic
    wrong = ["not-it-1", "not-it-2", "not-it-3", "not-it-4"]
    wrong[LEVELS.index(level)] = password  # right here, wrong everywhere below
    flags, name = configure(home, tmp_path, registry.host, level, wrong)
    proc = resolve(tool, workdir, reference, home.env(), *flags)
    assert f"credentials for {registry.host} from {name}\n" in proc.stderr
    assert password not in proc.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_wrong_credentials_of_the_first_source_are_rejected_naming_it(tool, basic, home, tmp_path, workdir,
                                                                      level):
    registry, reference, _user, password = basic
    passwords = [password] * 4
    passwords[LEVELS.index(level)] = "not-it-5"  # as docker and podman: no falling through
    flags, name = configure(home, tmp_path, registry.host, level, passwords)
    proc = resolve(tool, workdir, reference, home.env(), *flags, check=1)
    error = proc.stderr.splitlines()[-1]
    assert f": credentials rejected by {registry.host} (401 UNAUTHORIZED" in error
    assert error.endswith(f"; from {name})") and "not-it-5" not in proc.stderr


def test_environment_credentials_rejected_name_the_variable(tool, basic, home, workdir):
    registry, reference, user, _password = basic
    proc = resolve(tool, workdir, reference, home.env(TOSI_USERNAME=user, TOSI_PASSWORD="not-it-6"), check=1)
    assert proc.stderr.rstrip().endswith("; from TOSI_USERNAME)")


def test_no_credentials_at_all_says_how_to_give_some(tool, basic, home, workdir):
    registry, reference, _user, _password = basic
    proc = resolve(tool, workdir, reference, home.env(), check=1)
    assert proc.stderr == (f"tosi-resolve: error: {registry.host}: authentication required; no credentials "
                           f"for {registry.host}: give --username (or TOSI_USERNAME), --authfile, or log in "
                           "with docker or podman\n")


def test_a_token_server_refusing_anonymous_requests_says_how_to_give_credentials(
        tool, token_registry, token_server, token_pusher, home, workdir, repo_name):
    token_pusher.push_image(f"public/{repo_name}", "v1", [random_layer(1000)])
    token_server.anonymous = False
    try:
        proc = resolve(tool, workdir, f"{token_registry.host}/public/{repo_name}:v1", home.env(), check=1)
    finally:
        token_server.anonymous = True
    assert proc.stderr.splitlines()[-1] == (
        f"tosi-resolve: error: {token_registry.host}: token server refused anonymous access (401); no "
        f"credentials for {token_registry.host}: give --username (or TOSI_USERNAME), --authfile, or log in "
        "with docker or podman")


def test_tosi_names_its_own_flags_when_no_credentials_are_found(tool, basic, home, tmp_path):
    registry, reference, _user, _password = basic
    proc = tool("tosi", "-workdir", tmp_path / "w", "-image", reference, "-extractto", tmp_path / "root",
                env=home.env(), check=1)
    assert "give -username (or TOSI_USERNAME), -authfile, or log in" in proc.stderr


def test_the_most_specific_auth_json_namespace_entry_is_used(tool, htpasswd_registry, htpasswd_pusher, home,
                                                             workdir, repo_name):
    host = htpasswd_registry.host
    user, password = next(iter(htpasswd_registry.users.items()))
    for repo in (f"team/{repo_name}", f"other/{repo_name}"):
        htpasswd_pusher.push_image(repo, "v1", [random_layer(1000)])
    path = home.write(home.runtime_auth, auths({host: (user, "registry-wide-wrong"),
                                                f"{host}/team": (user, password)}))
    resolve(tool, workdir, f"{host}/team/{repo_name}:v1", home.env())
    proc = resolve(tool, workdir, f"{host}/other/{repo_name}:v1", home.env(), check=1)
    assert f"credentials rejected by {host}" in proc.stderr and f"from auth.json {path})" in proc.stderr


# ---------------------------------------------------------------- credential helpers

def test_a_credential_helper_on_path_logs_in(tool, basic, home, workdir):
    registry, reference, user, password = basic
    home.answering_helper(HELPER, user, password)
    path = home.write(home.docker_config, {"credHelpers": {registry.host: HELPER}})
    proc = resolve(tool, workdir, reference, home.env())
    assert f"credentials for {registry.host} from docker config {path} credHelpers: {HELPER}\n" in proc.stderr
    assert password not in proc.stderr


def test_a_failing_helper_is_one_warning_and_does_not_block_an_anonymous_pull(
        tool, token_registry, token_pusher, home, workdir, repo_name):
    image = token_pusher.push_image(f"public/{repo_name}", "v1", [random_layer(1000)])
    home.helper("broken", "echo 'the keyring is locked' >&2\nexit 3\n")
    home.write(home.docker_config, {"credHelpers": {token_registry.host: "broken"}})
    proc = tool("tosi-resolve", "--workdir", workdir, f"{token_registry.host}/public/{repo_name}:v1",
                env=home.env(), check=0)
    assert image.digest in proc.stdout
    [warning] = proc.stderr.splitlines()
    assert "docker-credential-broken" in warning and "exit status 3: the keyring is locked" in warning


def test_a_refusal_after_a_failing_helper_names_the_helpers_failure(tool, token_registry, token_pusher, home,
                                                                    workdir, repo_name):
    token_pusher.push_image(repo_name, "v1", [random_layer(1000)])
    home.helper("broken", "echo 'the keyring is locked' >&2\nexit 3\n")
    home.write(home.docker_config, {"credHelpers": {token_registry.host: "broken"}})
    proc = tool("tosi-resolve", "--workdir", workdir, f"{token_registry.host}/{repo_name}:v1", env=home.env(),
                check=1)
    error = proc.stderr.splitlines()[-1]
    assert f"no credentials for {token_registry.host}" in error
    assert "docker-credential-broken" in error and "the keyring is locked" in error


def test_a_missing_helper_is_named_in_the_refusal(tool, basic, home, workdir):
    registry, reference, _user, _password = basic
    home.write(home.docker_config, {"credHelpers": {registry.host: "absent"}})
    proc = resolve(tool, workdir, reference, home.env(), check=1)
    error = proc.stderr.splitlines()[-1]
    assert f"no credentials for {registry.host}" in error and "docker-credential-absent" in error
    assert "not on PATH" in error


# ---------------------------------------------------------------- identity tokens

@pytest.fixture
def identity_token(token_server):
    token = "identity-token-for-alice-1"
    token_server.refresh_tokens[token] = "alice"
    yield token
    token_server.refresh_tokens.pop(token, None)


def test_an_identity_token_is_traded_for_a_bearer_token(tool, token_registry, token_server, token_pusher, home,
                                                        workdir, repo_name, identity_token):
    image = token_pusher.push_image(repo_name, "v1", [random_layer(3000)])
    path = home.write(home.docker_config, {"auths": {token_registry.host: {"identitytoken": identity_token}}})
    before = len(token_server.requests)
    plan = resolve(tool, workdir, f"{token_registry.host}/{repo_name}:v1", home.env())
    assert image.digest in plan.stdout and f"from docker config {path}" in plan.stderr
    _path, form, _auth = token_server.requests[before]
    assert form["grant_type"] == ["refresh_token"] and form["refresh_token"] == [identity_token]
    assert form["scope"] == [f"repository:{repo_name}:pull"] and form["service"] == ["tosi-test-registry"]
    assert identity_token not in plan.stderr
    tool("tosi-fetch", "--workdir", workdir, input=plan.stdout, env=home.env(), check=0)


def test_an_identity_token_from_a_helper_is_traded_too(tool, token_registry, token_pusher, home, workdir,
                                                       repo_name, identity_token):
    image = token_pusher.push_image(repo_name, "v1", [random_layer(1000)])
    home.answering_helper(HELPER, "<token>", identity_token)
    home.write(home.docker_config, {"credsStore": HELPER})
    assert image.digest in resolve(tool, workdir, f"{token_registry.host}/{repo_name}:v1", home.env()).stdout


def test_an_unknown_identity_token_is_rejected_naming_its_source(tool, token_registry, token_pusher, home,
                                                                 workdir, repo_name):
    token_pusher.push_image(repo_name, "v1", [random_layer(1000)])
    path = home.write(home.docker_config, {"auths": {token_registry.host: {"identitytoken": "stale-token-9"}}})
    proc = resolve(tool, workdir, f"{token_registry.host}/{repo_name}:v1", home.env(), check=1)
    error = proc.stderr.splitlines()[-1]
    assert error.startswith(f"tosi-resolve: error: identity token rejected by {token_registry.host} "
                            "(its token server ")
    assert error.endswith(f" answered 400; from docker config {path})") and "stale-token-9" not in proc.stderr


def test_a_token_server_that_does_not_trade_identity_tokens_gives_an_anonymous_token(
        tool, token_registry, token_server, token_pusher, home, workdir, repo_name, identity_token):
    image = token_pusher.push_image(f"public/{repo_name}", "v1", [random_layer(1000)])
    home.write(home.docker_config, {"auths": {token_registry.host: {"identitytoken": identity_token}}})
    token_server.oauth = False
    try:
        before = len(token_server.requests)
        proc = resolve(tool, workdir, f"{token_registry.host}/public/{repo_name}:v1", home.env())
    finally:
        token_server.oauth = True
    assert image.digest in proc.stdout
    methods = [("POST" if "grant_type" in query else "GET", had_auth)
               for _path, query, had_auth in token_server.requests[before:]]
    assert methods == [("POST", False), ("GET", False)]


def test_an_identity_token_alone_cannot_answer_basic_auth(tool, basic, home, workdir):
    registry, reference, _user, _password = basic
    path = home.write(home.docker_config, {"auths": {registry.host: {"identitytoken": "idt-basic"}}})
    proc = resolve(tool, workdir, reference, home.env(), check=1)
    assert proc.stderr.splitlines()[-1] == (
        f"tosi-resolve: error: {registry.host}: authentication required: it asks for a password (HTTP Basic), "
        f"and the credentials from docker config {path} hold only an identity token")


def test_a_password_beside_an_identity_token_answers_basic_auth(tool, basic, home, workdir):
    registry, reference, user, password = basic
    home.write(home.docker_config, {"auths": {registry.host: {"auth": b64(f"{user}:{password}"),
                                                              "identitytoken": "idt-basic"}}})
    resolve(tool, workdir, reference, home.env())
