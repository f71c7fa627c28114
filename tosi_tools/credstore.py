"""Where people keep registry credentials: Docker's config.json and containers' auth.json.

A *source* answers `lookup(registry, repository)` with `auth.Credentials` bound to
`registry` (host[:port] as a reference names it) or None, and has a `name` for
logs ("docker config /root/.docker/config.json credHelpers: ecr-login"). Besides:
`warnings`, one-line texts of what failed (a credential helper that is missing,
exits non-zero, times out or answers garbage; a malformed file): the caller logs
each once and may add them to a later "registry refused" error; and `notes`, what
is worth adding to such an error but not worth a warning (a helper that has no
credentials for that registry). A source never raises for what it reads or runs,
and no warning, note or log line holds a secret.

`default_sources` gives them in the documented precedence (tosi-resolve(1)):
the flags source, the first of --authfile / $REGISTRY_AUTH_FILE /
$XDG_RUNTIME_DIR/containers/auth.json (/run/containers/UID/auth.json without
XDG_RUNTIME_DIR), $XDG_CONFIG_HOME/containers/auth.json (~/.config), then
$DOCKER_CONFIG/config.json (~/.docker/config.json). Within one file, a
registry's own `credHelpers` entry comes first (docker and podman both ask it
before an inline entry), then `auths`, then (docker config only) `credsStore`,
which is not asked for a registry that has a credHelpers entry (as docker).

Keys are matched as docker and podman do: the entry naming the longest
repository namespace (`registry.example.com/team/app`, `.../team`, then the
registry) wins; a key with a scheme, a trailing slash or a path such as `/v1/`
names its host, in a docker config any key does (docker cuts keys at the first
"/"), and Docker Hub's `https://index.docker.io/v1/`, `index.docker.io` and
`registry-1.docker.io` are docker.io.
"""

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from typing import Any

from .auth import Credentials
from .errors import flag
from .reference import DOCKER_HUB, DOCKER_HUB_ALIASES

log = logging.getLogger("tosi.credstore")

# What docker login writes for Docker Hub, and the server a helper is asked about for it.
HUB_KEY = "https://index.docker.io/v1/"
# A helper may go to the network (ECR, GCR): generous, but a hung one must not hang a pull.
HELPER_TIMEOUT = 30.0
MAX_HELPER_ANSWER = 1 << 20
MAX_HELPER_STDERR = 64 << 10
MAX_CONFIG_BYTES = 4 << 20
# How much of a helper's complaint a warning quotes.
DETAIL_LIMIT = 200
# docker-credential-helpers' message for "nothing stored for that server" (exit status 1).
NOT_FOUND_MESSAGE = "credentials not found in native keychain"
# A helper's user name that says the secret is an identity token (docker/cli).
TOKEN_USERNAME = "<token>"
DOCKER_CONFIG_KIND = "docker config"
AUTH_JSON_KIND = "auth.json"
# Run as docker-credential-NAME found on PATH: NAME must not make it a path.
_HELPER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_SCHEMES = ("https://", "http://")


def _canonical_host(host: str) -> str:
    host = host.lower()
    return DOCKER_HUB if host in (DOCKER_HUB, *DOCKER_HUB_ALIASES) else host


def _normalized_key(key: str, host_only: bool) -> str:
    """What an auths/credHelpers key names: "host[:port]" or "host[:port]/namespace"."""
    text = key.strip()
    for scheme in _SCHEMES:
        if text.lower().startswith(scheme):
            text, host_only = text[len(scheme):], True
            break
    host, _, path = text.rstrip("/").partition("/")
    host = _canonical_host(host)
    return host if host_only or not path else f"{host}/{path}"


def _wanted_names(registry: str, repository: str | None) -> list[str]:
    """The names an entry may have for `repository` on `registry`, most specific first."""
    names = [registry]
    for part in (repository or "").strip("/").split("/"):
        if part:
            names.append(f"{names[-1]}/{part}")
    return names[::-1]


