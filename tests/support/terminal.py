"""Run a command with a pseudo-terminal on some of its standard streams, and read
what a terminal would show.

`run_on_pty(argv, stdin=..., stdout=..., stderr=...)`: each stream is PTY (the
terminal), bytes (a pipe fed with them, for stdin) or PIPE; the process is
stopped (killed and waited for) whatever happens. `Screen` replays what was
written to the terminal (carriage returns, line feeds, cursor moves up and down,
line erasing) into the lines a person would see at the end.
"""

import contextlib
import fcntl
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

from tests.conftest import BIN

PTY = "pty"
PIPE = "pipe"
COLUMNS = 120
ROWS = 40


class PtyRun(NamedTuple):
    returncode: int
    terminal: str  # everything written to the terminal, as written
    stdout: str  # what went to the stdout pipe (when stdout is PIPE)
    stderr: str  # what went to the stderr pipe (when stderr is PIPE)


def tool_argv(cmd: str, *args: object) -> list[str]:
    return [sys.executable, os.path.join(BIN, cmd), *map(str, args)]


def _open_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    return master, slave


def run_on_pty(argv: Sequence[str], stdin: object = PTY, stdout: object = PIPE,
               stderr: object = PTY, env: dict[str, str] | None = None, timeout: float = 120,
               when: Callable[[str, subprocess.Popen], None] | None = None) -> PtyRun:
    """Run `argv` with the streams given (PTY, PIPE, or bytes for stdin) until it exits;
    `when(terminal_so_far, process)` is called as terminal output arrives (to send a
    signal, say). A process still running after `timeout` seconds is killed and the
    test fails."""
    full_env = dict(os.environ)
    full_env.pop("TOSI_DEBUG", None)
    full_env.update(env or {})
    full_env.setdefault("TERM", "xterm")
    master, slave = _open_pty()
    stdin_data = stdin if isinstance(stdin, bytes) else None
    streams = {
        "stdin": slave if stdin == PTY else subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
        "stdout": slave if stdout == PTY else subprocess.PIPE,
        "stderr": slave if stderr == PTY else subprocess.PIPE,
    }
    proc = subprocess.Popen(argv, env=full_env, start_new_session=True, **streams)
    os.close(slave)
    terminal = bytearray()
    outputs = {"stdout": bytearray(), "stderr": bytearray()}
    readers = {master: terminal}
    for name in ("stdout", "stderr"):
        pipe = getattr(proc, name)
        if pipe is not None:
            readers[pipe.fileno()] = outputs[name]
    try:
        if stdin_data is not None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin_data)
            proc.stdin.close()
        deadline = time.monotonic() + timeout
        while readers:
            left = deadline - time.monotonic()
            assert left > 0, (f"{argv[1:]} still running after {timeout} s; terminal:\n"
                              f"{terminal.decode(errors='replace')}")
            ready, _, _ = select.select(list(readers), [], [], min(left, 0.5))
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the terminal's last writer closed it
                    data = b""
                if not data:
                    del readers[fd]
                    continue
                readers[fd] += data
                if fd == master and when is not None:
                    when(terminal.decode(errors="replace"), proc)
        returncode = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    return PtyRun(returncode, terminal.decode(errors="replace"),
                  outputs["stdout"].decode(errors="replace"), outputs["stderr"].decode(errors="replace"))


_CONTROL = re.compile(r"\x1b\[(\d*)([A-Za-z])|\r|\n|\x1b[^\[]|[^\x1b\r\n]")


def screen_lines(written: str) -> list[str]:
    """The lines a terminal shows after `written` (trailing spaces and empty lines at the
    end dropped): \\r, \\n, ESC[nA/B (cursor up/down), ESC[K/2K (erase) are followed."""
    lines: list[list[str]] = [[]]
    row = col = 0
    for match in _CONTROL.finditer(written):
        text = match.group(0)
        if text == "\r":
            col = 0
        elif text == "\n":
            row += 1
            col = 0  # the terminal's onlcr makes a line feed a new line
        elif match.group(2):
            count = int(match.group(1) or 1)
            code = match.group(2)
            if code == "A":
                row = max(row - count, 0)
            elif code == "B":
                row += count
            elif code == "K":
                while len(lines) <= row:
                    lines.append([])
                lines[row] = lines[row][:col] if match.group(1) in ("", "0") else []
            continue
        elif text.startswith("\x1b"):
            continue
        else:
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = text
            else:
                line.append(text)
            col += 1
            continue
        while len(lines) <= row:
            lines.append([])
    shown = ["".join(line).rstrip() for line in lines]
    while shown and not shown[-1]:
        shown.pop()
    return shown
