"""tosi-unpack: extract the layers of a fetched plan, per layer for overlayfs or flat into a directory."""

import sys

from .common import add_workdir_flag, new_parser, plan_workdir, run, setup_logging

PROG = "tosi-unpack"

DESCRIPTION = """\
Read a plan (from tosi-fetch) on stdin and extract its layers; write the plan
to stdout with what was made.

Without --into, each layer is extracted alone into OVERLAYDIR/<hex>/ as an
overlayfs lowerdir (reused by later runs), with a short name in
OVERLAYDIR/<hex>.link and a symlink OVERLAYDIR/<short> -> <hex>; layer records
gain "overlay" and "link".

With --into DIR, all layers are applied bottom first into DIR, which must be
absent or empty, once the whole plan is read and checked; the image record
gains "rootfs" and each layer record "applied": true.

Blobs are read from WORKDIR/layers/<hex>, never from the plan's "path": a plan
naming a path the workdir does not give that digest is refused (exit 2).
"""

EPILOG = """\
environment:
  TOSI_MAX_LAYER_BYTES    cap on the decompressed size of one layer (default 64 GiB)
  TOSI_MAX_LAYER_ENTRIES  cap on the entries of one layer (default 10000000)
"""


def _positive(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def body(argv):
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_workdir_flag(parser)
    parser.set_defaults(workdir=None)
    parser.add_argument("--overlaydir", metavar="DIR",
                        help="where per-layer directories go (default: WORKDIR/overlays)")
    parser.add_argument("--into", metavar="DIR",
                        help="apply all layers into DIR (absent or empty) instead")
    parser.add_argument("--parallel", type=_positive, metavar="N",
                        help="layers extracted at once in per-layer mode (default: number of CPUs)")
    args = parser.parse_args(argv)
    setup_logging(PROG, args.verbose)

    from ..cache import Workdir
    from ..plan import FdLines, PlanReader, PlanWriter
    from ..unpack import check_into_target, unpack_plan

    if args.into:
        check_into_target(args.into)  # before reading anything, so a mistake costs nothing
    # FdLines: every record already written is checked before the first layer is used.
    reader = PlanReader(FdLines(sys.stdin.fileno()), workdir=lambda image: Workdir(
        plan_workdir(args.workdir, image).root, args.overlaydir), uses=("path",))
    image = reader.image
    # A flat tree is the user's: the whole plan is read (and checked) before a layer
    # goes into it. Per layer, each layer is extracted into the cache as its record comes.
    layers = reader.layers() if args.into else reader
    records = unpack_plan(image, layers, workdir=reader.workdir.root,
                          overlaydir=args.overlaydir,
                          into=args.into, parallel=args.parallel)
    PlanWriter(sys.stdout).write_plan(image, records)
    return 0


def main(argv=None):
    return run(PROG, body, argv)