def matching_keys(keys, registry: str, repository: str | None, docker_keys: bool) -> list[str]:
    """The keys of an `auths` (or `credHelpers`) map that name `repository` on `registry`,
    best first: the most specific namespace first, at one level a key spelt exactly as
    wanted before one that only normalizes to it, then file order. `docker_keys`:
    docker's rules (any key names its host; Docker Hub's key is HUB_KEY)."""
    keys = [key for key in keys if isinstance(key, str)]
    by_name: dict[str, list[str]] = {}
    for key in keys:
        by_name.setdefault(_normalized_key(key, docker_keys), []).append(key)
    canonical = _canonical_host(registry)
    order = []
    for name, wanted in zip(_wanted_names(registry, repository), _wanted_names(canonical, repository)):
        spelt = ([HUB_KEY, name] if docker_keys else [name, HUB_KEY]) if wanted == DOCKER_HUB else [name]
        order += [key for key in spelt if key in keys]
        order += [key for key in by_name.get(wanted, ()) if key not in order]
    return order


def _one_line(text, limit: int = DETAIL_LIMIT) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class Source:
    """What every source has: a name for logs, and warnings and notes (see the module)."""

    def __init__(self, name: str):
        self.name = name
        self.warnings: list[str] = []
        self.notes: list[str] = []

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def lookup(self, registry: str, repository: str | None = None) -> Credentials | None:
        raise NotImplementedError


class _BadEntry(Exception):
    pass


def _entry_credentials(entry, registry: str) -> Credentials | None:
    """Credentials of one `auths` entry; None for an empty one (what docker writes beside
    a credsStore); _BadEntry(why) for a malformed one (the why holds no secret)."""
    if not isinstance(entry, dict):
        raise _BadEntry("is not a JSON object")
    username = password = None
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise _BadEntry('has an "auth" that is not a string')
        try:
            decoded = base64.b64decode("".join(auth.split()), validate=True).decode()
        except (binascii.Error, ValueError):
            raise _BadEntry('has an "auth" that is not base64 of UTF-8 text') from None
        username, colon, password = decoded.partition(":")
        if not colon:
            raise _BadEntry('has an "auth" that is not base64 of "user:password"')
        password = password.strip("\x00")
    elif entry.get("username"):
        username, password = entry.get("username"), entry.get("password")
        if not isinstance(username, str) or not isinstance(password, (str, type(None))):
            raise _BadEntry('has a "username" or "password" that is not a string')
    token = entry.get("identitytoken")
    if token:
        if not isinstance(token, str):
            raise _BadEntry('has an "identitytoken" that is not a string')
        # A password beside it answers a registry that only does HTTP Basic.
        return Credentials(username or None, password or None, registry, identity_token=token)
    if username and password:
        return Credentials(username, password, registry)
    return None


class AuthsSource(Source):
    """The `auths` map of one docker config or auth.json file."""

    def __init__(self, name: str, path: str, auths: dict, docker_keys: bool):
        super().__init__(name)
        self.path = path
        self.auths = auths
        self.docker_keys = docker_keys

    def lookup(self, registry, repository=None):
        for key in matching_keys(self.auths, registry, repository, self.docker_keys):
            try:
                credentials = _entry_credentials(self.auths[key], registry)
            except _BadEntry as why:
                self.warn(f"{self.name}: the entry {key!r} {why}; ignored")
                continue
            if credentials is not None:
                return credentials
        return None


def _run_helper(argv: list[str], stdin: bytes, env: dict, timeout: float):
    """Run a credential helper without a shell: (exit status, stdout, stderr, problem);
    problem (a text) when it ran too long or said too much (then it was killed, with
    whatever it started in its session). OSError when it cannot be started."""
    import selectors
    import signal
    import subprocess

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None  # all PIPE
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    problem = None
    try:
        try:
            proc.stdin.write(stdin)  # a few bytes: fits the pipe even if never read
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        finally:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ, (out, MAX_HELPER_ANSWER))
            selector.register(proc.stderr, selectors.EVENT_READ, (err, MAX_HELPER_STDERR))
            while problem is None and selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    problem = f"no answer within {timeout:g} s"
                    break
                for key, _events in selector.select(left):
                    chunk = os.read(key.fd, 65536)
                    buffer, limit = key.data
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout and len(buffer) + len(chunk) > limit:
                        problem = f"an answer over {limit} bytes"
                        break
                    else:
                        buffer += chunk[:max(limit - len(buffer), 0)]
        if problem is None:
            try:
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                problem = f"no exit within {timeout:g} s"
    finally:
        if problem is not None or proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return proc.returncode, bytes(out), bytes(err), problem


