"""SIGTERM: every command stops as on Ctrl-C (SIGINT), with the same clean-up and the
same lines on stderr, but "terminated" and exit status 143 (128 + 15) instead of
"interrupted" and 130. See tosi_tools.cli.common.Terminated."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN
from tests.test_messages import blocked_reading_stdin
from tests.support.faultproxy import Rule
from tests.support.images import file_entry, make_layer
from tosi_tools.cache import Workdir
from tosi_tools.cli import common

WAIT = 20  # seconds: generous bounds, so that a hang fails the test instead of the suite
QUICK = 5  # seconds from SIGTERM to the exit, at most


def wait_until(predicate, what, proc=None):
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert proc is None or proc.poll() is None, f"exited {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def start(cmd, *args, **options):
    return subprocess.Popen([sys.executable, os.path.join(BIN, cmd), *map(str, args)],
                            stderr=subprocess.PIPE, text=True, **options)


def terminate(proc, stdin=None):
    """SIGTERM `proc`; (stdout, stderr, seconds it took to exit). Killed if it does not."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(stdin, timeout=WAIT)
    return out, err, time.monotonic() - started


def stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def leftovers(workdir):
    """What an interrupted run must not leave in the workdir: held-lock files (there only
    while held), temporary files and half-made extraction dirs (.tmp-*)."""
    found = []
    for directory, dirs, files in os.walk(workdir):
        for name in dirs + files:
            if name.endswith(".lock") or name.startswith(".tmp-"):
                found.append(os.path.relpath(os.path.join(directory, name), workdir))
    return found


def layer_files(workdir):
    path = Workdir(workdir).layers
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def tree(root):
    """{relative path: bytes} of every regular file below `root`."""
    files = {}
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def proxied_reference(proxy, image):
    return f"{proxy.url.split('://', 1)[1]}/{image.repo}:{image.tag}"


def two_file_image(pusher, repo_name):
    """An image of one uncompressed layer whose first file is whole well before the
    blob's end (a stall after 250,000 bytes leaves the layer half extracted)."""
    files = {"first": os.urandom(200_000), "second": os.urandom(300_000)}
    layer = make_layer([file_entry(name, data) for name, data in files.items()], compression=None)
    return pusher.push_image(repo_name, "1", [layer]), layer, files


def assert_terminated_quickly(proc, stderr, took, prog):
    """`prog` stopped on SIGTERM as on SIGINT, but exit 143 and "terminated", within QUICK."""
    assert proc.returncode == 143, stderr
    assert took < QUICK
    assert stderr == f"{prog}: error: terminated\n"


# ---------------------------------------------------------------- the handler itself


def test_run_turns_sigterm_into_one_line_and_143_and_puts_the_handler_back(capsys):
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def body(argv):
        # Else the SIGTERM below would end pytest itself: fail (exit 1) instead.
        assert signal.getsignal(signal.SIGTERM) not in (before, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(WAIT)  # the handler raises before this ends
            return 0
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second one does not cut the clean-up short
            time.sleep(0.05)
            cleaned.append(True)

    assert common.run("tosi-x", body, []) == common.EXIT_TERMINATED == 143
    assert cleaned == [True]
    assert capsys.readouterr().err == "tosi-x: error: terminated\n"
    assert signal.getsignal(signal.SIGTERM) == before


def test_terminated_is_handled_where_keyboard_interrupt_is():
    # Library clean-up code that knows KeyboardInterrupt handles SIGTERM the same way.
    assert issubclass(common.Terminated, KeyboardInterrupt)
    assert common.EXIT_INTERRUPTED == 130


# ---------------------------------------------------------------- tosi

def test_tosi_extractto_terminated_mid_pull_says_what_the_target_holds_and_cleans_up(
        fault_proxy, pusher, repo_name, workdir, tmp_path, tool):
    image, layer, files = two_file_image(pusher, repo_name)
    fault_proxy.add(Rule("stall", path=layer.digest, after=250_000))  # until cleared or stopped
    target = tmp_path / "rootfs"
    proc = start("tosi", "-image", proxied_reference(fault_proxy, image), "-extractto", target,
                 "-workdir", workdir)
    try:
        wait_until(lambda: (target / "first").exists(), "the layer is being extracted", proc)
        _, stderr, took = terminate(proc)
    finally:
        stop(proc)
    assert proc.returncode == 143, stderr
    assert took < QUICK
    lines = stderr.splitlines()
    assert lines == [f"tosi: {target} is partially extracted (no layer applied completely); remove it",
                     "tosi: error: terminated"]
    assert len([line for line in lines if ": error: " in line]) == 1
    assert len([line for line in lines if "partially extracted" in line]) == 1
    assert tree(target).get("second") != files["second"]
    # No lock held on, no temporary left; no unverified blob under its name (its .partial
    # stays, as after Ctrl-C, for the next run to resume).
    assert leftovers(workdir) == []
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))
    assert set(layer_files(workdir)) <= {os.path.basename(Workdir(workdir).layer_path(layer.digest))
                                         + ".partial"}

    fault_proxy.clear()
    shutil.rmtree(target)  # as the message says
    tool("tosi", "-image", proxied_reference(fault_proxy, image), "-extractto", target,
         "-workdir", workdir, check=0, timeout=WAIT * 3)
    assert tree(target) == files
    assert leftovers(workdir) == []
    assert layer_files(workdir) == [os.path.basename(Workdir(workdir).layer_path(layer.digest))]


