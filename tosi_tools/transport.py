"""The one HTTP transport: every request tosi makes to a registry, a token server or
blob storage goes through here, under one set of policies.

- Endpoint: `detect_endpoint` chooses http or https for a registry as Docker does
  (and remembers a loopback registry's answer in the workdir's `.scheme` file).
- TLS: a `keychain.TLSConfig` per host (`Keychain.tls_for`), used alike by the
  pooled session (`Transport`) and by the warm path's `quick_head`.
- Retries: `RetryPolicy`. One list of temporary statuses (`TEMPORARY_STATUSES`:
  408, 429, 5xx), reported as `errors.Unavailable`; a lost or refused connection is
  `errors.Unreachable`; both are tried again, after the Retry-After a server gave
  (seconds or an HTTP date, capped at RETRY_AFTER_CAP) or an exponential backoff
  with jitter, within a count and a total wait (the budget).
- Redirects: `follow_redirects`, by hand, at most MAX_REDIRECTS; the caller decides
  the headers of each hop from its URL, so credentials never go to another origin.
- Errors: requests/urllib3/ssl exceptions become typed errors (`Transport.send`,
  `BodyStream.read1`, `read_limited`) with one readable cause (`reason`);
  `rewrap` changes an error's message and keeps its type, `status` and `code`.

The warm path (`quick_head`, `detect_endpoint` from a remembered scheme) imports
neither requests nor urllib3: this module imports them only where a session is
made or one of its exceptions is looked at.
"""

import ipaddress
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional, TypeVar
from urllib.parse import urljoin, urlsplit

from .cache import atomic_write
from .errors import (
    Cancelled, ManifestError, RegistryError, TLSFailure, TosiError, Unavailable, Unreachable, flag,
)
from .keychain import DEFAULT_TLS, TLSConfig

log = logging.getLogger("tosi.transport")

DEFAULT_CONNECT_TIMEOUT = 10
DEFAULT_READ_TIMEOUT = 60
TLS_PROBE_TIMEOUT = 2

MAX_REDIRECTS = 10
REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# Busy or down for a moment, not refusing: tried again (blobs, manifests, tokens alike).
TEMPORARY_STATUSES = frozenset({408, 429, *range(500, 600)})
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
# The most a request waits between its attempts in all, whatever the count allows.
RETRY_BUDGET = 300.0

# A hostile server may answer with a body that never ends: only this much of an
# error answer is read for its message.
MAX_ERROR_BODY = 64 << 10

T = TypeVar("T")


# ---------------------------------------------------------------- endpoint and scheme

