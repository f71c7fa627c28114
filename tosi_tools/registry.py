"""The registry client: one pooled HTTP session per registry, with auth and transport policy.

Everything that talks the distribution-spec HTTP API goes through
RegistryClient.send(), which adds credentials for the registry's own host only,
answers 401 challenges (Bearer token flow or Basic) once per request, and turns
transport failures into typed errors.

Credentials are bound to their registry (auth.Credentials.registry): a client
whose endpoint is not that registry's own (`serves`) holds none, whatever a plan
says. Basic credentials, to the registry or to a token server, travel only over
verified TLS or to a loopback host, unless the caller itself allowed it
(`credentials_insecure`, the stage's --insecure: `basic_refusal`). Redirects
are followed by hand (send_following_redirects, the token request): credentials
never go to the host a redirect names. Retry policy for blobs lives in the fetch
stage; this layer makes one attempt per call.

The exception is `quick_head`, one unauthenticated HEAD through http.client for
the warm path: importing requests (and building its TLS context) costs more than
a warm run's whole work, so requests is imported only where a client is made.
"""

import ipaddress
import json
import logging
import os
import re
import socket
import threading
from urllib.parse import urljoin, urlsplit

from .auth import TokenCache, parse_challenge
from .cache import atomic_write
from .errors import ManifestError, NotFound, RegistryError, TLSFailure, Unauthorized, Unreachable

log = logging.getLogger("tosi.registry")

DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_READ_TIMEOUT = 60
MAX_REDIRECTS = 5
TLS_PROBE_TIMEOUT = 2
# A hostile server may answer with a body that never ends: only this much of an
# error answer is read for its message, and a token server's answer is refused beyond
# its cap (a token goes into every request's headers, which servers cap near 1 MiB).
MAX_ERROR_BODY = 64 << 10
MAX_TOKEN_ANSWER = 1 << 20
# A token server answering these is busy or down for a moment, not refusing.
TOKEN_SERVER_BUSY = (429, 500, 502, 503, 504)
# RFC 6750 b64token, leniently: any visible ASCII, nothing that could end a header.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


def is_loopback_host(host):
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    hostname = urlsplit(f"//{host}").hostname or host
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def endpoint_for(registry, insecure=False, scheme=None):
    """Base URL of a registry host: https, or http for loopback or --insecure (as Docker does)."""
    if registry == "docker.io":
        return "https://registry-1.docker.io"
    if scheme is None:
        scheme = "http" if (is_loopback_host(registry) or insecure) else "https"
    return f"{scheme}://{registry}"


def serves(endpoint, registry):
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


def basic_refusal(url, allow_insecure=False, tls_verified=True):
    """Why Basic credentials may not go to `url`, or None if they may: they travel
    over verified TLS, to a loopback host, or anywhere with `allow_insecure` (the
    --insecure of the stage itself, never a plan's)."""
    parts = urlsplit(url)
    if allow_insecure or is_loopback_host(parts.netloc):
        return None
    if parts.scheme != "https":
        return f"credentials are not sent over plain http to {parts.netloc}, which is not " \
            "on loopback (use --insecure to allow it)"
    if not tls_verified:
        return f"credentials are not sent to {parts.netloc} over TLS that is not verified " \
            "(use --insecure to allow it)"
    return None


def speaks_tls(registry, timeout=TLS_PROBE_TIMEOUT):
    """True if `registry` (host[:port], default port 443) completes a TLS handshake.

    Nothing is verified or sent here: it only tells a TLS server from a plain
    HTTP one, which answers the ClientHello with garbage or not at all.
    """
    parts = urlsplit(f"//{registry}")
    host, port = parts.hostname, parts.port or 443
    context = _unverified_context()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return True
    except (OSError, ValueError):
        return False


