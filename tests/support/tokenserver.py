"""A token server for the registry's `auth: token` mode, as Docker Hub runs one.

It answers GET /token?service=...&scope=repository:NAME:ACTIONS with a JWT signed
RS256 by a leaf certificate whose chain (x5c) ends in a test CA; the registry
trusts that CA through `rootcertbundle`. Anyone may pull repositories under the
public prefixes; users (HTTP Basic on the token request) may pull and push
everything; wrong credentials get 401. Every token request is recorded.

It also speaks OAuth2's token POST as distribution's token spec describes it
(grant_type=refresh_token with a refresh token from `.refresh_tokens`, whose
account it stands for; an unknown one gets 400 invalid_grant), unless
`.oauth` is False: then a POST gets 405, as from a server that does not trade
identity tokens. With `.anonymous` False it refuses token requests without
credentials (401), as some private registries' token servers do.
"""

import base64
import json
import os
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.support.tls import CertificateAuthority

SERVICE = "tosi-test-registry"
ISSUER = "tosi-test-token-issuer"
TOKEN_LIFETIME = 300


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server.token_server
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        server.requests.append((parts.path, query, "Authorization" in self.headers))
        if parts.path != "/token":
            return self._answer(404, {"error": "not found"})
        account = server.authenticate(self.headers.get("Authorization"))
        if account is False or (account is None and not server.anonymous):
            return self._answer(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                                {"WWW-Authenticate": f'Basic realm="{ISSUER}"'})
        access = [server.grant(account, scope) for scope in query.get("scope", [])]
        token = server.mint([a for a in access if a], subject=account or "")
        body = {"expires_in": TOKEN_LIFETIME, "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for field in server.token_fields:
            body[field] = token
        self._answer(200, body)

    def do_POST(self):
        server = self.server.token_server
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode()) if length else {}
        server.requests.append((parts.path, form, "Authorization" in self.headers))
        if parts.path != "/token":
            return self._answer(404, {"error": "not found"})
        if not server.oauth:
            return self._answer(405, {"error": "method not allowed"})
        if form.get("grant_type") != ["refresh_token"] or "refresh_token" not in form:
            return self._answer(400, {"error": "unsupported_grant_type"})
        account = server.refresh_tokens.get(form["refresh_token"][0])
        if account is None:
            return self._answer(400, {"error": "invalid_grant"})
        access = [server.grant(account, scope) for scope in form.get("scope", [])]
        token = server.mint([a for a in access if a], subject=account)
        self._answer(200, {"access_token": token, "expires_in": TOKEN_LIFETIME, "scope": " ".join(
            form.get("scope", []))})

    def _answer(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class TokenServer:
    def __init__(self, workdir, users=None, public_prefixes=("public/",)):
        self.users = dict(users or {})
        self.public_prefixes = tuple(public_prefixes)
        self.token_fields = ("token", "access_token")  # what a response carries; tests may narrow it
        self.refresh_tokens = {}  # identity token -> account, for the OAuth2 POST
        self.oauth = True
        self.anonymous = True  # False: a token request without credentials gets 401
        self.requests = []
        self.ca = CertificateAuthority("tosi-tools token CA")
        self.signer = self.ca.issue("tosi-tools token signer", server=False)
        self.rootcertbundle = os.path.join(workdir, "token-ca.crt")
        os.makedirs(workdir, exist_ok=True)
        with open(self.rootcertbundle, "wb") as f:
            f.write(self.ca.cert_pem)
        self._server = None
        self._thread = None

    @property
    def realm(self):
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/token"

    def registry_config(self):
        """The `auth` section of a registry config that trusts this server."""
        return {"token": {"realm": self.realm, "service": SERVICE, "issuer": ISSUER,
                          "rootcertbundle": self.rootcertbundle}}

    def start(self):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.token_server = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._server = None

    # ------------------------------------------------------------ policy

    def authenticate(self, header):
        """The account name, None for anonymous, or False for wrong credentials."""
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except ValueError:
            return False
        return user if user in self.users and secrets.compare_digest(self.users[user], password) else False

    def grant(self, account, scope):
        kind, _, rest = scope.partition(":")
        name, _, actions = rest.rpartition(":")
        if kind != "repository" or not name:
            return None
        wanted = [a for a in actions.split(",") if a]
        if account:
            allowed = wanted
        elif name.startswith(self.public_prefixes):
            allowed = [a for a in wanted if a == "pull"]
        else:
            allowed = []
        return {"type": "repository", "name": name, "actions": allowed}

    def mint(self, access, subject=""):
        """A JWT the registry accepts: RS256, x5c chain, plain-string aud, access claim."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(c).decode() for c in (self.signer.cert_der, self.ca.cert_der)]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + TOKEN_LIFETIME,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.signer.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def token_requests(self):
        return [r for r in self.requests if r[0] == "/token"]

    def push_session(self):
        """A requests session that pushes anywhere, with tokens minted directly for each repository."""
        session = requests.Session()
        session.auth = _PushTokenAuth(self)
        return session


class _PushTokenAuth(requests.auth.AuthBase):
    def __init__(self, server):
        self.server = server

    def __call__(self, request):
        path = urlsplit(request.url).path
        name = path[len("/v2/"):]
        for marker in ("/blobs/", "/manifests/"):
            if marker in name:
                name = name.split(marker, 1)[0]
        token = self.server.mint([{"type": "repository", "name": name, "actions": ["pull", "push"]}],
                                 subject="pusher")
        request.headers["Authorization"] = f"Bearer {token}"
        return request