def is_loopback_host(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    hostname = urlsplit(f"//{host}").hostname or host
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def endpoint_for(registry: str, insecure: bool = False, scheme: Optional[str] = None) -> str:
    """Base URL of a registry host: https, or http for loopback or --insecure (as Docker does)."""
    if registry == "docker.io":
        return "https://registry-1.docker.io"
    if scheme is None:
        scheme = "http" if (is_loopback_host(registry) or insecure) else "https"
    return f"{scheme}://{registry}"


def speaks_tls(registry: str, timeout: float = TLS_PROBE_TIMEOUT) -> bool:
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


def detect_endpoint(registry: str, insecure: bool = False, timeout: float = TLS_PROBE_TIMEOUT,
                    scheme_file: Optional[str] = None, probe: bool = True,
                    remember: bool = True) -> Optional[str]:
    """The endpoint to use for `registry`, as Docker chooses it.

    https with verification for every registry, except that a loopback registry
    and, with --insecure, any registry may speak plain http: those get https only
    if they answer a TLS handshake (then verified, unless --insecure), else http.

    `scheme_file` remembers the probe's answer: with `probe=False` the scheme it
    holds is taken without a handshake (None if it holds none), and a probe
    rewrites it (`remember=False`: the caller does, with remember_scheme, once the
    registry answered). A remembered scheme is a guess the caller must be ready to drop.
    """
    if registry == "docker.io" or not (insecure or is_loopback_host(registry)):
        return endpoint_for(registry, insecure=False, scheme="https")
    if not probe:
        scheme = _read_scheme(scheme_file) if scheme_file else None
        return endpoint_for(registry, insecure, scheme=scheme) if scheme else None
    scheme = "https" if speaks_tls(registry, timeout) else "http"
    endpoint = endpoint_for(registry, insecure, scheme=scheme)
    if scheme_file and remember:
        remember_scheme(scheme_file, registry, endpoint, insecure)
    return endpoint


def remember_scheme(scheme_file: str, registry: str, endpoint: str, insecure: bool = False) -> None:
    """Keep the scheme of `endpoint` (what detect_endpoint probed) in `scheme_file`, for
    detect_endpoint(probe=False); nothing for a registry that is never probed."""
    if registry == "docker.io" or not (insecure or is_loopback_host(registry)):
        return
    scheme = endpoint.partition("://")[0]
    if _read_scheme(scheme_file) != scheme:
        try:
            atomic_write(scheme_file, f"{scheme}\n".encode())
        except OSError as exc:  # only a cache: the next run probes again
            log.debug("cannot remember the scheme of %s in %s: %s", registry, scheme_file, exc)


def _read_scheme(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            scheme = f.read(16).strip()
    except OSError:
        return None
    return scheme if scheme in ("http", "https") else None


# ---------------------------------------------------------------- TLS

_CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def _unverified_context() -> Any:
    import ssl

    # Not create_default_context(): loading the system's CA store is the slow part.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def ssl_context(tls: TLSConfig) -> Any:
    """An ssl.SSLContext verifying as `Transport` does: `tls.ca_file`, else the bundle
    the environment names, else certifi's (requests' own default), and `tls.added_cas`
    besides; none with `insecure`."""
    import ssl

    if tls.insecure:
        context = _unverified_context()
    else:
        bundle = tls.ca_file or next((os.environ[name] for name in _CA_BUNDLE_VARIABLES
                                      if os.environ.get(name)), None)
        if bundle is None:
            import certifi

            bundle = certifi.where()
        if os.path.isdir(bundle):
            context = ssl.create_default_context(capath=bundle)
        else:
            context = ssl.create_default_context(cafile=bundle)
        for ca_file in tls.added_cas:
            context.load_verify_locations(cafile=ca_file)
    if tls.client_cert:
        context.load_cert_chain(*tls.client_cert)
    return context


# ---------------------------------------------------------------- the warm path's HEAD

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def quick_head(endpoint: str, path: str, headers: Mapping[str, str], ca_file: Optional[str] = None,
               insecure: bool = False, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
               read_timeout: float = DEFAULT_READ_TIMEOUT,
               tls: Optional[TLSConfig] = None) -> Optional[tuple[int, dict[str, str]]]:
    """(status, headers with lower-case names) of the answer to one plain HEAD of
    `path`, or None: a transport failure, or an environment that routes requests
    through a proxy. Anything but a 200 means "ask again through a RegistryClient",
    which handles challenges, redirects and all; no credentials are ever sent here.

    A HEAD answer is a status line and headers only, so a socket does: even
    http.client (with the email package under it) costs a warm run 15 ms.
    TLS is verified as a Transport verifies it (`ssl_context`): `tls`, else
    TLSConfig(ca_file, None, insecure).
    """
    if any(os.environ.get(name) or os.environ.get(name.upper()) for name in _PROXY_VARIABLES):
        return None
    tls = tls if tls is not None else TLSConfig(ca_file, None, insecure)
    parts = urlsplit(endpoint)
    https = parts.scheme == "https"
    lines = [f"HEAD {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close",
             *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if https else 80)),
                                      timeout=connect_timeout) as sock:
            if https:
                sock = ssl_context(tls).wrap_socket(sock, server_hostname=parts.hostname)
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


def _read_head(sock: socket.socket, limit: int = 64 << 10) -> str:
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


# ---------------------------------------------------------------- retries

def is_temporary(status: int) -> bool:
    """Whether an answer with `status` is worth another try (TEMPORARY_STATUSES)."""
    return status in TEMPORARY_STATUSES


def retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds a Retry-After value asks to wait (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def unavailable(status: int, reason: Optional[str], headers: Mapping[str, str], what: str) -> Unavailable:
    """The error for a temporary answer: `what: STATUS REASON`, with its Retry-After."""
    return Unavailable(f"{what}: {status} {reason or ''}".rstrip(), status=status,
                       retry_after=retry_after(headers.get("Retry-After")))


class Temporary(Exception):
    """Raised by one attempt under RetryPolicy.run: `error` may go away if tried
    again (after `retry_after` seconds, if given). `response`, if any, is what the
    caller gets back when no attempt is left, instead of the error."""

    def __init__(self, error: TosiError, retry_after: Optional[float] = None,
                 response: Any = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        self.response = response


class RetryPolicy:
    """How often and how long to try again after a temporary failure.

    `retries`: attempts after the first; `budget`: seconds of waiting in all. The
    wait before retry n (from 0) is the server's Retry-After (capped at
    `retry_after_cap`), else a random time between half and all of
    min(`backoff_cap`, `backoff_base` * 2**n)."""

    def __init__(self, retries: int = 2, backoff_base: float = BACKOFF_BASE,
                 backoff_cap: float = BACKOFF_CAP, retry_after_cap: float = RETRY_AFTER_CAP,
                 budget: float = RETRY_BUDGET) -> None:
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.budget = budget

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Seconds to wait before retry `attempt` (0 for the first)."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        import random

        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** attempt))
        return random.uniform(ceiling / 2, ceiling)

    def run(self, attempt: Callable[[], T], cancelled: Optional[threading.Event] = None,
            what: Optional[str] = None) -> T:
        """attempt() until it returns, tried again while it fails temporarily: it raises
        Temporary, or Unreachable (Unavailable included: its Retry-After is honoured).
        Out of attempts or budget, the last error is raised, its message ending
        "(giving up after N attempts)", or a Temporary's `response` is returned.
        A set `cancelled` event stops the waiting with Cancelled."""
        tries = 0
        waited = 0.0
        while True:
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"{what or 'request'}: cancelled")
            try:
                return attempt()
            except Temporary as failure:
                error, after, response = failure.error, failure.retry_after, failure.response
            except Unreachable as exc:
                error, after, response = exc, getattr(exc, "retry_after", None), None
            delay = self.delay(tries, after)
            if tries >= self.retries or waited + delay > self.budget:
                if response is not None:
                    return response
                raise rewrap(error, f"{error} (giving up after {tries + 1} attempts)") from None
            if response is not None:
                response.close()
            tries += 1
            waited += delay
            log.info("%s; retry %d of %d in %.1fs", error, tries, self.retries, delay)
            if cancelled is not None:
                if cancelled.wait(delay):
                    raise Cancelled(f"{what or 'request'}: cancelled") from None
            else:
                time.sleep(delay)


# ---------------------------------------------------------------- redirects

def is_http_url(url: str) -> bool:
    """An absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False


def redirect_target(url: str, location: str) -> Optional[str]:
    """The absolute URL a redirect from `url` to `location` leads to, or None unless it is http(s)."""
    try:
        target = urljoin(url, location)
    except ValueError:
        return None
    return target if is_http_url(target) else None


def same_origin(url: str, other: str) -> bool:
    """Same scheme, host and port: where credentials for `other` may go."""
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def redact(url: str) -> str:
    """`url` without its query: blob storage URLs carry signatures there."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def follow_redirects(send_one: Callable[[str], Any], url: str, what: str,
                     limit: int = MAX_REDIRECTS) -> tuple[Any, str]:
    """(answer, its URL): send_one(url), then send_one(target) for each redirect, at
    most `limit` of them. send_one decides each hop's headers from its URL: that is
    where credentials are kept from another origin."""
    for _hop in range(limit + 1):
        resp = send_one(url)
        if resp.status_code not in REDIRECT_STATUSES or "Location" not in resp.headers:
            return resp, url
        resp.close()
        location = resp.headers["Location"]
        target = redirect_target(url, location)
        if target is None:
            raise RegistryError(f"{what} redirects to {location[:200]!r}, no http(s) URL",
                                status=resp.status_code)
        url = target
    raise RegistryError(f"{what}: more than {limit} redirects")


# ---------------------------------------------------------------- errors

_POOL_PREFIX = re.compile(r"^(?:<[^>]*>|\w+\(host=[^)]*\)): ")


def reason(exc: BaseException) -> str:
    """The readable cause of a transport error: requests wraps urllib3 wraps socket errors."""
    import http.client  # loaded by requests already; kept off the warm path

    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "ReadTimeoutError":  # urllib3's, without importing it
            return "read timed out"
        inner = getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            # urllib3's ProtocolError("Connection aborted.", cause) names the cause last.
            causes = [arg for arg in exc.args[:1] + exc.args[-1:] if isinstance(arg, BaseException)]
            inner = causes[0] if causes else None
        if inner is None:
            break
        exc = inner
    if isinstance(exc, http.client.IncompleteRead):
        return "the server closed the connection early"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, OSError):
        text = f"no HTTP answer ({type(exc).__name__}: {text.strip()[:100]})"
    text = _POOL_PREFIX.sub("", text).replace("Failed to establish a new connection: ", "")
    return text.strip("'\" ")[:300]