def test_tosi_terminated_while_a_layer_is_half_extracted_into_the_overlay_cache_cleans_up(
        fault_proxy, pusher, repo_name, workdir, tool):
    image, layer, files = two_file_image(pusher, repo_name)
    fault_proxy.add(Rule("stall", path=layer.digest, after=250_000))
    overlays = Workdir(workdir).overlays

    def half_extracted():
        names = os.listdir(overlays) if os.path.isdir(overlays) else ()
        return any(os.path.isfile(os.path.join(overlays, n, "first")) for n in names if n.startswith(".tmp-"))

    proc = start("tosi", "-image", proxied_reference(fault_proxy, image), "-workdir", workdir)
    try:
        wait_until(half_extracted, "the layer is being extracted", proc)
        _, stderr, took = terminate(proc)
    finally:
        stop(proc)
    assert_terminated_quickly(proc, stderr, took, "tosi")
    assert os.listdir(overlays) == []
    assert leftovers(workdir) == []

    fault_proxy.clear()
    tool("tosi", "-image", proxied_reference(fault_proxy, image), "-workdir", workdir,
         check=0, timeout=WAIT * 3)
    assert tree(Workdir(workdir).overlay_path(layer.digest)) == files
    assert leftovers(workdir) == []


def test_tosi_terminated_while_a_credential_helper_runs_stops_the_helper(
        htpasswd_registry, htpasswd_pusher, repo_name, workdir, tmp_path):
    htpasswd_pusher.push_image(repo_name, "1", [make_layer([file_entry("a", b"a\n")])])
    helpers = tmp_path / "helper-bin"
    helpers.mkdir()
    pid_file = tmp_path / "helper.pid"
    helper = helpers / "docker-credential-slow"
    helper.write_text(f"#!/bin/sh\necho $$ > '{pid_file}'\nexec sleep {WAIT * 10}\n")
    helper.chmod(0o755)
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "config.json").write_text(
        json.dumps({"credHelpers": {htpasswd_registry.host: "slow"}}))
    env = {**os.environ, "PATH": f"{helpers}{os.pathsep}{os.environ.get('PATH', '')}",
           "DOCKER_CONFIG": str(tmp_path / "docker"), "REGISTRY_AUTH_FILE": str(tmp_path / "none.json")}
    env.pop("TOSI_DEBUG", None)
    proc = start("tosi", "-image", f"{htpasswd_registry.host}/{repo_name}:1", "-workdir", workdir, env=env)
    helper_pid = None
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), "the helper runs", proc)
        helper_pid = int(pid_file.read_text())
        _, stderr, took = terminate(proc)
    finally:
        stop(proc)
        if helper_pid is not None and os.path.exists(f"/proc/{helper_pid}"):
            still_there = True
            os.kill(helper_pid, signal.SIGKILL)
        else:
            still_there = False
    assert_terminated_quickly(proc, stderr, took, "tosi")
    assert not still_there, "the credential helper outlived tosi"
    assert leftovers(workdir) == []


