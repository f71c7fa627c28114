"""Running one command with its wall time, CPU time and peak RSS.

Peak RSS comes from GNU time (`/usr/bin/time -f %M`), not from our own wait4:
Linux charges a child, at exec, with the high-water RSS of the process it was
forked from, so every command started from this (large) Python process would
report at least our own peak. Without GNU time, /proc/<pid>/status VmHWM is
sampled instead (it misses the command's children and its last few milliseconds).
The results file says which (`rssSource`).
"""

import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field


class CommandFailed(Exception):
    """A measured command exited non-zero (or hung); the message is its last stderr line."""


@dataclass
class Sample:
    seconds: float
    cpu_seconds: float
    max_rss_kib: int
    parts: dict = field(default_factory=dict)  # per-step seconds of a sequence

    def __add__(self, other):
        return Sample(self.seconds + other.seconds, self.cpu_seconds + other.cpu_seconds,
                      max(self.max_rss_kib, other.max_rss_kib), {**self.parts, **other.parts})


def gnu_time():
    # Looked up per call: a full run installs GNU time after this module is imported.
    return "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else shutil.which("gtime")


def rss_source():
    return "GNU time %M" if gnu_time() else "/proc/PID/status VmHWM sampled every 5 ms"


class _HighWaterSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.path = f"/proc/{pid}/status"
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self):
        while True:
            try:
                with open(self.path) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
            except (OSError, ValueError):
                return
            if self.done.wait(0.005):
                return


def _peak_from_gnu_time(path):
    with open(path) as f:
        lines = f.read().split()
    return int(lines[-1]) if lines and lines[-1].isdigit() else 0


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def timed(argv, stdin_path=None, stdout_path=None, env=None, cwd=None, timeout=3600, label=None):
    """Run argv to completion; the Sample covers that process and its children."""
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    stdout = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    time_program = gnu_time()
    with tempfile.TemporaryFile() as stderr, tempfile.NamedTemporaryFile("r") as rss_file:
        full_argv = [time_program, "-f", "%M", "-o", rss_file.name, *argv] if time_program else list(argv)
        try:
            start = time.perf_counter()
            # Its own process group, so that a kill reaches the command under GNU time too.
            proc = subprocess.Popen(full_argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env, cwd=cwd,
                                    start_new_session=True)
            sampler = None if time_program else _HighWaterSampler(proc.pid)
            if sampler:
                sampler.start()
            killer = threading.Timer(timeout, _kill_group, (proc,))
            killer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:  # interrupted: the command must not write on while we clean up
                _kill_group(proc)
                proc.wait()
                raise
            finally:
                killer.cancel()
                if sampler:
                    sampler.done.set()
            seconds = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            # A command too quick for one sample falls back to wait4's (inflated) figure.
            peak_kib = (_peak_from_gnu_time(rss_file.name) if time_program else sampler.peak_kib) or usage.ru_maxrss
        finally:
            for stream in (stdin, stdout):
                if hasattr(stream, "close"):
                    stream.close()
        if proc.returncode != 0:
            stderr.seek(0)
            lines = stderr.read().decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else "no message"
            raise CommandFailed(f"{os.path.basename(argv[0]) if label is None else label} "
                                f"exited {proc.returncode}: {why}"[:500])
    sample = Sample(seconds, usage.ru_utime + usage.ru_stime, peak_kib)
    if label:
        sample.parts[label] = seconds
    return sample


def sequence(steps):
    """Run (label, argv) steps one after the other; a Sample of the whole, parts per label."""
    total = None
    for label, argv in steps:
        sample = timed(argv, label=label)
        total = sample if total is None else total + sample
    return total


def summary(samples):
    """Median, spread and peak RSS of a row's samples."""
    times = [s.seconds for s in samples]
    return {
        "times": [round(t, 4) for t in times],
        "median": round(statistics.median(times), 4),
        "min": round(min(times), 4),
        "max": round(max(times), 4),
        "cpuMedian": round(statistics.median(s.cpu_seconds for s in samples), 4),
        "maxRssKiB": max(s.max_rss_kib for s in samples),
    }
