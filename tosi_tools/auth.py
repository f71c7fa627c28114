"""Registry credentials, WWW-Authenticate challenges and a cache of bearer tokens.

Credentials are never logged, never put into a plan or into the cache: they
live in memory only, in a Credentials object whose repr hides the secret.
Credentials belong to one registry (`registry`, as the reference names it):
registry.RegistryClient sends them only to that registry's own endpoint. Where
they come from (flags, environment, docker config) is keychain.py's business.
"""

import base64
from typing import Any
import re
import threading
import time
from collections.abc import Callable, Hashable


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

    def __init__(self, username: str | None, password: str | None, registry: str | None = None,
                 identity_token: str | None = None) -> None:
        self.username = username
        self.password = password
        self.registry = registry
        self.identity_token = identity_token

    def __repr__(self) -> str:
        token = ", identity_token=<hidden>" if self.identity_token is not None else ""
        return (f"Credentials(username={self.username!r}, password=<hidden>, "
                f"registry={self.registry!r}{token})")

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def refresh_token_form(credentials: Credentials, service: str | None, scope: Any,
                       client_id: str = "tosi") -> dict[str, Any]:
    """The form body of a token request that trades `credentials.identity_token` for a
    bearer token (distribution's OAuth2 token spec: POST to the realm, grant_type
    refresh_token). `scope` is one scope text, a sequence of them (a repeated form
    field: requests encodes a list value so) or None/empty for none."""
    if not credentials.identity_token:
        raise ValueError("these credentials hold no identity token")
    form: dict[str, Any] = {"grant_type": "refresh_token", "refresh_token": credentials.identity_token,
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


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
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


def parse_challenge(header: str) -> tuple[str | None, dict[str, str]]:
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

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._tokens: dict[Hashable, tuple[str, float]] = {}
        self._challenges: dict[str, tuple[str, dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def get(self, key: Hashable) -> str | None:
        with self._lock:
            entry = self._tokens.get(key)
            if entry and entry[1] > self._clock():
                return entry[0]
            self._tokens.pop(key, None)
            return None

    def put(self, key: Hashable, token: str, expires_in: object = None) -> None:
        lifetime = expires_in if isinstance(expires_in, (int, float)) and expires_in > 0 else DEFAULT_TOKEN_LIFETIME
        with self._lock:
            self._tokens[key] = (token, self._clock() + max(lifetime - EXPIRY_MARGIN, 1))

    def drop(self, key: Hashable) -> None:
        with self._lock:
            self._tokens.pop(key, None)

    def challenge(self, host: str) -> tuple[str, dict[str, str]] | None:
        """(scheme, params) of the last 401 challenge from `host`, or None."""
        with self._lock:
            return self._challenges.get(host)

    def set_challenge(self, host: str, challenge: tuple[str, dict[str, str]]) -> None:
        with self._lock:
            self._challenges[host] = challenge