class HelperSource(Source):
    """A credential helper, `docker-credential-<helper> get` with the server on stdin
    (docker's helper protocol). `helpers` None: a credsStore, asked for every
    registry without a `credHelpers` entry in `cred_helpers`; else the credHelpers
    map, and this source answers for the registries it maps to `helper`. Answers
    (and failures) are kept per server: a helper runs at most once per registry."""

    def __init__(self, name: str, helper: str, cred_helpers: dict, store: bool = False,
                 environ=os.environ, timeout: float = HELPER_TIMEOUT):
        super().__init__(name)
        self.helper = helper
        self.program = f"docker-credential-{helper}"
        self.cred_helpers = cred_helpers
        self.store = store
        self.environ = environ
        self.timeout = timeout
        self._answers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def serves(self, registry: str) -> bool:
        keys = matching_keys(self.cred_helpers, registry, None, docker_keys=True)
        if self.store:
            return not keys
        return bool(keys) and self.cred_helpers[keys[0]] == self.helper

    def lookup(self, registry, repository=None):
        if not self.serves(registry):
            return None
        server = HUB_KEY if _canonical_host(registry) == DOCKER_HUB else registry
        with self._lock:
            if server not in self._answers:
                self._answers[server] = self._ask(server)
            answer = self._answers[server]
        if answer is None:
            return None
        username, secret = answer
        if username == TOKEN_USERNAME:
            return Credentials(None, None, registry, identity_token=secret)
        return Credentials(username, secret, registry)

    def _ask(self, server: str):
        """(username, secret) the helper gives for `server`, or None (warning or note recorded)."""
        if not _HELPER_NAME.fullmatch(self.helper):
            self.warn(f"{self.name}: {self.program!r} is not a plain program name; not run")
            return None
        import shutil

        path = shutil.which(self.program, path=self.environ.get("PATH", os.defpath))
        if path is None:
            self.warn(f"credential helper {self.program} (from {self.name}) is not on PATH")
            return None
        what = f"credential helper {self.program} get {server}"
        try:
            status, out, err, problem = _run_helper([path, "get"], server.encode(), dict(self.environ),
                                                    self.timeout)
        except OSError as error:
            self.warn(f"{what}: cannot run {path}: {error.strerror or error}")
            return None
        if problem is not None:
            self.warn(f"{what}: {problem}; killed" + (f": {_one_line(err)}" if err.strip() else ""))
            return None
        if status != 0:
            if NOT_FOUND_MESSAGE.encode() in out or NOT_FOUND_MESSAGE.encode() in err:
                self.note(f"{what}: no credentials stored for {server}")
                return None
            # Helpers report errors on stdout (docker-credential-helpers) or stderr; an
            # answer that looks like JSON may hold a secret and is not quoted.
            detail = err if err.strip() or out.lstrip().startswith(b"{") else out
            self.warn(f"{what}: exit status {status}" + (f": {_one_line(detail)}" if detail.strip() else ""))
            return None
        try:
            answer = json.loads(out)
        except (ValueError, RecursionError):
            self.warn(f"{what}: the answer is not JSON")
            return None
        if not isinstance(answer, dict) or not isinstance(answer.get("Secret", ""), str) \
                or not isinstance(answer.get("Username", ""), str):
            self.warn(f"{what}: the answer is not an object with string Username and Secret")
            return None
        username, secret = answer.get("Username", ""), answer.get("Secret", "")
        if not secret or not username:
            self.note(f"{what}: no credentials stored for {server}")
            return None
        return username, secret


