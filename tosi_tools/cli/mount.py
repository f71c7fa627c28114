"""tosi-mount (not yet implemented)."""

from .common import not_yet_implemented, run

PROG = "tosi-mount"


def main(argv=None):
    return run(PROG, not_yet_implemented(PROG), argv)
