"""tosi-fetch (not yet implemented)."""

from .common import not_yet_implemented, run

PROG = "tosi-fetch"


def main(argv=None):
    return run(PROG, not_yet_implemented(PROG), argv)
