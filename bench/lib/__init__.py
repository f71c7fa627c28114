"""Shared helpers of the benchmark scripts (bench/run, bench/unpack, bench/fetch).

The scripts are run from a source checkout; they import this package and the
test-support modules (a real docker-registry, the image pusher) from there.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench")
CACHE = os.path.join(BENCH, ".cache")     # debootstrap trees and generated layer blobs
RESULTS = os.path.join(BENCH, "results")  # JSON results, one file per run
BIN = os.path.join(ROOT, "bin")


def use_checkout_venv():
    """Re-run the calling script under the checkout's .venv Python (it has requests, zstandard)."""
    import sys
    venv_python = os.path.join(ROOT, ".venv", "bin", "python")
    if os.path.exists(venv_python) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        os.execv(venv_python, [venv_python, *sys.argv])