def rewrap(error: TosiError, message: str) -> TosiError:
    """`error` with another message: same type, same `status`, `code` and other fields."""
    import copy

    new = copy.copy(error)
    new.args = (message,)
    return new


# What OpenSSL says when the answer to its ClientHello is no TLS record (e.g. "HTTP/1.1 400").
_NO_TLS_RECORD = re.compile(r"wrong.version.number|record.layer.failure|packet.length.too.long|"
                            r"unknown.protocol", re.IGNORECASE)


def speaks_plain_http(netloc: str, timeout: float = TLS_PROBE_TIMEOUT) -> bool:
    """True if `netloc` (host[:port], default port 443) answers a plain HTTP request
    with an HTTP status line."""
    parts = urlsplit(f"//{netloc}")
    try:
        with socket.create_connection((parts.hostname, parts.port or 443), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"HEAD /v2/ HTTP/1.0\r\nHost: {netloc}\r\n\r\n".encode("latin-1"))
            answer = b""
            while len(answer) < 5:
                chunk = sock.recv(5 - len(answer))
                if not chunk:
                    break
                answer += chunk
            return answer == b"HTTP/"
    except (OSError, ValueError, UnicodeError):
        return False


def _request_error(exc: Exception, url: str, method: str, what: Optional[str],
                   insecure: bool = False) -> TosiError:
    """The typed error for an exception of requests (or urllib3, ssl) sending to `url`;
    `insecure`: the transport already allows plain http (for the advice given)."""
    import requests

    parts = urlsplit(url)  # the path only: storage URLs carry signatures in the query
    where = what or parts.netloc
    if isinstance(exc, requests.exceptions.SSLError):
        why = reason(exc)
        if _NO_TLS_RECORD.search(why) and speaks_plain_http(parts.netloc):
            # --insecure lets resolve choose http for the host; with it, the https
            # endpoint was given (a plan's, -url): only another endpoint helps.
            advice = f"reach it as http://{parts.netloc}" if insecure else f"use {flag('insecure')}"
            prefix = "" if where == parts.netloc else f"{where}: "
            return TLSFailure(f"{prefix}{parts.netloc} speaks plain HTTP; {advice}")
        return TLSFailure(f"{where}: TLS failure: {why}")
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return Unreachable(f"{where} unreachable: {reason(exc)}")
    # A malformed URL, header or Location (requests parses it even when not following).
    return RegistryError(f"{what or f'{parts.netloc}: {method} {parts.path}'}: {reason(exc)}")


def error_body(resp: Any) -> tuple[Optional[str], Optional[str]]:
    """(code, message) of the first entry of a registry's error answer ("errors"), from
    at most MAX_ERROR_BODY bytes of it: a body that never ends is not waited for."""
    import json

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


# ---------------------------------------------------------------- the session

def _no_auth(request: Any) -> Any:
    return request


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


