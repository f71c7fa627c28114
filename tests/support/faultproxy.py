"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the real registry.

It forwards every request to the upstream registry and passes the answer back,
unless a rule matches: then it drops the connection after N body bytes, answers
an error status (e.g. 429 with Retry-After), stalls, flips one byte, strips the
Range header, delays, or redirects to another URL; or it pages a tag list as
the distribution spec says (docker-registry 2.8 ignores ?n=). Every request is
recorded so tests can count what reached the network.

    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("drop", path="/blobs/", after=1000, times=1))
        ... point a plan's endpoint at proxy.url ...
        assert proxy.count("GET", "/blobs/") == 2

`reject_authorization=True` makes a proxy act as blob storage that refuses any
request carrying an Authorization header (as S3 does with presigned URLs); its
own requests upstream then use `upstream_auth`.
"""

import contextlib
import json
import random
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "host", "content-length"}
CHUNK = 64 << 10
ACTIONS = {"drop", "status", "stall", "corrupt", "ignore_range", "delay", "redirect", "throttle",
           "paginate"}


class Rule:
    """One fault: `action` applied to requests whose path contains the regex `path`.

    Parameters by action: drop/stall after=<body bytes sent first>; stall seconds=<how
    long> (None: until the proxy stops); status status=<code>, headers={name: value or
    a function giving it at answer time}, body=b"" (or an iterable of chunks, maybe endless,
    sent until the client hangs up);
    corrupt at=<body offset> (None: a random one below the declared length; the proxy
    counts the bytes it flipped in `corrupted`); delay seconds=<before forwarding>; throttle rate=<body bytes
    per second>; redirect to=<base URL>
    (the request path is appended); paginate (for /tags/list): the upstream's whole
    list, sorted, answered n= tags after last= at a time with a Link rel="next" header
    while more follow, as the distribution spec pages it. `times`: how many matching requests it applies to
    (None: all); with `per_path`, that many requests of each distinct path (e.g. flip a
    byte in the first two answers for every blob). `header`: only requests carrying that
    header match (e.g. "Authorization", to let a registry's 401 challenge through first).
    """

    def __init__(self, action, path="", method="GET", times=None, header=None, per_path=False, **params):
        if action not in ACTIONS:
            raise ValueError(f"unknown fault {action!r}")
        self.action = action
        self.path = re.compile(path)
        self.method = method
        self.times = times
        self.header = header
        self.params = params
        self.per_path = per_path
        self.applied = 0
        self.applied_to = {}  # path -> times applied

    def matches(self, method, path, headers):
        if self.method and method != self.method:
            return False
        if self.header and not any(k.lower() == self.header.lower() for k in headers):
            return False
        done = self.applied_to.get(path, 0) if self.per_path else self.applied
        if self.times is not None and done >= self.times:
            return False
        return bool(self.path.search(path))

    def claim(self, path):
        self.applied += 1
        self.applied_to[path] = self.applied_to.get(path, 0) + 1


class Request:
    def __init__(self, method, path, headers, client=None):
        self.method = method
        self.path = path
        self.headers = headers
        self.client = client  # (host, port): one port per TCP connection
        self.time = time.monotonic()

    def __repr__(self):
        return f"Request({self.method} {self.path} range={self.headers.get('Range')!r})"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_PATCH(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    def _handle(self):
        proxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        rules = proxy.record(self.command, self.path, headers, self.client_address)
        with proxy.in_flight():
            self._serve(proxy, headers, body, rules)

    def _serve(self, proxy, headers, body, rules):
        if proxy.reject_authorization and "Authorization" in self.headers:
            self._answer(400, b"Authorization header not accepted by blob storage\n")
            return
        for rule in rules:
            if rule.action == "status":
                self._answer(rule.params.get("status", 500), rule.params.get("body", b"injected fault\n"),
                             rule.params.get("headers", {}))
                return
            if rule.action == "redirect":
                self._answer(307, b"", {"Location": rule.params["to"].rstrip("/") + self.path})
                return
            if rule.action == "paginate":
                self._paginate(proxy, headers)
                return
            if rule.action == "delay":
                proxy.stopping.wait(rule.params.get("seconds", 1))
            if rule.action == "ignore_range":
                headers.pop("Range", None)
        upstream_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        if proxy.reject_authorization:
            upstream_headers.pop("Authorization", None)
        try:
            resp = proxy.session.request(
                self.command, proxy.upstream + self.path, headers=upstream_headers, data=body,
                stream=True, allow_redirects=False, timeout=30, auth=proxy.upstream_auth,
            )
        except requests.RequestException as exc:
            self._answer(502, f"upstream failed: {exc}\n".encode())
            return
        with resp:
            self._relay(resp, [r for r in rules if r.action in ("drop", "stall", "corrupt", "throttle")])

    def _paginate(self, proxy, headers):
        from urllib.parse import parse_qs, urlencode, urlsplit

        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        upstream_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        resp = proxy.session.get(proxy.upstream + parts.path, headers=upstream_headers, timeout=30,
                                 auth=proxy.upstream_auth)
        if resp.status_code != 200:
            self._answer(resp.status_code, resp.content, {"Content-Type": resp.headers.get("Content-Type", "")})
            return
        listing = resp.json()
        tags = sorted(listing.get("tags") or [])
        if "last" in query:
            tags = [tag for tag in tags if tag > query["last"][0]]
        size = int(query["n"][0]) if "n" in query else len(tags)
        page = tags[:size]
        extra = {"Content-Type": "application/json"}
        if len(tags) > size and page:
            extra["Link"] = f'<{parts.path}?{urlencode({"n": size, "last": page[-1]})}>; rel="next"'
        self._answer(200, json.dumps({"name": listing.get("name"), "tags": page}).encode(), extra)

    def _relay(self, resp, faults):
        declared = resp.headers.get("Content-Length")
        if declared is None and self.command != "HEAD":
            content = resp.raw.read(decode_content=False)
            declared = str(len(content))
            chunks = iter([content])
        else:
            chunks = resp.raw.stream(CHUNK, decode_content=False) if self.command != "HEAD" else iter(())
        self.send_response(resp.status_code)
        for key, value in resp.headers.items():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        if declared is not None:
            self.send_header("Content-Length", declared)
        self.end_headers()
        sent = 0
        stalled = set()  # a stall happens once per response
        # Where each corrupt fault flips its byte in this response.
        flips = {fault: self._flip_offset(fault, declared) for fault in faults if fault.action == "corrupt"}
        for chunk in chunks:
            for fault in faults:
                chunk = self._apply(fault, chunk, sent, stalled, flips)
                if chunk is None:
                    return
            self.wfile.write(chunk)
            sent += len(chunk)
        self.wfile.flush()

    @staticmethod
    def _flip_offset(fault, declared):
        if fault.params.get("at") is not None:
            return fault.params["at"]
        length = int(declared or 0)
        return random.randrange(length) if length else -1

    def _apply(self, fault, chunk, sent, stalled, flips):
        """The chunk to send (maybe altered), or None once the connection is dropped."""
        after = fault.params.get("after", 0)
        if fault.action == "throttle":
            self.server.proxy.stopping.wait(len(chunk) / fault.params["rate"])
            return chunk
        if fault.action == "corrupt":
            at = flips[fault] - sent
            if 0 <= at < len(chunk):
                chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1:]
                self.server.proxy.flipped()
            return chunk
        if sent + len(chunk) <= after:
            return chunk
        head = chunk[: max(after - sent, 0)]
        if head:
            self.wfile.write(head)
        self.wfile.flush()
        if fault.action == "stall":
            if fault not in stalled:
                stalled.add(fault)
                self.server.proxy.stopping.wait(fault.params.get("seconds"))
            return chunk[len(head):]
        if fault.action == "drop":
            self._drop()
            return None
        return chunk[len(head):]

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _answer(self, status, body, headers=None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value() if callable(value) else value)
        if isinstance(body, bytes):
            self.send_header("Content-Length", str(len(body)))
        else:  # chunks (maybe endless): the body ends when the connection closes
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        for chunk in [body] if isinstance(body, bytes) else body:
            self.wfile.write(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        # Clients that hang up (a killed tosi, a cancelled download) are part of the tests.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class FaultProxy:
    def __init__(self, upstream, reject_authorization=False, upstream_auth=None):
        self.upstream = upstream.rstrip("/")
        self.reject_authorization = reject_authorization
        self.upstream_auth = upstream_auth
        self.session = requests.Session()
        self.session.trust_env = False
        self.rules = []
        self.requests = []
        self.stopping = threading.Event()
        self.max_in_flight = 0  # most requests served at the same time
        self.corrupted = 0  # bytes flipped by corrupt rules
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    @property
    def url(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.stopping.set()  # releases stalled handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None
        self.session.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def add(self, rule):
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self):
        with self._lock:
            self.rules.clear()

    def record(self, method, path, headers, client=None):
        """Log a request and claim the rules that apply to it."""
        with self._lock:
            self.requests.append(Request(method, path, headers, client))
            matched = [r for r in self.rules if r.matches(method, path, headers)]
            for rule in matched:
                rule.claim(path)
            return matched

    def flipped(self):
        with self._lock:
            self.corrupted += 1

    @contextlib.contextmanager
    def in_flight(self):
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def seen(self, method=None, path=""):
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and path in r.path]

    def count(self, method=None, path=""):
        return len(self.seen(method, path))