def detect_endpoint(registry, insecure=False, timeout=TLS_PROBE_TIMEOUT, scheme_file=None,
                    probe=True):
    """The endpoint to use for `registry`, as Docker chooses it.

    https with verification for every registry, except that a loopback registry
    and, with --insecure, any registry may speak plain http: those get https only
    if they answer a TLS handshake (then verified, unless --insecure), else http.

    `scheme_file` remembers the probe's answer: with `probe=False` the scheme it
    holds is taken without a handshake (None if it holds none), and a probe
    rewrites it. A remembered scheme is a guess the caller must be ready to drop.
    """
    if registry == "docker.io" or not (insecure or is_loopback_host(registry)):
        return endpoint_for(registry, insecure=False, scheme="https")
    if not probe:
        scheme = _read_scheme(scheme_file) if scheme_file else None
        return endpoint_for(registry, insecure, scheme=scheme) if scheme else None
    scheme = "https" if speaks_tls(registry, timeout) else "http"
    if scheme_file and _read_scheme(scheme_file) != scheme:
        try:
            atomic_write(scheme_file, f"{scheme}\n".encode())
        except OSError as exc:  # only a cache: the next run probes again
            log.debug("cannot remember the scheme of %s in %s: %s", registry, scheme_file, exc)
    return endpoint_for(registry, insecure, scheme=scheme)


def _unverified_context():
    import ssl

    # Not create_default_context(): loading the system's CA store is the slow part.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _read_scheme(path):
    try:
        with open(path) as f:
            scheme = f.read(16).strip()
    except OSError:
        return None
    return scheme if scheme in ("http", "https") else None


_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")
_CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def quick_head(endpoint, path, headers, ca_file=None, insecure=False,
               connect_timeout=DEFAULT_CONNECT_TIMEOUT, read_timeout=DEFAULT_READ_TIMEOUT):
    """(status, headers with lower-case names) of the answer to one plain HEAD of
    `path`, or None: a transport failure, or an environment that routes requests
    through a proxy. Anything but a 200 means "ask again through a RegistryClient",
    which handles challenges, redirects and all; no credentials are ever sent here.

    A HEAD answer is a status line and headers only, so a socket does: even
    http.client (with the email package under it) costs a warm run 15 ms.
    TLS is verified as RegistryClient verifies it: `ca_file`, else the bundle the
    environment names, else certifi's (requests' own default); `insecure`: not at all.
    """
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES):
        return None
    parts = urlsplit(endpoint)
    https = parts.scheme == "https"
    lines = [f"HEAD {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if https else 80)),
                                      timeout=connect_timeout) as sock:
            if https:
                sock = _tls_context(ca_file, insecure).wrap_socket(sock, server_hostname=parts.hostname)
            with sock:
                sock.settimeout(read_timeout)
                sock.sendall("\r\n".join(lines).encode("latin-1"))
                head = _read_head(sock)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        log.debug("HEAD %s%s: %s; asking through the client", endpoint, path, exc)
        return None
    status_line, *header_lines = head.split("\r\n")
    version, _, status = status_line.partition(" ")
    status = status.partition(" ")[0]
    if not version.startswith("HTTP/1.") or not status.isdigit():
        log.debug("HEAD %s%s: %r is no HTTP answer", endpoint, path, status_line[:100])
        return None
    answer = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if colon:
            answer[name.strip().lower()] = value.strip()
    return int(status), answer


