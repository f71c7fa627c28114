"""The registry client: the distribution-spec HTTP API over the one transport, with auth.

Everything that talks to a registry goes through RegistryClient: send() adds
credentials for the registry's own host only and answers 401 challenges (Bearer
token flow or Basic) once per request; request() adds the transport's redirect
and retry policies (transport.follow_redirects, transport.RetryPolicy);
open_blob() gives a blob's bytes as a transport.BodyStream. The HTTP mechanics
(session, TLS, retries, redirects, error mapping, the warm path's quick_head)
are transport.py's.

Credentials come from a keychain.Keychain (or are given as one
auth.Credentials) and are bound to their registry (auth.Credentials.registry): a
client whose endpoint is not that registry's own (`serves`) holds none, whatever
a plan says. Basic credentials, to the registry or to a token server, travel
only over verified TLS or to a loopback host, unless the caller itself allowed it
(`credentials_insecure`, the stage's --insecure: `basic_refusal`). Redirects
are followed by hand (the token request's too): credentials never go to the
host a redirect names.

Where blob bytes come from is a `BlobSource` (`open(digest, offset)`): the
registry (`RegistryBlobSource`) or a descriptor's foreign URL (`URLBlobSource`).
"""

import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any, Mapping, Optional, Protocol
from urllib.parse import urljoin, urlsplit

from .auth import Credentials, TokenCache, parse_challenge, refresh_token_form
from .errors import NotFound, RegistryError, TosiError, Unauthorized, flag
from .keychain import Keychain, TLSConfig
from .transport import (
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, BodyStream, RetryPolicy, Temporary, Transport,
    endpoint_for, error_body, follow_redirects, is_http_url, is_loopback_host, is_temporary, redact,
    same_origin, unavailable,
)

log = logging.getLogger("tosi.registry")

# A token goes into every request's headers, which servers cap near 1 MiB: a token
# server's answer is refused beyond this.
MAX_TOKEN_ANSWER = 1 << 20
# RFC 6750 b64token, leniently: any visible ASCII, nothing that could end a header.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


def blob_url(repository: str, digest: str) -> str:
    """The URL of a blob, relative to the registry's endpoint."""
    return f"/v2/{repository}/blobs/{digest}"


def manifest_url(repository: str, reference: str) -> str:
    """The URL of a manifest (by tag or digest), relative to the registry's endpoint."""
    return f"/v2/{repository}/manifests/{reference}"


def tags_url(repository: str, page_size: Optional[int] = None) -> str:
    """The URL of a repository's tag list (its first page of `page_size` tags, else of
    the registry's own size), relative to the registry's endpoint."""
    return f"/v2/{repository}/tags/list" + (f"?n={page_size}" if page_size else "")


MAX_TAGS_PAGE = 4 << 20  # bytes of one tags/list answer
MAX_TAGS_PAGES = 10_000  # pages followed, so a registry whose "next" never ends cannot hold us


def serves(endpoint: str, registry: str) -> bool:
    """True if `endpoint` (a base URL) is `registry`'s own endpoint: its host and port
    (docker.io's is registry-1.docker.io:443); the scheme does not matter."""
    try:
        parts = urlsplit(endpoint)
        own = urlsplit(endpoint_for(registry, scheme=parts.scheme or "https"))
        default = 443 if parts.scheme == "https" else 80
        return bool(parts.hostname) and parts.hostname == own.hostname \
            and (parts.port or default) == (own.port or default)
    except ValueError:
        return False


def basic_refusal(url: str, allow_insecure: bool = False, tls_verified: bool = True) -> Optional[str]:
    """Why Basic credentials may not go to `url`, or None if they may: they travel
    over verified TLS, to a loopback host, or anywhere with `allow_insecure` (the
    --insecure of the stage itself, never a plan's)."""
    parts = urlsplit(url)
    if allow_insecure or is_loopback_host(parts.netloc):
        return None
    if parts.scheme != "https":
        return f"credentials are not sent over plain http to {parts.netloc}, which is not " \
            f"on loopback (use {flag('insecure')} to allow it)"
    if not tls_verified:
        return f"credentials are not sent to {parts.netloc} over TLS that is not verified " \
            f"(use {flag('insecure')} to allow it)"
    return None

class RangeRefused(RegistryError):
    """The server will not give the byte range asked for (416): ask for the whole."""


