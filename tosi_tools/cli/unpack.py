"""tosi-unpack (not yet implemented)."""

from .common import not_yet_implemented, run

PROG = "tosi-unpack"


def main(argv=None):
    return run(PROG, not_yet_implemented(PROG), argv)