def _read_head(sock, limit=64 << 10):
    """The status line and headers of an HTTP answer, up to the blank line after them."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > limit:
            raise ValueError(f"no end of the headers in the first {limit} bytes")
        chunk = sock.recv(8192)
        if not chunk:
            raise ValueError("connection closed before the end of the headers")
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0].decode("latin-1")


def _tls_context(ca_file, insecure):
    import ssl

    if insecure:
        return _unverified_context()
    bundle = ca_file or next((os.environ[name] for name in _CA_BUNDLE_VARIABLES
                              if os.environ.get(name)), None)
    if bundle is None:
        import certifi

        bundle = certifi.where()
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


class RegistryClient:
    """A session with one registry endpoint (e.g. https://registry-1.docker.io)."""

    def __init__(self, endpoint, credentials=None, ca_file=None, insecure=False,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, read_timeout=DEFAULT_READ_TIMEOUT,
                 pool_size=16, token_cache=None, credentials_insecure=None, endpoint_origin=None):
        """`insecure`: plain http and unverified TLS may be spoken. `credentials_insecure`
        (default: `insecure`): Basic credentials may go over them to a host that is not
        on loopback; a stage that takes `insecure` from a plan passes its own flag here.
        `endpoint_origin` names where the endpoint came from in messages ("the plan's
        endpoint")."""
        self.endpoint = endpoint.rstrip("/")
        self.credentials, self.withheld = _bind(credentials, self.endpoint,
                                                endpoint_origin or "the endpoint")
        if self.withheld:
            log.info("%s", self.withheld)
        self.credentials_insecure = insecure if credentials_insecure is None else credentials_insecure
        self.timeout = (connect_timeout, read_timeout)
        import requests
        from requests.adapters import HTTPAdapter

        self.tokens = token_cache or TokenCache()
        self.session = requests.Session()
        # The environment still decides proxies and REQUESTS_CA_BUNDLE, but credentials
        # come from the flags only: a session-level no-op auth keeps ~/.netrc out.
        self.session.trust_env = True
        self.session.auth = _no_auth
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(pool_size, 4), max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # Passed per request: requests lets REQUESTS_CA_BUNDLE override a session's
        # verify, which would silently replace --ca-file and undo --insecure.
        self.verify = False if insecure else (ca_file or None)
        self.session.verify = True if self.verify is None else self.verify
        self._host = urlsplit(self.endpoint).netloc
        self._lock = threading.Lock()

    # ------------------------------------------------------------ plumbing

    def url(self, path):
        return urljoin(self.endpoint + "/", path.lstrip("/")) if not path.startswith(("http://", "https://")) else path

    def same_host(self, url):
        return urlsplit(url).netloc == self._host and urlsplit(url).scheme == urlsplit(self.endpoint).scheme

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
            if not self.credentials or self._basic_refusal(self.endpoint):
                return None
            return self.credentials.basic_header()
        if scheme == "bearer":
            token = self.tokens.get(self._token_key(params, repository))
            return f"Bearer {token}" if token else None
        return None

    def _basic_refusal(self, url):
        return basic_refusal(url, self.credentials_insecure, tls_verified=self.verify is not False)

    def _fetch_token(self, params, repository):
        realm = params.get("realm")
        if not realm:
            raise Unauthorized(f"{self.endpoint}: Bearer challenge without a realm")
        if not _is_http_url(realm):
            raise Unauthorized(f"{self.endpoint}: Bearer challenge realm {realm[:200]!r} is no http(s) URL")
        scope = self._scope(repository) or params.get("scope")
        key = self._token_key(params, repository)
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        if scope:
            query["scope"] = scope
        what = f"token server {realm}"
        if self.credentials:
            refusal = self._basic_refusal(realm)
            if refusal:
                raise Unauthorized(f"{what}: {refusal}")
        r = self._token_request(realm, query, what)
        if r.status_code in (401, 403):
            r.close()
            raise Unauthorized(f"{self._host}: token server refused the credentials ({r.status_code})",
                               status=r.status_code)
        if r.status_code in TOKEN_SERVER_BUSY:  # Unreachable: what resolve and fetch try again
            r.close()
            raise Unreachable(f"{what} unavailable ({r.status_code})")
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

    def _token_request(self, realm, query, what):
        """GET the token, following redirects by hand: the Basic credentials go to the
        realm's own scheme, host and port only, never to where a redirect leads."""
        import requests

        url, params = realm, query
        for _hop in range(MAX_REDIRECTS + 1):
            headers = {}
            if self.credentials and _same_origin(url, realm):
                headers["Authorization"] = self.credentials.basic_header()
            try:
                r = self.session.get(url, params=params, headers=headers, timeout=self.timeout,
                                     verify=self.verify, stream=True, allow_redirects=False)
            except requests.exceptions.SSLError as exc:
                raise TLSFailure(f"{what}: TLS failure: {_reason(exc)}") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise Unreachable(f"{what} unreachable: {_reason(exc)}") from None
            except (requests.RequestException, ValueError) as exc:
                raise RegistryError(f"{what}: {_reason(exc)}") from None
            if r.status_code not in (301, 302, 303, 307, 308) or "Location" not in r.headers:
                return r
            r.close()
            target = redirect_target(r.url, r.headers["Location"])
            if target is None:
                raise RegistryError(f"{what}: redirects to {r.headers['Location'][:200]!r}, no http(s) URL")
            url, params = target, None
        raise RegistryError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def send(self, method, path, repository=None, headers=None, stream=False,
             allow_redirects=False, timeout=None):
        """One request to the registry, authenticated; a 401 is answered once and retried.

        Returns the response whatever its status (callers map statuses to errors with
        `check`). Redirects are not followed here unless asked: the fetch stage follows
        them itself so credentials never reach another host.
        """
        url = self.url(path)
        hdrs = dict(headers or {})
        for attempt in (1, 2):
            if self.same_host(url):
                auth = self._auth_header(repository)
                if auth:
                    hdrs["Authorization"] = auth
            resp = self._request(method, url, hdrs, stream, allow_redirects, timeout)
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
                    raise Unauthorized(f"{self._host}: authentication required (use --username)",
                                       status=401)
                refusal = self._basic_refusal(url)
                if refusal:
                    raise Unauthorized(f"{self._host}: authentication required; {refusal}", status=401)
                self._challenge = (scheme, params)
            else:
                return resp
        return resp

    def _request(self, method, url, headers, stream, allow_redirects, timeout):
        import requests

        try:
            return self.session.request(
                method, url, headers=headers, stream=stream,
                allow_redirects=allow_redirects, timeout=timeout or self.timeout, verify=self.verify,
            )
        except requests.exceptions.SSLError as exc:
            raise TLSFailure(f"{urlsplit(url).netloc}: TLS failure: {_reason(exc)}") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Unreachable(f"{urlsplit(url).netloc} unreachable: {_reason(exc)}") from None
        except (requests.RequestException, ValueError) as exc:
            # A malformed URL, header or Location (requests parses it even when not following).
            parts = urlsplit(url)  # the path only: storage URLs carry signatures in the query
            raise RegistryError(f"{parts.netloc}: {method} {parts.path}: {_reason(exc)}") from None

    def check(self, resp, what):
        """Raise the typed error for a failed response, with the registry's code and message."""
        if resp.status_code < 400:
            return resp
        code, message = _registry_error(resp)
        detail = f"{code}: {message}" if code else (message or resp.reason or "")
        text = f"{what}: {resp.status_code} {detail}".rstrip()
        if resp.status_code == 404 or code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"):
            raise NotFound(text, status=resp.status_code, code=code)
        if resp.status_code in (401, 403) or code in ("UNAUTHORIZED", "DENIED"):
            if self.withheld:
                text += f" ({self.withheld})"
            elif not self.credentials:
                text += " (no credentials were given: use --username)"
            raise Unauthorized(text, status=resp.status_code, code=code)
        raise RegistryError(text, status=resp.status_code, code=code)

    def send_following_redirects(self, method, path, repository=None, headers=None, stream=False,
                                 max_redirects=MAX_REDIRECTS):
        """send(), following redirects itself: credentials go only to the registry's own host."""
        url = self.url(path)
        for _hop in range(max_redirects + 1):
            resp = self.send(method, url, repository=repository, headers=headers, stream=stream)
            if resp.status_code not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
                return resp
            resp.close()
            url = redirect_target(url, resp.headers["Location"])
            if url is None:
                raise RegistryError(f"{self._host}: {path} redirects to {resp.headers['Location'][:200]!r}, "
                                    "no http(s) URL")
        raise RegistryError(f"{self._host}: more than {max_redirects} redirects for {path}")

    def read_limited(self, resp, limit, what, too_large=ManifestError):
        """The body of a streamed response, refused (`too_large`) if longer than `limit`."""
        import requests

        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            resp.close()
            raise too_large(f"{what}: {declared} bytes, more than the {_mib(limit)} allowed; refused")
        chunks, total = [], 0
        try:
            for chunk in resp.iter_content(64 << 10):
                total += len(chunk)
                if total > limit:
                    raise too_large(f"{what}: more than the {_mib(limit)} allowed; refused")
                chunks.append(chunk)
        except requests.exceptions.SSLError as exc:
            raise TLSFailure(f"{self._host}: TLS failure: {_reason(exc)}") from None
        except requests.RequestException as exc:
            raise Unreachable(f"{self._host}: connection lost reading {what}: {_reason(exc)}") from None
        finally:
            resp.close()
        return b"".join(chunks)

    # ------------------------------------------------------------ API

    def blob_path(self, repository, digest):
        return f"/v2/{repository}/blobs/{digest}"

    def manifest_path(self, repository, reference):
        return manifest_path(repository, reference)

    def close(self):
        self.session.close()


def manifest_path(repository, reference):
    return f"/v2/{repository}/manifests/{reference}"


def _bind(credentials, endpoint, origin):
    """(credentials, None) if `credentials` may go to `endpoint`, else (None, why not)."""
    registry = getattr(credentials, "registry", None)
    if credentials is None or registry is None or serves(endpoint, registry):
        return credentials, None
    own = endpoint_for(registry)
    return None, (f"the credentials for {registry} were not sent: {origin} {endpoint} is not "
                  f"that registry's ({own})")


def _same_origin(url, other):
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _is_http_url(url):
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False


def redirect_target(url, location):
    """The absolute URL a redirect from `url` to `location` leads to, or None unless it is http(s)."""
    try:
        target = urljoin(url, location)
    except ValueError:
        return None
    return target if _is_http_url(target) else None


def _registry_error(resp):
    """(code, message) of the first entry of an error answer's "errors", from at most
    MAX_ERROR_BODY bytes of it: a body that never ends is not waited for."""
    import requests

    data = b""
    try:
        for chunk in resp.iter_content(8192):
            data += chunk
            if len(data) >= MAX_ERROR_BODY:
                return None, None
        body = json.loads(data)
        errors = body.get("errors") or []
        if errors and isinstance(errors[0], dict):
            return errors[0].get("code"), errors[0].get("message")
    except (ValueError, AttributeError, RecursionError, requests.RequestException):
        pass
    return None, None


def _no_auth(request):
    return request


def _mib(n):
    return f"{n / (1 << 20):g} MiB"


_POOL_PREFIX = re.compile(r"^(?:<[^>]*>|\w+\(host=[^)]*\)): ")


def _reason(exc):
    """The readable cause of a transport error: requests wraps urllib3 wraps socket errors."""
    import http.client  # loaded by requests already; kept off the warm path

    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            # urllib3's ProtocolError("Connection aborted.", cause) names the cause last.
            causes = [arg for arg in exc.args[:1] + exc.args[-1:] if isinstance(arg, BaseException)]
            inner = causes[0] if causes else None
        if inner is None:
            break
        exc = inner
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, OSError):
        text = f"no HTTP answer ({type(exc).__name__}: {text.strip()[:100]})"
    text = _POOL_PREFIX.sub("", text).replace("Failed to establish a new connection: ", "")
    return text.strip("'\" ")[:300]