class BodyStream:
    """A streamed answer of `Transport`: `status`, `headers`, `reason`, `url` (after
    redirects), its body as it arrives (`read1`), and `shutdown()` to wake a thread
    blocked reading it from another thread."""

    def __init__(self, response: Any, url: str) -> None:
        self.response = response
        self.status = response.status_code
        self.headers = response.headers
        self.reason = response.reason
        self.url = url

    def read1(self, size: int) -> bytes:
        """Up to `size` bytes that have arrived (b"" at the end); a connection lost
        is Unreachable, its message the cause."""
        try:
            return self.response.raw.read1(size, decode_content=False)
        except Exception as exc:  # urllib3's and requests' errors, OSError
            if not _is_transport_exception(exc):
                raise
            raise Unreachable(reason(exc)) from None

    def shutdown(self) -> None:
        # shutdown(), unlike close(), wakes a thread blocked in recv() on the socket.
        sock = getattr(getattr(self.response.raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> "BodyStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_transport_exception(exc: BaseException) -> bool:
    import requests
    import urllib3

    return isinstance(exc, (urllib3.exceptions.HTTPError, requests.RequestException, OSError))


_adapter_classes: dict[str, Any] = {}


def _context_adapter(context: Any, **options: Any) -> Any:
    """A requests HTTPAdapter whose connections use `context` (an ssl.SSLContext) as is."""
    if "context" not in _adapter_classes:
        from requests.adapters import HTTPAdapter

        class ContextAdapter(HTTPAdapter):
            def __init__(self, context: Any, **options: Any) -> None:
                self._ssl_context = context
                super().__init__(**options)

            def init_poolmanager(self, *args: Any, **options: Any) -> None:
                options["ssl_context"] = self._ssl_context
                super().init_poolmanager(*args, **options)

        _adapter_classes["context"] = ContextAdapter
    return _adapter_classes["context"](context, **options)


class Transport:
    """A pooled HTTP session speaking TLS as `tls` says; one attempt per call.

    Proxies and REQUESTS_CA_BUNDLE still come from the environment, credentials
    never do (~/.netrc is ignored): callers put an Authorization header where
    their own policy allows it."""

    def __init__(self, tls: TLSConfig = DEFAULT_TLS, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, pool_size: int = 16) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self.tls = tls
        self.timeout = (connect_timeout, read_timeout)
        self.session = requests.Session()
        self.session.trust_env = True
        self.session.auth = _no_auth
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(pool_size, 4), max_retries=0)
        self.session.mount("http://", adapter)
        if tls.added_cas and not tls.insecure:
            # requests takes one CA bundle path; CAs added to the default store (a
            # certs.d directory's) need a context of our own, which urllib3 uses as is.
            adapter = _context_adapter(ssl_context(tls), pool_connections=4,
                                       pool_maxsize=max(pool_size, 4), max_retries=0)
        self.session.mount("https://", adapter)
        # Passed per request: requests lets REQUESTS_CA_BUNDLE override a session's
        # verify, which would silently replace --ca-file and undo --insecure.
        self.verify: Any = False if tls.insecure else (tls.ca_file or None)
        self.session.verify = True if self.verify is None else self.verify
        self.cert = tls.client_cert

    @property
    def tls_verified(self) -> bool:
        """Whether the server's certificate is checked (not --insecure)."""
        return self.verify is not False

    def send(self, method: str, url: str, headers: Optional[Mapping[str, str]] = None,
             stream: bool = False, timeout: Any = None, params: Optional[Mapping[str, str]] = None,
             what: Optional[str] = None, data: Optional[Mapping[str, Any]] = None) -> Any:
        """One request, redirects not followed; the requests.Response whatever its
        status. `data`: a form to send as the body. Failures to get an answer are
        TLSFailure, Unreachable or (a malformed URL or answer) RegistryError, named
        `what` (default: the host)."""
        try:
            return self.session.request(method, url, headers=dict(headers or {}), params=params,
                                        data=data, stream=stream, allow_redirects=False,
                                        timeout=timeout or self.timeout, verify=self.verify,
                                        cert=self.cert)
        except Exception as exc:
            if not _is_transport_exception(exc) and not isinstance(exc, ValueError):
                raise
            raise _request_error(exc, url, method, what, self.tls.insecure) from None

    def read_limited(self, resp: Any, limit: int, what: str,
                     too_large: type[TosiError] = ManifestError) -> bytes:
        """The body of a streamed response, refused (`too_large`) if longer than `limit`."""
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            resp.close()
            raise too_large(f"{what}: {declared} bytes, more than the {_mib(limit)} allowed; refused")
        chunks, total = [], 0
        host = urlsplit(resp.url or "").netloc or "the server"
        try:
            for chunk in resp.iter_content(64 << 10):
                total += len(chunk)
                if total > limit:
                    raise too_large(f"{what}: more than the {_mib(limit)} allowed; refused")
                chunks.append(chunk)
        except TosiError:
            raise
        except Exception as exc:
            import requests

            if isinstance(exc, requests.exceptions.SSLError):
                raise TLSFailure(f"{host}: TLS failure: {reason(exc)}") from None
            if isinstance(exc, requests.RequestException):
                raise Unreachable(f"{host}: connection lost reading {what}: {reason(exc)}") from None
            raise
        finally:
            resp.close()
        return b"".join(chunks)

    def close(self) -> None:
        self.session.close()