def _read_config(path: str, kind: str):
    """(the file's JSON object or None if there is no such file, warning or None)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as error:
        return None, f"{kind} {path}: cannot read it ({error.strerror or error}); ignored"
    if len(raw) > MAX_CONFIG_BYTES:
        return None, f"{kind} {path}: over {MAX_CONFIG_BYTES} bytes; ignored"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        return None, f"{kind} {path}: not valid JSON ({error.msg} at line {error.lineno}); ignored"
    except (ValueError, RecursionError):
        return None, f"{kind} {path}: not valid JSON; ignored"
    if not isinstance(config, dict):
        return None, f"{kind} {path}: not a JSON object; ignored"
    return config, None


def file_sources(path: str, kind: str, environ=os.environ, timeout: float = HELPER_TIMEOUT,
                 must_exist: str | None = None) -> list[Source]:
    """The sources of one file, in their order: a helper source per distinct credHelpers
    helper, the auths source, (docker config) the credsStore source. `kind` is
    DOCKER_CONFIG_KIND or AUTH_JSON_KIND. Nothing for a missing file, unless
    `must_exist` says who named it (then a source holding that warning). Problems of
    the file itself are warnings of its auths source, which is always there."""
    config, problem = _read_config(path, kind)
    auths_name = f"{kind} {path}"
    docker = kind == DOCKER_CONFIG_KIND
    if config is None and problem is None:
        if must_exist is None:
            return []
        problem = f"{kind} {path} (named by {must_exist}): no such file"
    config = config or {}
    auths = config.get("auths", {})
    cred_helpers = config.get("credHelpers", {})
    store = config.get("credsStore") if docker else None
    source = AuthsSource(auths_name, path, auths if isinstance(auths, dict) else {}, docker_keys=docker)
    if problem:
        source.warn(problem)
    if not isinstance(auths, dict):
        source.warn(f"{auths_name}: \"auths\" is not a JSON object; ignored")
    if not isinstance(cred_helpers, dict):
        source.warn(f"{auths_name}: \"credHelpers\" is not a JSON object; ignored")
        cred_helpers = {}
    for key, helper in list(cred_helpers.items()):
        if not isinstance(helper, str) or not helper:
            source.warn(f"{auths_name}: credHelpers entry {key!r} is not a helper name; ignored")
            cred_helpers = {k: v for k, v in cred_helpers.items() if k != key}
    if store is not None and (not isinstance(store, str) or not store):
        source.warn(f"{auths_name}: \"credsStore\" is not a helper name; ignored")
        store = None
    sources: list[Source] = []
    for helper in dict.fromkeys(cred_helpers.values()):
        sources.append(HelperSource(f"{kind} {path} credHelpers: {helper}", helper, cred_helpers,
                                    environ=environ, timeout=timeout))
    sources.append(source)
    if store:
        sources.append(HelperSource(f"{kind} {path} credsStore: {store}", store, cred_helpers,
                                    store=True, environ=environ, timeout=timeout))
    return sources


def auth_json_paths(authfile: str | None = None, environ=os.environ) -> list[tuple[str, str | None]]:
    """containers' auth.json files to read, in order, as (path, who named it or None):
    the first of `authfile`, $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json
    (/run/containers/UID/auth.json without XDG_RUNTIME_DIR), as podman's primary file;
    then $XDG_CONFIG_HOME/containers/auth.json (~/.config/containers/auth.json)."""
    primary: tuple[str, str | None]
    if authfile:
        primary = (authfile, flag("authfile"))
    elif environ.get("REGISTRY_AUTH_FILE"):
        primary = (environ["REGISTRY_AUTH_FILE"], "REGISTRY_AUTH_FILE")
    elif environ.get("XDG_RUNTIME_DIR"):
        primary = (os.path.join(environ["XDG_RUNTIME_DIR"], "containers", "auth.json"), None)
    else:
        primary = (f"/run/containers/{os.getuid()}/auth.json", None)
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(_home(environ), ".config")
    second = os.path.join(config_home, "containers", "auth.json")
    return [primary] if second == primary[0] else [primary, (second, None)]


def docker_config_path(environ=os.environ) -> str:
    """$DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    return os.path.join(environ.get("DOCKER_CONFIG") or os.path.join(_home(environ), ".docker"),
                        "config.json")


def _home(environ) -> str:
    return environ.get("HOME") or os.path.expanduser("~")


def default_sources(flags_source=None, authfile: str | None = None, environ=os.environ,
                    timeout: float = HELPER_TIMEOUT) -> list:
    """Every credential source in precedence order: `flags_source` (if given), the
    auth.json files (`auth_json_paths`), the docker config (`docker_config_path`).
    Reads the files now (a helper runs only when asked); never raises for them."""
    sources = [flags_source] if flags_source is not None else []
    for path, named_by in auth_json_paths(authfile, environ):
        sources += file_sources(path, AUTH_JSON_KIND, environ, timeout, must_exist=named_by)
    sources += file_sources(docker_config_path(environ), DOCKER_CONFIG_KIND, environ, timeout)
    return sources


def find_credentials(sources, registry: str, repository: str | None = None, accept=None):
    """(credentials, source) of the first source answering for `repository` on
    `registry` (and, with `accept`, whose credentials it accepts), else (None, None)."""
    for source in sources:
        credentials = source.lookup(registry, repository)
        if credentials is not None and (accept is None or accept(credentials)):
            return credentials, source
    return None, None


def source_warnings(sources) -> list[str]:
    """The warnings of all sources so far, in source order."""
    return [text for source in sources for text in getattr(source, "warnings", ())]
