"""A real CNCF distribution registry (Debian's docker-registry) for the tests.

Each instance listens on 127.0.0.1 on a free port with its own storage directory
and is stopped (and waited for) by `stop()`. Auth and TLS variants are configured
through `extra_config` (a dict merged into the registry's YAML config).
"""

import json
import os
import shutil
import socket
import subprocess
import time

import requests

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml(value, indent=0):
    # The registry reads YAML; JSON is YAML, but nested JSON keeps the config readable in logs.
    return json.dumps(value, indent=2)


class Registry:
    def __init__(self, workdir, extra_config=None, scheme="http", ca_file=None, client_cert=None):
        self.workdir = workdir
        self.storage = os.path.join(workdir, "storage")
        self.extra_config = extra_config or {}
        self.scheme = scheme
        self.ca_file = ca_file  # CA bundle a client needs to trust this registry's TLS
        self.client_cert = client_cert  # (cert, key) it asks clients for (http.tls.clientcas), if any
        self.process = None
        self.port = None
        self.log_path = os.path.join(workdir, "registry.log")

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def url(self):
        return f"{self.scheme}://{self.host}"

    def _config(self):
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": self.storage},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "tosi-tests"},
        }
        for key, value in self.extra_config.items():
            if key == "http":
                config["http"].update(value)
            else:
                config[key] = value
        return config

    def start(self, timeout=20):
        os.makedirs(self.storage, exist_ok=True)
        for _attempt in range(5):
            self.port = free_port()
            path = os.path.join(self.workdir, "config.yml")
            with open(path, "w") as f:
                f.write(_yaml(self._config()))
            log = open(self.log_path, "ab")
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", path],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            log.close()
            if self._wait_ready(timeout):
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start; log: {self.log_path}\n{self.log()}")

    def _wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        verify = self.ca_file or False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                r = requests.get(f"{self.url}/v2/", timeout=2, verify=verify, cert=self.client_cert)
                if r.status_code in (200, 401):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
