"""Credentials are bound to the registry they were configured for (issue 10, point 3):
they go only to that registry's own endpoint, never to an endpoint a plan names for
another host; Basic credentials travel over plain http only to loopback, unless the
stage itself was given --insecure; a redirect never carries them to another host."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support.plans import assert_cached, plan_text, random_layer, records_text
from tosi_tools.auth import Credentials
from tosi_tools.plan import new_image_record, new_layer_record
from tosi_tools.registry import RegistryClient, basic_refusal, serves

USER, PASSWORD = "alice", "secret-for-example-com"
FOREIGN = "registry.example.com"


class Recorder:
    """A loopback HTTP server that records every request (method, Host, path as sent,
    Authorization) and answers each with `route(path, host) -> (status, headers, body)`."""

    def __init__(self, route):
        self.route = route
        self.requests = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                auth = self.headers.get("Authorization")
                recorder.requests.append((self.command, self.headers.get("Host"), self.path, auth))
                status, headers, body = recorder.route(self.path, self.headers.get("Host"), auth)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def authorizations(self):
        return [auth for _, _, _, auth in self.requests if auth is not None]


def basic_challenge(path, host, auth):
    return 401, {"WWW-Authenticate": 'Basic realm="registry"'}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'


def docker_config(tmp_path, registry, user=USER, password=PASSWORD):
    directory = tmp_path / "docker-config"
    directory.mkdir()
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {registry: {"auth": auth}}}))
    return str(directory)


def hand_plan(workdir, registry, endpoint, insecure=False):
    """A one-layer plan for `registry` spoken to at `endpoint` (nothing behind it need exist)."""
    blob = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    image = new_image_record(
        reference=f"{registry}/test/app:1", registry=registry, endpoint=endpoint,
        repository="test/app", tag="1", digest="sha256:" + "1" * 64,
        mediaType="application/vnd.oci.image.manifest.v1+json", size=100, manifestPath=None,
        index=None, platform=None, config=None, workdir=workdir, layerCount=1,
        insecure=insecure, caFile=None)
    layer = new_layer_record(0, {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                 "digest": digest, "size": len(blob)}, diffID=None)
    return records_text([image, layer])


def clean_env(**extra):
    env = {"TOSI_USERNAME": "", "TOSI_PASSWORD": "", "http_proxy": "", "HTTP_PROXY": "",
           "https_proxy": "", "HTTPS_PROXY": "", "all_proxy": "", "ALL_PROXY": "",
           "no_proxy": "", "NO_PROXY": ""}
    env.update(extra)
    return env


def one_line(proc, status):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tosi-fetch: error: "), proc.stderr
    return lines[0]


# ---------------------------------------------------------------- a plan's foreign endpoint

def test_docker_config_credentials_are_not_sent_to_an_endpoint_the_plan_names_for_another_host(
        tool, workdir, tmp_path):
    with Recorder(basic_challenge) as server:
        proc = tool("tosi-fetch", "--workdir", workdir, input=hand_plan(workdir, FOREIGN, server.url),
                    env=clean_env(DOCKER_CONFIG=docker_config(tmp_path, FOREIGN)))
    assert server.requests, "tosi-fetch never asked the endpoint"
    assert server.authorizations() == []
    line = one_line(proc, 1)
    assert "authentication required" in line
    assert f"the credentials for {FOREIGN} were not sent" in line
    assert f"the plan's endpoint {server.url} is not that registry's (https://{FOREIGN})" in line
    assert PASSWORD not in proc.stderr


def test_environment_credentials_are_not_sent_to_an_endpoint_the_plan_names_for_another_host(
        tool, workdir):
    with Recorder(basic_challenge) as server:
        proc = tool("tosi-fetch", "--workdir", workdir, input=hand_plan(workdir, FOREIGN, server.url),
                    env=clean_env(TOSI_USERNAME=USER, TOSI_PASSWORD=PASSWORD, DOCKER_CONFIG=workdir))
    assert server.requests and server.authorizations() == []
    assert "not that registry's" in one_line(proc, 1)


def test_verbose_fetch_says_why_the_credentials_stay_home(tool, workdir, tmp_path):
    with Recorder(basic_challenge) as server:
        proc = tool("tosi-fetch", "-v", "--workdir", workdir,
                    input=hand_plan(workdir, FOREIGN, server.url),
                    env=clean_env(DOCKER_CONFIG=docker_config(tmp_path, FOREIGN)))
    assert proc.returncode == 1
    assert any(line.startswith("tosi-fetch: the credentials for registry.example.com were not sent")
               for line in proc.stderr.splitlines()), proc.stderr


def test_docker_config_credentials_still_reach_their_own_registry(tool, htpasswd_registry,
                                                                  htpasswd_pusher, repo_name,
                                                                  workdir, tmp_path):
    image = htpasswd_pusher.push_image(repo_name, "v1", [random_layer(5000)])
    user, password = next(iter(htpasswd_registry.users.items()))
    config = docker_config(tmp_path, htpasswd_registry.host, user, password)
    tool("tosi-fetch", "--workdir", workdir, input=plan_text(htpasswd_registry.url, image, workdir),
         env=clean_env(DOCKER_CONFIG=config), check=0)
    assert_cached(workdir, image.layers)


# ---------------------------------------------------------------- Basic over plain http

def test_basic_credentials_go_over_plain_http_only_to_loopback_or_with_insecure():
    assert basic_refusal("http://registry.example.com/v2/") is not None
    assert "plain http" in basic_refusal("http://registry.example.com:5000/v2/")
    assert basic_refusal("http://registry.example.com/v2/", allow_insecure=True) is None
    assert basic_refusal("https://registry.example.com/v2/") is None
    assert "not verified" in basic_refusal("https://registry.example.com/v2/", tls_verified=False)
    for loopback in ("http://127.0.0.1:5000/v2/", "http://localhost:5000/", "http://[::1]:5000/",
                     "http://127.8.9.10/"):
        assert basic_refusal(loopback) is None, loopback


def test_an_endpoint_serves_a_registry_by_host_and_port():
    assert serves("https://registry.example.com", "registry.example.com")
    assert serves("https://registry.example.com:443", "registry.example.com")
    assert serves("http://127.0.0.1:5000", "127.0.0.1:5000")
    assert serves("https://registry-1.docker.io", "docker.io")
    assert not serves("http://127.0.0.1:5000", "registry.example.com")
    assert not serves("https://registry.example.com:5000", "registry.example.com")
    assert not serves("https://127.0.0.1:5001", "127.0.0.1:5000")
    assert not serves("https://localhost:5000", "127.0.0.1:5000")
    assert not serves("https://docker.io", "docker.io")


def test_a_client_holds_no_credentials_for_another_registry():
    bound = Credentials(USER, PASSWORD, FOREIGN)
    client = RegistryClient("http://127.0.0.1:1", credentials=bound)
    try:
        assert client.credentials is None and "not that registry's" in client.withheld
    finally:
        client.close()
    client = RegistryClient(f"https://{FOREIGN}", credentials=bound)
    try:
        assert client.credentials is bound and client.withheld is None
    finally:
        client.close()


def proxied(server):
    """Environment routing plain-http requests through `server` (a loopback recorder),
    so that the client speaks to a host that is not loopback without any DNS."""
    return {"http_proxy": server.url, "HTTP_PROXY": server.url}


def test_basic_credentials_are_not_sent_over_plain_http_to_a_host_off_loopback(tool, workdir, tmp_path):
    with Recorder(basic_challenge) as proxy:
        # The plan's "insecure": true lets the transport be plain http, not the credentials.
        proc = tool("tosi-fetch", "--workdir", workdir,
                    input=hand_plan(workdir, FOREIGN, f"http://{FOREIGN}", insecure=True),
                    env=clean_env(DOCKER_CONFIG=docker_config(tmp_path, FOREIGN), **proxied(proxy)))
    assert [host for _, host, _, _ in proxy.requests][:1] == [FOREIGN]
    assert proxy.authorizations() == []
    line = one_line(proc, 1)
    assert f"credentials are not sent over plain http to {FOREIGN}" in line and "--insecure" in line


def test_fetch_insecure_lets_basic_credentials_go_over_plain_http(tool, workdir, tmp_path):
    with Recorder(basic_challenge) as proxy:
        proc = tool("tosi-fetch", "--insecure", "--workdir", workdir,
                    input=hand_plan(workdir, FOREIGN, f"http://{FOREIGN}", insecure=True),
                    env=clean_env(DOCKER_CONFIG=docker_config(tmp_path, FOREIGN), **proxied(proxy)))
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert expected in proxy.authorizations()
    assert proc.returncode == 1  # the stub refuses them all the same


def test_credentials_are_not_sent_to_a_plain_http_token_server_off_loopback(tool, workdir, tmp_path):
    def route(path, host, auth):
        if host == FOREIGN:
            return 401, {"WWW-Authenticate": 'Bearer realm="http://auth.example.com/token",service="r"'}, b""
        return 200, {"Content-Type": "application/json"}, b'{"token": "t"}'

    with Recorder(route) as proxy:
        proc = tool("tosi-fetch", "--workdir", workdir,
                    input=hand_plan(workdir, FOREIGN, f"http://{FOREIGN}", insecure=True),
                    env=clean_env(DOCKER_CONFIG=docker_config(tmp_path, FOREIGN), **proxied(proxy)))
    assert proxy.authorizations() == []
    assert not any(host == "auth.example.com" for _, host, _, _ in proxy.requests)
    line = one_line(proc, 1)
    assert "token server http://auth.example.com/token: credentials are not sent over plain http" in line


# ---------------------------------------------------------------- redirects

def test_a_token_server_redirect_to_another_host_gets_no_credentials(tool, workdir):
    """Loopback both, told apart by name: 127.0.0.1 and localhost are different hosts."""
    holder = {}

    def route(path, host, auth):
        port = holder["port"]
        if path.startswith("/v2/"):
            if auth == "Bearer t0k3n":
                return 404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}'
            return 401, {"WWW-Authenticate":
                         f'Bearer realm="http://127.0.0.1:{port}/token",service="r"'}, b""
        if path.startswith("/token"):
            return 307, {"Location": f"http://localhost:{port}/moved-token?service=r"}, b""
        return 200, {"Content-Type": "application/json"}, b'{"token": "t0k3n"}'

    with Recorder(route) as server:
        holder["port"] = server.port
        proc = tool("tosi-fetch", "--workdir", workdir, "--retries", "0",
                    input=hand_plan(workdir, f"127.0.0.1:{server.port}", server.url),
                    env=clean_env(TOSI_USERNAME=USER, TOSI_PASSWORD=PASSWORD, DOCKER_CONFIG=workdir))
    seen = {path.split("?")[0]: auth for _, _, path, auth in server.requests}
    assert seen["/token"] is not None and seen["/token"].startswith("Basic ")
    assert "/moved-token" in seen and seen["/moved-token"] is None
    assert any(auth == "Bearer t0k3n" for *_, auth in server.requests)
    assert proc.returncode == 1, proc.stderr