class RegistryClient:
    """A session with one registry endpoint (e.g. https://registry-1.docker.io)."""

    def __init__(self, endpoint: str, credentials: Optional[Credentials] = None,
                 ca_file: Optional[str] = None, insecure: bool = False,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 pool_size: int = 16, token_cache: Optional[TokenCache] = None,
                 credentials_insecure: Optional[bool] = None, endpoint_origin: Optional[str] = None,
                 keychain: Optional[Keychain] = None, registry: Optional[str] = None,
                 repository: Optional[str] = None, tls: Optional[TLSConfig] = None,
                 retry: Optional[RetryPolicy] = None) -> None:
        """Credentials: `keychain` asked for `registry` and `repository` (when first
        needed), else the fixed `credentials`. TLS: `tls`, else TLSConfig(ca_file,
        None, insecure); `insecure`: plain http and unverified TLS may be spoken.
        `credentials_insecure` (default: `insecure`): Basic credentials may go over
        them to a host that is not on loopback; a stage that takes `insecure` from a
        plan passes its own flag here. `endpoint_origin` names where the endpoint
        came from in messages ("the plan's endpoint"). `retry`: the policy of
        request() (default: RetryPolicy(), 3 attempts)."""
        self.endpoint = endpoint.rstrip("/")
        self.keychain = keychain if keychain is not None else Keychain.of(credentials)
        self.registry = registry
        self.repository = repository
        self._origin = endpoint_origin or "the endpoint"
        self._looked_up = False
        self._credentials: Optional[Credentials] = None
        self._withheld: Optional[str] = None
        tls = tls if tls is not None else TLSConfig(ca_file, None, bool(insecure))
        self.credentials_insecure = tls.insecure if credentials_insecure is None else credentials_insecure
        self.transport = Transport(tls, connect_timeout, read_timeout, pool_size)
        self.timeout = self.transport.timeout
        self.retry = retry or RetryPolicy()
        self.tokens = token_cache or TokenCache()
        self._pool_size = pool_size
        self._host = urlsplit(self.endpoint).netloc
        self._lock = threading.Lock()  # one token fetch at a time
        self._lookup_lock = threading.Lock()

    def for_mirror(self, endpoint: str, registry: str, repository: str, insecure: bool,
                   ca_file: Optional[str] = None) -> "RegistryClient":
        """A client for a mirror of this client's registry: the same keychain, token
        cache, timeouts, retries and `credentials_insecure`, but the mirror's own
        endpoint and registry (so the credentials it gets are the mirror's, never
        this registry's) and TLS (`ca_file`, the keychain's client certificate for
        the mirror, `insecure`). Credentials given for the registry pulled from
        (--username, TOSI_USERNAME) are not the mirror's: `mirror_keychain`."""
        tls = TLSConfig(ca_file, self.keychain.tls_for(registry).client_cert, insecure)
        connect_timeout, read_timeout = self.timeout
        return RegistryClient(endpoint, keychain=mirror_keychain(self.keychain), registry=registry,
                              repository=repository,
                              tls=tls, connect_timeout=connect_timeout, read_timeout=read_timeout,
                              pool_size=self._pool_size, token_cache=self.tokens,
                              credentials_insecure=self.credentials_insecure,
                              endpoint_origin=f"the mirror {endpoint}", retry=self.retry)

    # ------------------------------------------------------------ credentials

    def _lookup(self) -> None:
        with self._lookup_lock:
            if self._looked_up:
                return
            found = self.keychain.credentials(self.registry, self.repository)
            self._credentials, self._withheld = _bind(found, self.endpoint, self._origin)
            if self._withheld:
                log.info("%s", self._withheld)
            self._looked_up = True

    @property
    def credentials(self) -> Optional[Credentials]:
        """The credentials this client may send to its endpoint, or None."""
        self._lookup()
        return self._credentials

    @property
    def withheld(self) -> Optional[str]:
        """Why the keychain's credentials are not sent to this endpoint, or None."""
        self._lookup()
        return self._withheld

    # ------------------------------------------------------------ plumbing

    def url(self, path: str) -> str:
        """The absolute URL of `path` (a URL relative to the endpoint, or absolute)."""
        if path.startswith(("http://", "https://")):
            return path
        return urljoin(self.endpoint + "/", path.lstrip("/"))

    def same_host(self, url: str) -> bool:
        """Whether `url` is on the endpoint's own origin, where credentials may go."""
        return same_origin(url, self.endpoint)

    def _scope(self, repository, actions="pull"):
        return f"repository:{repository}:{actions}" if repository else None

    @property
    def _challenge(self):
        # Kept with the tokens, so clients sharing a TokenCache authenticate up front.
        return self.tokens.challenge(self._host)

    @_challenge.setter
    def _challenge(self, challenge):
        self.tokens.set_challenge(self._host, challenge)

    def _token_key(self, params, repository):
        return (self._host, params.get("realm"), params.get("service"), self._scope(repository))

    def _auth_header(self, repository):
        challenge = self._challenge
        if challenge is None:
            return None
        scheme, params = challenge
        if scheme == "basic":
            if not _has_password(self.credentials) or self._basic_refusal(self.endpoint):
                return None
            return self.credentials.basic_header()
        if scheme == "bearer":
            token = self.tokens.get(self._token_key(params, repository))
            return f"Bearer {token}" if token else None
        return None

    def _basic_refusal(self, url):
        return basic_refusal(url, self.credentials_insecure, tls_verified=self.transport.tls_verified)

    # ------------------------------------------------------------ messages

    @property
    def _registry_name(self) -> str:
        return self.registry or self._host

    def _source(self) -> str:
        """Where the credentials came from (a flag, a variable, a file, a helper), for messages."""
        return self.keychain.answered(self.registry, self.repository) or "the caller"

    def _rejected(self, detail: str) -> str:
        """The words for credentials the registry (or its token server) refused."""
        kind = "identity token" if not _has_password(self.credentials) else "credentials"
        return f"{kind} rejected by {self._registry_name} ({detail}; from {self._source()})" \
            + self._lookup_problems()

    def _no_credentials(self) -> str:
        """The words for a refusal when no credentials were found, with how to give some."""
        return (f"no credentials for {self._registry_name}: give {flag('username')} "
                f"(or TOSI_USERNAME), {flag('authfile')}, or log in with docker or podman") \
            + self._lookup_problems()

    def _lookup_problems(self) -> str:
        """What failed while credentials were looked up (a credential helper's failure)."""
        problems = self.keychain.warnings
        return "; " + "; ".join(problems) if problems else ""

    def _fetch_token(self, params, repository):
        realm = params.get("realm")
        if not realm:
            raise Unauthorized(f"{self.endpoint}: Bearer challenge without a realm")
        if not is_http_url(realm):
            raise Unauthorized(f"{self.endpoint}: Bearer challenge realm {realm[:200]!r} is no http(s) URL")
        scope = self._scope(repository) or params.get("scope")
        key = self._token_key(params, repository)
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        if scope:
            query["scope"] = scope
        what = f"token server {realm}"
        credentials = self.credentials
        if credentials:
            refusal = self._basic_refusal(realm)
            if refusal:
                raise Unauthorized(f"{what}: {refusal}")
        if credentials is not None and credentials.identity_token:
            r = self._refresh_token_request(realm, params.get("service"), scope, what)
            if r.status_code in (404, 405):
                # A token server without OAuth2's POST (docker's fallback too): a GET,
                # with the password if there is one, else anonymous.
                r.close()
                log.info("%s does not trade identity tokens (%d); asking it %s", what, r.status_code,
                         "with the password" if _has_password(credentials) else "anonymously")
                r = self._token_request(realm, query, what)
        else:
            r = self._token_request(realm, query, what)
        # OAuth2 answers a refresh token it does not know with 400 invalid_grant.
        refused = (400, 401, 403) if credentials is not None and credentials.identity_token else (401, 403)
        if r.status_code in refused and credentials is not None:
            r.close()
            netloc = urlsplit(realm).netloc
            raise Unauthorized(self._rejected(f"its token server {netloc} answered {r.status_code}"),
                               status=r.status_code)
        if r.status_code in (401, 403):
            r.close()
            raise Unauthorized(f"{self._host}: token server refused anonymous access ({r.status_code}); "
                               + (self.withheld or self._no_credentials()), status=r.status_code)
        if is_temporary(r.status_code):
            # Unavailable (an Unreachable): the request it was for is tried again.
            r.close()
            raise unavailable(r.status_code, r.reason, r.headers, what)
        if r.status_code != 200:
            r.close()
            raise RegistryError(f"{what} answered {r.status_code}", status=r.status_code)
        data = self.read_limited(r, MAX_TOKEN_ANSWER, what, too_large=Unauthorized)
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: JSON nested beyond the parser's depth
            raise Unauthorized(f"{what} answered with no JSON") from None
        if not isinstance(body, dict):
            raise Unauthorized(f"{what} answered with no JSON object")
        token = body.get("token") or body.get("access_token")
        if not token:
            raise Unauthorized(f"{what} answered without a token")
        if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
            raise Unauthorized(f"{what} answered with a malformed token")
        self.tokens.put(key, token, body.get("expires_in"))
        return token

    def _refresh_token_request(self, realm, service, scope, what):
        """POST the identity token to the realm for a bearer token (OAuth2's refresh_token
        grant, as docker does). No redirect is followed: the token is in the body."""
        form = refresh_token_form(self.credentials, service, scope)
        return self.transport.send("POST", realm, {"Content-Type": "application/x-www-form-urlencoded"},
                                   stream=True, what=what, data=form)

    def _token_request(self, realm, query, what):
        """GET the token, following redirects by hand: the Basic credentials go to the
        realm's own scheme, host and port only, never to where a redirect leads."""
        def send_one(url):
            headers = {}
            if _has_password(self.credentials) and same_origin(url, realm):
                headers["Authorization"] = self.credentials.basic_header()
            # The query goes with the realm; a redirect's Location carries its own.
            return self.transport.send("GET", url, headers, stream=True, what=what,
                                       params=query if url == realm else None)

        return follow_redirects(send_one, realm, what)[0]

    def send(self, method: str, path: str, repository: Optional[str] = None,
             headers: Optional[Mapping[str, str]] = None, stream: bool = False,
             timeout: Any = None) -> Any:
        """One request to the registry, authenticated; a 401 is answered once and retried.

        Returns the response whatever its status (callers map statuses to errors with
        `check`). Redirects are not followed here: request() follows them so that
        credentials never reach another host.
        """
        url = self.url(path)
        hdrs = dict(headers or {})
        for attempt in (1, 2):
            if self.same_host(url):
                auth = self._auth_header(repository)
                if auth:
                    hdrs["Authorization"] = auth
            resp = self.transport.send(method, url, hdrs, stream=stream, timeout=timeout)
            if resp.status_code != 401 or attempt == 2 or not self.same_host(url):
                return resp
            scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
            resp.close()
            if scheme == "bearer":
                sent = hdrs.get("Authorization", "")
                with self._lock:
                    self._challenge = (scheme, params)
                    key = self._token_key(params, repository)
                    cached = self.tokens.get(key)
                    # A token another request (or client) fetched meanwhile is tried
                    # first; only a token the registry just refused is fetched anew.
                    if cached is None or sent == f"Bearer {cached}":
                        self.tokens.drop(key)
                        self._fetch_token(params, repository)
            elif scheme == "basic":
                if self.withheld:
                    raise Unauthorized(f"{self._host}: authentication required; {self.withheld}",
                                       status=401)
                if not self.credentials:
                    raise Unauthorized(f"{self._host}: authentication required; {self._no_credentials()}",
                                       status=401)
                if not _has_password(self.credentials):
                    raise Unauthorized(f"{self._host}: authentication required: it asks for a password "
                                       f"(HTTP Basic), and the credentials from {self._source()} hold "
                                       "only an identity token", status=401)
                refusal = self._basic_refusal(url)
                if refusal:
                    raise Unauthorized(f"{self._host}: authentication required; {refusal}", status=401)
                self._challenge = (scheme, params)
            else:
                return resp
        return resp

    def check(self, resp: Any, what: str) -> Any:
        """Raise the typed error for a failed response, with the registry's code and message."""
        if resp.status_code < 400:
            return resp
        code, message = error_body(resp)
        detail = f"{code}: {message}" if code else (message or resp.reason or "")
        text = f"{what}: {resp.status_code} {detail}".rstrip()
        if resp.status_code == 404 or code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"):
            raise NotFound(text, status=resp.status_code, code=code)
        if resp.status_code in (401, 403) or code in ("UNAUTHORIZED", "DENIED"):
            if self.withheld:
                text += f" ({self.withheld})"
            elif not self.credentials:
                text += f" ({self._no_credentials()})"
            elif resp.status_code == 401 and self._challenge is not None and self._challenge[0] == "basic":
                # Basic credentials go with every request: the registry refused them.
                text = f"{what}: {self._rejected(f'{resp.status_code} {detail}'.rstrip())}"
            else:
                text += (f" (the credentials from {self._source()} were accepted but give no access "
                         f"to {self.repository or 'it'}, or there is no such repository)")
            raise Unauthorized(text, status=resp.status_code, code=code)
        raise RegistryError(text, status=resp.status_code, code=code)

    def send_following_redirects(self, method: str, path: str, repository: Optional[str] = None,
                                 headers: Optional[Mapping[str, str]] = None, stream: bool = False,
                                 timeout: Any = None) -> Any:
        """send(), following redirects (transport.follow_redirects): credentials go
        only to the registry's own host."""
        def send_one(url):
            return self.send(method, url, repository=repository, headers=headers, stream=stream,
                             timeout=timeout)

        return follow_redirects(send_one, self.url(path), f"{self._host}: {path}")[0]

    def request(self, method: str, path: str, repository: Optional[str] = None,
                headers: Optional[Mapping[str, str]] = None, stream: bool = False) -> Any:
        """send_following_redirects() under the retry policy (`retry`): a lost
        connection, a busy token server and a temporary status are tried again. The
        response whatever its status: after the last attempt, a temporary one too."""
        def attempt():
            resp = self.send_following_redirects(method, path, repository=repository, headers=headers,
                                                 stream=stream)
            if is_temporary(resp.status_code):
                error = unavailable(resp.status_code, resp.reason, resp.headers, f"{method} {path}")
                raise Temporary(error, error.retry_after, response=resp)
            return resp

        return self.retry.run(attempt)

    def read_limited(self, resp: Any, limit: int, what: str,
                     too_large: Optional[type[TosiError]] = None) -> bytes:
        """The body of a streamed response, refused (`too_large`, default ManifestError)
        if longer than `limit`."""
        if too_large is None:
            return self.transport.read_limited(resp, limit, what)
        return self.transport.read_limited(resp, limit, what, too_large=too_large)

    def open_blob(self, repository: Optional[str], digest: str, offset: int = 0,
                  url: Optional[str] = None, timeout: Any = None, what: Optional[str] = None) -> BodyStream:
        """A blob's bytes from `offset` on (a Range request), redirects followed: from
        the registry, or from `url` (a descriptor's foreign URL, which never sees the
        registry's credentials, whatever its host). Its `status` is 200 (the whole
        blob: a server may ignore Range) or 206. One attempt: a temporary failure is
        Unreachable (Unavailable for a status, with its Retry-After), a refused range
        RangeRefused, an unknown blob NotFound."""
        what = what or f"blob {digest}"
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        first = url or self.url(blob_url(repository or "", digest))  # no url: a repository is named
        for attempt in (1, 2):
            if url is None:
                def send_one(u):
                    return self.send("GET", u, repository=repository, headers=headers, stream=True,
                                     timeout=timeout)
            else:
                def send_one(u):
                    return self.transport.send("GET", u, headers, stream=True, timeout=timeout,
                                               what=f"{what}: GET {redact(u)}")
            resp, final = follow_redirects(send_one, first, f"{what}: GET {redact(first)}")
            status = resp.status_code
            if status in (200, 206):
                return BodyStream(resp, final)
            where = f"{what}: GET {redact(final)}"
            if status == 416 and offset:
                resp.close()
                # The partial is no prefix the server recognizes: start over.
                raise RangeRefused(f"{where}: range {offset}- refused (416)", status=status)
            if status == 401 and url is None and attempt == 1 and \
                    parse_challenge(resp.headers.get("WWW-Authenticate", ""))[0] == "bearer":
                # send() renewed the token once already; once more covers a token that
                # expired in between. Basic credentials do not expire: that refusal is final.
                resp.close()
                continue
            if is_temporary(status):
                resp.close()
                raise unavailable(status, resp.reason, resp.headers, where)
            with resp:
                self.check(resp, where)
            raise RegistryError(f"{where}: unexpected status {status}", status=status)
        raise AssertionError("unreachable")

    def blob_url(self, repository: str, digest: str) -> str:
        return blob_url(repository, digest)

    def manifest_url(self, repository: str, reference: str) -> str:
        return manifest_url(repository, reference)

    def list_tags(self, repository: str, page_size: Optional[int] = None) -> Iterator[str]:
        """Yield the repository's tags, page after page: the distribution API's
        /v2/<name>/tags/list (?n= for the page size), following each answer's Link
        header (rel="next") while it stays on the registry's own origin."""
        what = f"{self._host}: tags of {repository}"
        path: Optional[str] = tags_url(repository, page_size)
        seen: set[str] = set()
        while path is not None and len(seen) < MAX_TAGS_PAGES:
            seen.add(path)
            resp = self.request("GET", path, repository=repository, stream=True)
            with resp:
                self.check(resp, what)
                body = self.read_limited(resp, MAX_TAGS_PAGE, what, too_large=RegistryError)
                following = resp.links.get("next", {}).get("url")
            try:
                tags = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                raise RegistryError(f"{what}: the answer is not a tag list") from None
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise RegistryError(f"{what}: the answer is not a tag list")
            yield from tags
            path = None
            if following:
                url = self.url(following)
                if not self.same_host(url):
                    raise RegistryError(f"{what}: the next page is on another host ({urlsplit(url).netloc})")
                parts = urlsplit(url)
                path = parts.path + (f"?{parts.query}" if parts.query else "")
                if path in seen:
                    path = None  # a "next" page already read: the list is over

    def close(self) -> None:
        self.transport.close()


