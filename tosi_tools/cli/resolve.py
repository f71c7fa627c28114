"""tosi-resolve (not yet implemented)."""

from .common import not_yet_implemented, run

PROG = "tosi-resolve"


def main(argv=None):
    return run(PROG, not_yet_implemented(PROG), argv)
