"""tosi-unpack: extract the layers of a fetched plan, per layer for overlayfs or flat into a directory."""

import os
import sys
from collections.abc import Sequence

from .common import (
    MAX_PARALLEL, add_min_free_flag, add_workdir_flag, count_type, exit_status_epilog, new_parser,
    plan_workdir, run, setup_logging,
)
from .terminal import PlanOutput, count, image_name, next_stage, refuse_terminal_stdin

PROG = "tosi-unpack"

DESCRIPTION = """\
Read a plan (from tosi-fetch) on stdin and extract its layers; write the plan
to stdout with what was made.

Without --into, each layer is extracted alone into OVERLAYDIR/<hex>/ as an
overlayfs lowerdir (reused by later runs), with a short name in
OVERLAYDIR/<hex>.link and a symlink OVERLAYDIR/<short> -> <hex>; layer records
gain "overlay" and "link".

With --into DIR, all layers are applied bottom first into DIR, which must be
absent or an empty directory of yours (never a symlink), once the whole plan is
read and checked; the image record gains "rootfs" and each layer record
"applied": true. DIR is 0700 while the layers go in, then gets the image's root
mode, unless other users can reach it and it received setuid/setgid files or
devices: then it stays 0700 (a warning says so; see --keep-root-mode).

Blobs are read from WORKDIR/layers/<hex>, never from the plan's "path": a plan
naming a path the workdir does not give that digest is refused (exit 2).
"""

EPILOG = """\
environment:
  TOSI_MAX_LAYER_BYTES    cap on the decompressed size of one layer (default 64 GiB)
  TOSI_MAX_LAYER_ENTRIES  cap on the entries of one layer (default 10000000)
  TOSI_MIN_FREE           free space to keep on the target's filesystem (as --min-free)
  TOSI_MIN_FREE_INODES    free inodes to keep: a count or N% (default: 1%, 512 to 65536)

""" + exit_status_epilog(PROG, "a layer could not be extracted (missing blob, bad diffID, I/O)",
                                  reads_plan=True, targets="an --into directory")


def body(argv: Sequence[str] | None) -> int:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_workdir_flag(parser, from_plan=True)  # the plan's workdir unless the flag is given
    parser.add_argument("--overlaydir", metavar="DIR",
                        help="where per-layer directories go (default: WORKDIR/overlays)")
    parser.add_argument("--into", metavar="DIR",
                        help="apply all layers into DIR (absent or empty) instead")
    parser.add_argument("--keep-root-mode", action="store_true",
                        help="with --into: give DIR the image's root mode even when other "
                        "users can reach it and the image holds setuid/setgid files or "
                        "devices (by default DIR then stays 0700, with a warning)")
    parser.add_argument("--parallel", type=count_type(1), metavar="N",
                        help=f"layers extracted at once in per-layer mode, at most {MAX_PARALLEL} "
                        "(default: number of CPUs)")
    add_min_free_flag(parser, "the target's filesystem")
    args = parser.parse_args(argv)
    setup_logging(PROG, args.verbose)
    refuse_terminal_stdin(PROG, "the plan tosi-fetch writes",
                          "tosi-resolve alpine | tosi-fetch | tosi-unpack --into /tmp/rootfs")

    from ..layer import Limits
    from ..plan import FdLines, PlanReader
    from ..unpack import check_into_target, unpack_image

    if args.keep_root_mode and not args.into:
        from ..errors import UsageError

        raise UsageError("--keep-root-mode goes with --into")
    if args.into:
        check_into_target(args.into)  # before reading anything, so a mistake costs nothing
    # FdLines: every record already written is checked before the first layer is used.
    reader = PlanReader(FdLines(sys.stdin.fileno()), workdir=lambda image: plan_workdir(
        args.workdir, image, args.overlaydir).check_if_named_by_plan(), uses=("path",))
    image = reader.image
    # A flat tree is the user's: the whole plan is read (and checked) before a layer
    # goes into it. Per layer, each layer is extracted into the cache as its record comes.
    layers = reader.layers() if args.into else reader
    image, records = unpack_image(image, layers, workdir=reader.workdir,
                                  into=args.into, parallel=args.parallel,
                                  limits=Limits.from_env(min_free=args.min_free),
                                  keep_root_mode=args.keep_root_mode)
    out = PlanOutput(sys.stdout, _describe)
    out.write_plan(image, records)
    out.finish()
    return 0


def _describe(image, layers):
    """What a terminal gets instead of the plan."""
    name = image_name(image)
    if image.rootfs is not None:
        return f"unpacked {name}: {count(len(layers), 'layer')} applied into {image.rootfs}"
    where = {os.path.dirname(layer.overlay) for layer in layers if layer.overlay}
    return (f"unpacked {name}: {count(len(layers), 'layer')} extracted"
            + (f" in {where.pop()}" if len(where) == 1 else "") + next_stage("tosi-mount DIR"))


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, body, argv)