class BlobStream(Protocol):
    """A blob's bytes as a BlobSource gives them: transport.BodyStream (an HTTP answer),
    or offline.LocalStream (a file of an OCI layout or a docker-save archive)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def read1(self, size: int) -> bytes: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


class BlobSource(Protocol):
    """Where a blob's bytes come from (the registry, mirrors.MirrorChain, a descriptor's
    URL; an OCI layout or a docker-save archive: offline.LayoutBlobSource,
    ArchiveBlobSource). A source may also have `served_by(digest) -> str` (the
    endpoint that sent the bytes last opened; default: its `name`) and
    `mismatched(digest) -> bool` (those bytes failed their digest: True if the
    source will send them from elsewhere next time, so the downloader does not count
    the mismatch against its digest retry budget; default: False)."""

    name: str

    def open(self, digest: str, offset: int = 0, what: Optional[str] = None,
             timeout: Any = None) -> BlobStream:
        """The blob from `offset` on; see RegistryClient.open_blob for what it raises."""
        ...


class RegistryBlobSource:
    """The blobs of one repository of a registry."""

    def __init__(self, client: RegistryClient, repository: Optional[str]) -> None:
        self.client = client
        self.repository = repository
        self.name = f"{client.endpoint}/{repository}"

    def served_by(self, digest: str) -> str:
        return str(self.client.endpoint)

    def open(self, digest: str, offset: int = 0, what: Optional[str] = None,
             timeout: Any = None) -> BodyStream:
        return self.client.open_blob(self.repository, digest, offset, timeout=timeout, what=what)


class URLBlobSource:
    """A descriptor's foreign URL (`urls`), fetched without credentials."""

    def __init__(self, client: RegistryClient, url: str) -> None:
        self.client = client
        self.url = url
        self.name = redact(url)

    def served_by(self, digest: str) -> str:
        return self.name

    def open(self, digest: str, offset: int = 0, what: Optional[str] = None,
             timeout: Any = None) -> BodyStream:
        return self.client.open_blob(None, digest, offset, url=self.url, timeout=timeout, what=what)


