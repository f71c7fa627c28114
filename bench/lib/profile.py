"""Where tosi's time goes: one more run of a tosi command under py-spy, summarised.

py-spy samples every thread (and subprocess) of the running program without
changing it, so decompression or download threads show up too, which cProfile
(main thread only) would miss. The raw samples are kept beside the results.
"""

import collections
import os
import shutil

from . import ROOT


def py_spy():
    local = os.path.join(ROOT, ".venv", "bin", "py-spy")
    return local if os.path.exists(local) else shutil.which("py-spy")


def wrapper(raw_path):
    """argv -> argv run under `py-spy record`, samples written to raw_path (collapsed stacks)."""
    spy = py_spy()

    # TOSI_BENCH_PROFILE_IDLE=1: waiting threads are sampled too, each stack under its thread
    # (where a pull waits, not only where it computes).
    idle = ["--idle", "--threads"] if os.environ.get("TOSI_BENCH_PROFILE_IDLE") == "1" else []

    def wrap(argv):
        return [spy, "record", "--format", "raw", "--nolineno", "--subprocesses", "--rate", "250", *idle,
                "-o", raw_path, "--", *argv]
    return wrap


def _frames(stack):
    # py-spy prefixes the stacks of --subprocesses runs with process and thread pseudo-frames.
    return [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]


def summarize(raw_path, top=12):
    """Busiest functions of a raw py-spy file: self time (the leaf) and inclusive time."""
    own = collections.Counter()
    inclusive = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = _frames(stack)
            if not frames:
                continue
            n = int(count)
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n

    def share(counter):
        return [{"function": fn, "percent": round(100 * n / total, 1)} for fn, n in counter.most_common(top)]
    return {"samples": total, "self": share(own) if total else [], "inclusive": share(inclusive) if total else []}
