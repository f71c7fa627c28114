"""Registry credentials, WWW-Authenticate challenges and a cache of bearer tokens.

Credentials are never logged, never put into a plan or into the cache: they
live in memory only, in a Credentials object whose repr hides the secret.
Credentials belong to one registry (`registry`, as the reference names it):
registry.RegistryClient sends them only to that registry's own endpoint.
"""

import base64
import json
import os
import re
import threading
import time

from .errors import UsageError

# A token without expires_in is good for 60 s (distribution's token spec).
DEFAULT_TOKEN_LIFETIME = 60
# Renew a little early so a token does not expire between check and use.
EXPIRY_MARGIN = 5


class Credentials:
    """A user name and password for `registry` (host[:port] as a reference names it;
    None: for whatever registry the client they are given to speaks to).

    `identity_token` is an OAuth2 refresh token (docker config's `identitytoken`, or
    a credential helper's answer with the user name "<token>"): it is exchanged at
    the token endpoint (`refresh_token_form`), and `password` is then None."""

    __slots__ = ("username", "password", "registry", "identity_token")

    def __init__(self, username, password, registry=None, identity_token=None):
        self.username = username
        self.password = password
        self.registry = registry
        self.identity_token = identity_token

    def __repr__(self):
        token = ", identity_token=<hidden>" if self.identity_token is not None else ""
        return (f"Credentials(username={self.username!r}, password=<hidden>, "
                f"registry={self.registry!r}{token})")

    def basic_header(self):
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def refresh_token_form(credentials: Credentials, service: str | None, scope,
                       client_id: str = "tosi") -> dict:
    """The form body of a token request that trades `credentials.identity_token` for a
    bearer token (distribution's OAuth2 token spec: POST to the realm, grant_type
    refresh_token). `scope` is one scope text, a sequence of them (a repeated form
    field: requests encodes a list value so) or None/empty for none."""
    if not credentials.identity_token:
        raise ValueError("these credentials hold no identity token")
    form = {"grant_type": "refresh_token", "refresh_token": credentials.identity_token,
            "client_id": client_id}
    if service:
        form["service"] = service
    scopes = [scope] if isinstance(scope, str) else list(scope or ())
    scopes = [s for s in scopes if s]
    if scopes:
        form["scope"] = scopes[0] if len(scopes) == 1 else scopes
    return form


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf'[\s,]*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_TOKEN68_RE = re.compile(r"\s+[A-Za-z0-9._~+/-]+=*(?=\s*(?:,|$))")
# Docker's order: a registry offering both is asked for a token.
_PREFERRED_SCHEMES = ("bearer", "basic")


def parse_challenges(header):
    """Every challenge of a WWW-Authenticate value (RFC 7235: several may share one header,
    and requests joins repeated headers with commas) as [(scheme, {param: value})],
    schemes and parameter names lower-cased."""
    challenges = []
    pos = 0
    while match := _SCHEME_RE.match(header or "", pos):
        scheme, pos = match.group(1).lower(), match.end()
        params = {}
        token68 = _TOKEN68_RE.match(header, pos)
        if token68:
            pos = token68.end()
        while not token68 and (param := _PARAM_RE.match(header, pos)):
            key, quoted, bare = param.groups()
            params[key.lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
            pos = param.end()
        challenges.append((scheme, params))
    return challenges


def parse_challenge(header):
    """The challenge to answer in a WWW-Authenticate value: (scheme, {param: value}),
    Bearer before Basic before any other; (None, {}) for none."""
    challenges = parse_challenges(header)
    for wanted in _PREFERRED_SCHEMES:
        for scheme, params in challenges:
            if scheme == wanted:
                return scheme, params
    return challenges[0] if challenges else (None, {})


class TokenCache:
    """Bearer tokens keyed by (registry, realm, service, scope), kept for their lifetime,
    and the last challenge of each registry host, so that every client sharing the
    cache sends the right credentials with its first request; thread-safe."""

    def __init__(self, clock=time.monotonic):
        self._tokens = {}
        self._challenges = {}
        self._lock = threading.Lock()
        self._clock = clock

    def get(self, key):
        with self._lock:
            entry = self._tokens.get(key)
            if entry and entry[1] > self._clock():
                return entry[0]
            self._tokens.pop(key, None)
            return None

    def put(self, key, token, expires_in=None):
        lifetime = expires_in if isinstance(expires_in, (int, float)) and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        with self._lock:
            self._tokens[key] = (token, self._clock() + max(lifetime - EXPIRY_MARGIN, 1))

    def drop(self, key):
        with self._lock:
            self._tokens.pop(key, None)

    def challenge(self, host):
        """(scheme, params) of the last 401 challenge from `host`, or None."""
        with self._lock:
            return self._challenges.get(host)

    def set_challenge(self, host, challenge):
        with self._lock:
            self._challenges[host] = challenge


def docker_config_credentials(registry, path=None):
    """Username and password for `registry` from ~/.docker/config.json ("auths"), if any.

    Only inline `auth`/`username`+`password` entries are read; credential helpers are
    external programs and are not run.
    """
    if path is None:
        base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
        path = os.path.join(base, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    names = {registry, f"https://{registry}", f"http://{registry}"}
    if registry == "docker.io":
        names |= {"https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"}
    for key, entry in auths.items():
        if key.rstrip("/") not in {n.rstrip("/") for n in names} or not isinstance(entry, dict):
            continue
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"], registry)
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
            return Credentials(user, password, registry)
    return None


def credentials_from_flags(username=None, password=None, password_stdin=None, registry=None, stored=None):
    """Credentials for `registry` from --username/--password (or a password read from
    stdin), the TOSI_USERNAME/TOSI_PASSWORD environment, or `stored(registry)` (default:
    the docker config's inline `auths`), in that order; they go to that registry's
    endpoint only (registry.RegistryClient)."""
    if password_stdin is not None:
        password = password_stdin
    if password and not username:
        raise UsageError("a password needs --username")
    if username:
        if password is None:
            raise UsageError("--username needs --password or --password-stdin")
        return Credentials(username, password, registry)
    env_user, env_pass = os.environ.get("TOSI_USERNAME"), os.environ.get("TOSI_PASSWORD")
    if env_user and env_pass is not None:
        return Credentials(env_user, env_pass, registry)
    if registry:
        return (stored or docker_config_credentials)(registry)
    return None
