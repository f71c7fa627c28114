"""What a person at a terminal sees (issue 15, points 1 and 2), run under a
pseudo-terminal: `tosi`'s bars tell what really happens (a download bar for
bytes that come over the wire, then extraction by layer; a warm run shows no
download bar), bars are gone before an error line, a stage with a terminal on
stdin says what it reads and exits 2, and pipes get the plan unchanged."""

import os
import re
import signal
import subprocess

import pytest

from tests.conftest import run_tool
from tests.support.faultproxy import Rule
from tests.support.images import file_entry, make_layer
from tests.support.terminal import PIPE, PTY, run_on_pty, screen_lines, tool_argv

STAGES = ["tosi-fetch", "tosi-verify", "tosi-unpack", "tosi-mount"]


def small_layers(count=3, files=40, size=4096):
    return [make_layer([file_entry(f"d{i}/f{j}", os.urandom(size)) for j in range(files)])
            for i in range(count)]


@pytest.fixture
def pushed(pusher, registry, repo_name):
    """An image of 3 layers of 40 files each on the registry: its reference."""
    pusher.push_image(repo_name, "1", small_layers())
    return f"{registry.host}/{repo_name}:1"


def tosi_on_terminal(workdir, ref, *flags, **options):
    return run_on_pty(tool_argv("tosi", "-workdir", workdir, "-image", ref, *flags), stdin=b"",
                      stdout=PIPE, stderr=PTY, **options)


# ---------------------------------------------------------------- progress


def test_tosi_cold_shows_a_download_bar_then_extraction_by_layer(workdir, pushed, tmp_path):
    run = tosi_on_terminal(workdir, pushed, "-extractto", tmp_path / "rootfs")
    assert run.returncode == 0, run.terminal
    assert 0 <= run.terminal.index("download:") < run.terminal.index("extract:")
    download, extract = screen_lines(run.terminal)
    assert re.match(r"download: 100%\|.*\| [\d.]+[kM]?/[\d.]+[kM]? \[", download)
    assert re.match(r"extract: 100%\|.*\| 3/3 layers \[[\d:]+, 120 entries, [\d.]+[kM]B\]$", extract)


def test_tosi_warm_run_shows_extraction_only(workdir, pushed, tmp_path):
    tosi_on_terminal(workdir, pushed, "-extractto", tmp_path / "cold")
    run = tosi_on_terminal(workdir, pushed, "-extractto", tmp_path / "warm")
    assert run.returncode == 0, run.terminal
    assert "download" not in run.terminal and "B/s" not in run.terminal
    assert [line.split("|")[0] for line in screen_lines(run.terminal)] == ["extract: 100%"]


def test_tosi_counts_a_layer_already_extracted_as_such(workdir, pushed):
    tosi_on_terminal(workdir, pushed)  # into the overlay cache
    run = tosi_on_terminal(workdir, pushed, "-validate-cache")  # re-hashes, extracts nothing again
    assert run.returncode == 0, run.terminal
    [line] = screen_lines(run.terminal)
    assert re.fullmatch(r"extract: 100%\|.*\| 3/3 layers \[[\d:]+, 0 entries, 0.00B, 3 already extracted\]",
                        line)


def test_tosi_without_progress_writes_nothing_to_the_terminal(workdir, pushed, tmp_path):
    run = tosi_on_terminal(workdir, pushed, "-extractto", tmp_path / "rootfs", "-progress=false")
    assert (run.returncode, run.terminal) == (0, "")


def test_fetch_on_a_terminal_counts_only_what_it_downloads(workdir, registry, pusher, repo_name, tool):
    layers = small_layers(count=2)
    pusher.push_image(repo_name, "1", layers)
    plan = tool("tosi-resolve", "--workdir", workdir, f"{registry.host}/{repo_name}:1", check=0).stdout
    first = run_on_pty(tool_argv("tosi-fetch"), stdin=plan.encode(), stdout=PIPE, stderr=PTY)
    assert first.returncode == 0, first.terminal
    assert [line.split("|")[0] for line in screen_lines(first.terminal)] == ["total: 100%"]
    again = run_on_pty(tool_argv("tosi-fetch"), stdin=plan.encode(), stdout=PIPE, stderr=PTY)
    assert (again.returncode, again.terminal) == (0, "")
    assert again.stdout == first.stdout