def _has_password(credentials: Optional[Credentials]) -> bool:
    """Whether `credentials` can answer HTTP Basic (an identity token alone cannot)."""
    return credentials is not None and credentials.password is not None


def mirror_keychain(keychain: Keychain) -> Keychain:
    """The keychain a mirror asks: the stored credentials people keep per host
    (auth.json, the docker config), without --username, TOSI_USERNAME or a
    library caller's fixed credentials, which are given for the registry pulled
    from and would otherwise be answered for any host asked."""
    from .keychain import EnvironmentSource, FixedSource, FlagSource

    kept = [source for source in keychain.sources
            if not isinstance(source, (FlagSource, EnvironmentSource, FixedSource))]
    if len(kept) == len(keychain.sources):
        return keychain
    import copy

    narrowed = copy.copy(keychain)  # its class and TLS settings per host, not its answers
    narrowed.sources = kept
    narrowed._answered = {}
    return narrowed


def _bind(credentials, endpoint, origin):
    """(credentials, None) if `credentials` may go to `endpoint`, else (None, why not)."""
    registry = getattr(credentials, "registry", None)
    if credentials is None or registry is None or serves(endpoint, registry):
        return credentials, None
    own = endpoint_for(registry)
    return None, (f"the credentials for {registry} were not sent: {origin} {endpoint} is not "
                  f"that registry's ({own})")
