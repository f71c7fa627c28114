"""tosi-unpack: extract the layers of a fetched plan, per layer for overlayfs or flat into a directory."""

import sys

from .common import MAX_PARALLEL, add_workdir_flag, count_type, new_parser, plan_workdir, run, setup_logging

PROG = "tosi-unpack"

DESCRIPTION = """\
Read a plan (from tosi-fetch) on stdin and extract its layers; write the plan
to stdout with what was made.

Without --into, each layer is extracted alone into OVERLAYDIR/<hex>/ as an
overlayfs lowerdir (reused by later runs), with a short name in
OVERLAYDIR/<hex>.link and a symlink OVERLAYDIR/<short> -> <hex>; layer records
gain "overlay" and "link".

With --into DIR, all layers are applied bottom first into DIR, which must be
absent or empty; the image record gains "rootfs" and each layer record
"applied": true.
"""

EPILOG = """\
environment:
  TOSI_MAX_LAYER_BYTES    cap on the decompressed size of one layer (default 64 GiB)
  TOSI_MAX_LAYER_ENTRIES  cap on the entries of one layer (default 10000000)
"""


def body(argv):
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_workdir_flag(parser)
    parser.set_defaults(workdir=None)
    parser.add_argument("--overlaydir", metavar="DIR",
                        help="where per-layer directories go (default: WORKDIR/overlays)")
    parser.add_argument("--into", metavar="DIR",
                        help="apply all layers into DIR (absent or empty) instead")
    parser.add_argument("--parallel", type=count_type(1), metavar="N",
                        help=f"layers extracted at once in per-layer mode, at most {MAX_PARALLEL} "
                        "(default: number of CPUs)")
    args = parser.parse_args(argv)
    setup_logging(PROG, args.verbose)

    from ..plan import PlanReader, PlanWriter
    from ..unpack import check_into_target, unpack_plan

    if args.into:
        check_into_target(args.into)  # before reading anything, so a mistake costs nothing
    reader = PlanReader(sys.stdin)
    image = reader.image
    records = unpack_plan(image, reader, workdir=plan_workdir(args.workdir, image).root,
                          overlaydir=args.overlaydir,
                          into=args.into, parallel=args.parallel)
    PlanWriter(sys.stdout).write_plan(image, records)
    return 0


def main(argv=None):
    return run(PROG, body, argv)