def test_interrupted_tosi_clears_its_bars_before_the_error_line(workdir, fault_proxy, pusher, repo_name,
                                                                tmp_path):
    pusher.push_image(repo_name, "1", small_layers(count=1, files=1, size=4 << 20))
    fault_proxy.add(Rule("throttle", path="/blobs/sha256:", rate=256 << 10))
    host = fault_proxy.url.split("://", 1)[1]
    interrupted = []

    def interrupt_once_downloading(terminal, proc):
        if not interrupted and re.search(r"download: +\d+%", terminal):
            interrupted.append(True)
            os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the terminal's foreground group

    run = tosi_on_terminal(workdir, f"{host}/{repo_name}:1", "-extractto", tmp_path / "rootfs",
                           when=interrupt_once_downloading, timeout=60)
    assert interrupted and run.returncode == 130
    shown = screen_lines(run.terminal)
    assert shown[-1] == "tosi: error: interrupted"
    assert not [line for line in shown if "%|" in line]


def test_a_failing_tosi_clears_its_bars_before_the_error_line(workdir, fault_proxy, pusher, repo_name,
                                                               tmp_path):
    [layer] = small_layers(count=1, files=1, size=1 << 20)
    pusher.push_image(repo_name, "1", [layer])
    # The download bar is drawn at the blob's request; a 404 is final (not retried).
    fault_proxy.add(Rule("delay", path=f"/blobs/{layer.digest}", seconds=0.5))
    fault_proxy.add(Rule("status", path=f"/blobs/{layer.digest}", status=404))
    host = fault_proxy.url.split("://", 1)[1]
    run = tosi_on_terminal(workdir, f"{host}/{repo_name}:1", "-extractto", tmp_path / "rootfs")
    assert run.returncode == 1
    assert "download:" in run.terminal
    [line] = screen_lines(run.terminal)
    assert line.startswith("tosi: error: ")


def test_interrupted_fetch_clears_its_bars_before_the_error_line(workdir, fault_proxy, pusher, repo_name, tool):
    pusher.push_image(repo_name, "1", small_layers(count=1, files=1, size=4 << 20))
    fault_proxy.add(Rule("throttle", path="/blobs/sha256:", rate=256 << 10))
    host = fault_proxy.url.split("://", 1)[1]
    plan = tool("tosi-resolve", "--workdir", workdir, f"{host}/{repo_name}:1", check=0).stdout
    interrupted = []

    def interrupt_once_downloading(terminal, proc):
        if not interrupted and re.search(r"total: +\d+%", terminal):
            interrupted.append(True)
            os.killpg(proc.pid, signal.SIGINT)

    run = run_on_pty(tool_argv("tosi-fetch"), stdin=plan.encode(), stdout=PIPE, stderr=PTY,
                     when=interrupt_once_downloading, timeout=60)
    assert interrupted and run.returncode == 130
    assert screen_lines(run.terminal) == ["tosi-fetch: error: interrupted"]


def test_logs_go_above_the_bars(workdir, pushed, tmp_path):
    run = tosi_on_terminal(workdir, pushed, "-extractto", tmp_path / "rootfs", "-v", "1")
    assert run.returncode == 0, run.terminal
    shown = screen_lines(run.terminal)
    assert [line.split(":")[0] for line in shown[-2:]] == ["download", "extract"]
    assert all(line.startswith("tosi: ") and "%|" not in line for line in shown[:-2])
    assert len([line for line in shown if " applied " in line]) == 3


# ---------------------------------------------------------------- stages and their stdin


@pytest.mark.parametrize("cmd", STAGES)
def test_stage_with_a_terminal_on_stdin_says_what_it_reads_and_exits_2(cmd, tmp_path):
    args = [tmp_path / "mnt"] if cmd == "tosi-mount" else []
    run = run_on_pty(tool_argv(cmd, *args), stdin=PTY, stdout=PTY, stderr=PTY, timeout=30)
    assert run.returncode == 2
    [line] = screen_lines(run.terminal)
    assert line.startswith(f"{cmd}: error: stdin is a terminal: {cmd} reads ")
    example = line.split(", e.g. ", 1)[1]
    assert example.startswith("tosi-resolve alpine | tosi-fetch") and f"| {cmd}" in example


def test_unmount_reads_no_plan_so_a_terminal_on_stdin_is_fine(tmp_path):
    run = run_on_pty(tool_argv("tosi-mount", "--unmount", tmp_path / "nothing"), stdin=PTY, stdout=PTY,
                     stderr=PTY, timeout=30)
    assert "stdin is a terminal" not in run.terminal


def test_help_works_with_a_terminal_on_stdin():
    run = run_on_pty(tool_argv("tosi-fetch", "--help"), stdin=PTY, stdout=PTY, stderr=PTY, timeout=30)
    assert run.returncode == 0 and "usage: tosi-fetch" in run.terminal


# ---------------------------------------------------------------- stages and their stdout