# ---------------------------------------------------------------- the stages alone

def test_tosi_fetch_terminated_mid_download_cleans_up_and_a_rerun_finishes(
        fault_proxy, pusher, repo_name, workdir, tool):
    image, layer, _files = two_file_image(pusher, repo_name)
    plan = tool("tosi-resolve", "--workdir", workdir, proxied_reference(fault_proxy, image), check=0).stdout
    fault_proxy.add(Rule("stall", path=layer.digest, after=250_000))
    partial = Workdir(workdir).layer_path(layer.digest) + ".partial"
    proc = start("tosi-fetch", "--workdir", workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(plan)
        proc.stdin.close()
        wait_until(lambda: os.path.exists(partial) and os.path.getsize(partial) > 0,
                   "the blob is downloading", proc)
        proc.stdin = None  # closed: communicate() must not flush it
        _, stderr, took = terminate(proc)
    finally:
        stop(proc)
    assert_terminated_quickly(proc, stderr, took, "tosi-fetch")
    assert leftovers(workdir) == []
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))

    fault_proxy.clear()
    tool("tosi-fetch", "--workdir", workdir, input=plan, check=0, timeout=WAIT * 3)
    with open(Workdir(workdir).layer_path(layer.digest), "rb") as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == layer.digest
    assert leftovers(workdir) == []
    assert not os.path.exists(partial)


def test_tosi_unpack_terminated_between_layers_keeps_the_extracted_one_and_cleans_up(
        registry, pusher, repo_name, workdir, tool):
    layers = [make_layer([file_entry("one", b"1\n")]), make_layer([file_entry("two", b"2\n")])]
    image = pusher.push_image(repo_name, "1", layers)
    plan = tool("tosi-fetch", "--workdir", workdir, check=0, input=tool(
        "tosi-resolve", "--workdir", workdir, f"{registry.host}/{image.repo}:1", check=0).stdout).stdout
    records = plan.splitlines(keepends=True)
    assert [json.loads(r)["type"] for r in records] == ["image", "layer", "layer"]
    proc = start("tosi-unpack", "--workdir", workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("".join(records[:2]))  # the second layer's record does not come yet
        proc.stdin.flush()
        # The first layer extracted (its extraction renamed into place), and the stage
        # blocked reading the plan (stdin stays open), as a stage in a pipe waits for
        # the stage before it.
        first = Workdir(workdir).overlay_path(layers[0].digest)
        wait_until(lambda: os.path.isdir(first) and blocked_reading_stdin(proc.pid),
                   "the first layer is extracted and the stage waits for the next record", proc)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
        stderr = proc.stderr.read() if proc.stderr else ""
        took = time.monotonic() - started
    finally:
        stop(proc)
    assert_terminated_quickly(proc, stderr, took, "tosi-unpack")
    assert tree(Workdir(workdir).overlay_path(layers[0].digest)) == {"one": b"1\n"}
    assert not os.path.exists(Workdir(workdir).overlay_path(layers[1].digest))
    assert leftovers(workdir) == []

    tool("tosi-unpack", "--workdir", workdir, input=plan, check=0)
    assert tree(Workdir(workdir).overlay_path(layers[1].digest)) == {"two": b"2\n"}
    assert leftovers(workdir) == []


@pytest.mark.parametrize("cmd", ["tosi-fetch", "tosi-verify", "tosi-unpack"])
def test_a_stage_terminated_while_it_waits_for_its_plan_exits_143(cmd, workdir):
    proc = start(cmd, "--workdir", workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        # Its handler is set once it runs: wait until it reads stdin.
        wait_until(lambda: blocked_reading_stdin(proc.pid), "it reads its plan", proc)
        _, stderr, _took = terminate(proc)
    finally:
        stop(proc)
    assert proc.returncode == 143
    assert stderr == f"{cmd}: error: terminated\n"
