"""Shared fixtures: a real docker-registry, an image pusher, and a way to run the commands."""

import collections
import itertools
import json
import os
import subprocess
import sys

import pytest

from tests.support import robustness as robustness_support
from tests.support.images import Pusher
from tests.support.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the long variants")
    parser.addoption("--robustness-report", metavar="FILE",
                     help="write the robustness suite's counters and outcomes per area as JSON")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long variant, runs only with --slow")
    config.addinivalue_line("markers", "robustness(area): the robustness suite (properties, fuzz, "
                            "chaos, stress; `pytest -m robustness`, or scripts/robustness)")
    robustness_support.SLOW = bool(config.getoption("--slow"))
    config._tosi_robustness = robustness_support.Counters()
    config._tosi_robustness_outcomes = collections.defaultdict(collections.Counter)


def _robustness_area(item):
    marker = item.get_closest_marker("robustness")
    if marker is None:
        return None
    return marker.args[0] if marker.args else "other"


@pytest.fixture
def robustness(request):
    """Counters of the robustness suite, bound to the test's area (tests/support/robustness.py)."""
    area = _robustness_area(request.node)
    assert area is not None, "the robustness fixture is for tests marked robustness(area)"
    return robustness_support.AreaCounters(request.config._tosi_robustness, area)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    area = _robustness_area(item)
    if area is None:
        return
    outcomes = item.config._tosi_robustness_outcomes[area]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            outcomes["xfailed" if report.skipped else "failed"] += 1  # strict XPASS fails
        elif report.skipped:
            outcomes["skipped"] += 1
        else:
            outcomes[report.outcome] += 1
    elif report.when == "teardown" and report.failed:
        outcomes["failed"] += 1


def pytest_terminal_summary(terminalreporter, config):
    counters = config._tosi_robustness
    outcomes = config._tosi_robustness_outcomes
    areas = {area: dict(c) for area, c in counters.areas.items()}
    path = config.getoption("--robustness-report")
    if path:
        with open(path, "w") as f:
            json.dump({"areas": areas, "outcomes": {a: dict(o) for a, o in outcomes.items()}}, f,
                      indent=1, sort_keys=True)
    if outcomes:
        terminalreporter.section("robustness summary")
        for line in robustness_support.summary_lines(areas, outcomes):
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    # Deselected rather than skipped: a default run reports only what it really ran.
    keep = [item for item in items if "slow" not in item.keywords]
    dropped = [item for item in items if "slow" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A plain-HTTP registry on 127.0.0.1, shared by the session."""
    reg = Registry(str(tmp_path_factory.mktemp("registry"))).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def pusher(registry):
    return Pusher(registry.url)


_counter = itertools.count()


@pytest.fixture
def repo_name(request):
    """A repository name unique to the test, so tests never see each other's images."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower()).strip("-")
    return f"test/{base[:60]}-{next(_counter)}".replace("--", "-")


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "workdir"
    return str(path)


def run_tool(cmd, *args, input=None, env=None, timeout=120, check=None):
    """Run bin/<cmd> with this Python; returns CompletedProcess with text output."""
    full_env = dict(os.environ)
    full_env.pop("TOSI_DEBUG", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, os.path.join(BIN, cmd), *map(str, args)],
        input=input, capture_output=True, text=True, env=full_env, timeout=timeout,
    )
    if check is not None:
        assert proc.returncode == check, (
            f"{cmd} exited {proc.returncode}, wanted {check}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def _disk(tmp_path_factory):
    """A fresh ext4 (a sparse 2 GiB loop image) for the session: the temporary directory
    may be a tmpfs (Debian's /tmp is), where tosi works otherwise than on a disk."""
    base = tmp_path_factory.mktemp("disk")
    image, point = base / "ext4.img", base / "mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(2 << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True, capture_output=True)
    yield point
    if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
    os.unlink(image)


@pytest.fixture
def disk_path(_disk, request):
    """A new empty directory on a disk filesystem (ext4), for the test alone."""
    import tempfile

    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=_disk))


@pytest.fixture
def tool():
    return run_tool


# ---------------------------------------------------------------- auth and TLS variants

AUTH_USERS = {"alice": "wonderland-4-tests"}


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory):
    """A registry with htpasswd (HTTP Basic) auth over plain HTTP; `.users` are its accounts."""
    import bcrypt

    directory = tmp_path_factory.mktemp("htpasswd-registry")
    htpasswd = directory / "htpasswd"
    htpasswd.write_text("".join(
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, password in AUTH_USERS.items()))
    reg = Registry(str(directory), extra_config={
        "auth": {"htpasswd": {"realm": "tosi-tests", "path": str(htpasswd)}}}).start()
    reg.users = dict(AUTH_USERS)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def htpasswd_pusher(htpasswd_registry):
    import requests

    session = requests.Session()
    session.auth = next(iter(AUTH_USERS.items()))
    return Pusher(htpasswd_registry.url, session=session)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory):
    """A JWT token server on 127.0.0.1: anonymous pull of public/*, users pull and push all."""
    from tests.support.tokenserver import TokenServer

    server = TokenServer(str(tmp_path_factory.mktemp("token-server")), users=AUTH_USERS).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory, token_server):
    """A registry with `auth: token` trusting `token_server` (the Bearer challenge flow)."""
    reg = Registry(str(tmp_path_factory.mktemp("token-registry")),
                   extra_config={"auth": token_server.registry_config()}).start()
    reg.users = dict(AUTH_USERS)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_pusher(token_registry, token_server):
    return Pusher(token_registry.url, session=token_server.push_session())


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory):
    """A registry serving https on 127.0.0.1 with a certificate from a test CA (`.ca_file`)."""
    from tests.support.tls import CertificateAuthority

    directory = str(tmp_path_factory.mktemp("tls-registry"))
    ca = CertificateAuthority()
    ca_file, _ = ca.write(directory, "ca")
    cert_file, key_file = ca.issue("127.0.0.1", ips=["127.0.0.1"], dns_names=["localhost"]).write(
        directory, "server")
    reg = Registry(directory, scheme="https", ca_file=ca_file, extra_config={
        "http": {"tls": {"certificate": cert_file, "key": key_file}}}).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def tls_pusher(tls_registry):
    import requests

    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE would replace the test CA
    return Pusher(tls_registry.url, session=session, verify=tls_registry.ca_file)


@pytest.fixture
def mounts():
    """Mount points a test uses (append them); whatever is still mounted there at the
    end of the test is unmounted, so a failing test leaves no mount behind."""
    from tosi_tools import overlayfs

    points = []
    yield points
    for point in points:
        while overlayfs.mount_at(os.path.abspath(point)):
            overlayfs.unmount(os.path.abspath(point))


@pytest.fixture
def fault_proxy(registry):
    """A fault-injecting proxy (tests/support/faultproxy.py) in front of `registry`."""
    from tests.support.faultproxy import FaultProxy

    with FaultProxy(registry.url) as proxy:
        yield proxy