@pytest.fixture
def plans(workdir, pushed, tool):
    """The plans of the pushed image after each stage, made through pipes."""
    resolved = tool("tosi-resolve", "--workdir", workdir, pushed, check=0).stdout
    fetched = tool("tosi-fetch", input=resolved, check=0).stdout
    return {"tosi-fetch": resolved, "tosi-verify": fetched, "tosi-unpack": fetched,
            "tosi-mount": tool("tosi-unpack", input=fetched, check=0).stdout}


@pytest.mark.parametrize("cmd", ["tosi-fetch", "tosi-verify", "tosi-unpack"])
def test_piped_plan_is_the_same_with_a_terminal_on_stderr(cmd, plans):
    without_tty = run_tool(cmd, input=plans[cmd], check=0)
    with_tty = run_on_pty(tool_argv(cmd), stdin=plans[cmd].encode(), stdout=PIPE, stderr=PTY)
    assert with_tty.returncode == 0, with_tty.terminal
    assert with_tty.stdout == without_tty.stdout
    assert without_tty.stdout.count("\n") == 4


def test_piped_plan_of_unpack_into_is_the_same_with_a_terminal_on_stderr(plans, tmp_path):
    target = tmp_path / "rootfs"
    without_tty = run_tool("tosi-unpack", "--into", target, input=plans["tosi-unpack"], check=0)
    subprocess.run(["rm", "-rf", str(target)], check=True)
    with_tty = run_on_pty(tool_argv("tosi-unpack", "--into", target), stdin=plans["tosi-unpack"].encode(),
                          stdout=PIPE, stderr=PTY)
    assert with_tty.returncode == 0, with_tty.terminal
    assert with_tty.stdout == without_tty.stdout


def test_piped_plan_of_mount_is_the_same_with_a_terminal_on_stderr(plans, tmp_path, mounts):
    target = tmp_path / "mnt"
    mounts.append(target)
    without_tty = run_tool("tosi-mount", target, input=plans["tosi-mount"], check=0)
    run_tool("tosi-mount", "--unmount", "--clean", target, check=0)
    with_tty = run_on_pty(tool_argv("tosi-mount", target), stdin=plans["tosi-mount"].encode(),
                          stdout=PIPE, stderr=PTY)
    assert with_tty.returncode == 0, with_tty.terminal
    assert with_tty.stdout == without_tty.stdout


@pytest.mark.parametrize("cmd,args,said", [
    ("tosi-fetch", [], r"fetched \S+:1 \(sha256:[0-9a-f]{12}\): 3 layers, [\d.]+ KiB, in \S+; "
     r"the plan goes to stdout when it is a pipe \(\| tosi-unpack\)"),
    ("tosi-verify", [], r"verified \S+:1 \(sha256:[0-9a-f]{12}\): the config and 3 layers, in \S+; "
     r"the plan goes to stdout when it is a pipe \(\| tosi-unpack\)"),
    ("tosi-unpack", [], r"unpacked \S+:1 \(sha256:[0-9a-f]{12}\): 3 layers extracted in \S+/overlays; "
     r"the plan goes to stdout when it is a pipe \(\| tosi-mount DIR\)"),
    ("tosi-unpack", ["--into", "ROOTFS"], r"unpacked \S+:1 \(sha256:[0-9a-f]{12}\): 3 layers applied into "
     r"\S+/rootfs"),
])
def test_stage_with_a_terminal_on_stdout_writes_one_line_saying_what_it_did(cmd, args, said, plans, tmp_path):
    args = [str(tmp_path / "rootfs") if arg == "ROOTFS" else arg for arg in args]
    run = run_on_pty(tool_argv(cmd, *args), stdin=plans[cmd].encode(), stdout=PTY, stderr=PTY)
    assert run.returncode == 0, run.terminal
    assert len(screen_lines(run.terminal)) == 1
    assert re.fullmatch(said, screen_lines(run.terminal)[0])


def test_mount_with_a_terminal_on_stdout_says_where_and_how_to_undo(plans, tmp_path, mounts):
    target = tmp_path / "mnt"
    mounts.append(target)
    run = run_on_pty(tool_argv("tosi-mount", target), stdin=plans["tosi-mount"].encode(), stdout=PTY,
                     stderr=PTY)
    assert run.returncode == 0, run.terminal
    [line] = screen_lines(run.terminal)
    assert re.fullmatch(rf"mounted \S+:1 \(sha256:[0-9a-f]{{12}}\) at {target}: overlayfs of 3 layers, "
                        rf"writes go to {target}.upper \(undo: tosi-mount --unmount {target}\)", line)
