"""tosi (not yet implemented)."""

from .common import not_yet_implemented, run

PROG = "tosi"


def main(argv=None):
    return run(PROG, not_yet_implemented(PROG), argv)
