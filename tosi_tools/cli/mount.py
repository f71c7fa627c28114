"""tosi-mount: mount an unpacked image (plan on stdin) as overlayfs, or unmount it."""

import argparse
import sys
from collections.abc import Sequence

from ..errors import UsageError
from .common import add_workdir_flag, exit_status_epilog, new_parser, plan_workdir, run, setup_logging
from .terminal import PlanOutput, count, image_name, refuse_terminal_stdin

PROG = "tosi-mount"

DESCRIPTION = """\
Read a plan from tosi-unpack on stdin and mount the image's layers as overlayfs
at MOUNTPOINT: the layers' short links are the lowerdirs (topmost first), and
MOUNTPOINT.upper and MOUNTPOINT.work are the upper and work dirs (each must be
a real directory of yours, or is made). Where other users can reach MOUNTPOINT,
the mount is nosuid,nodev unless --mount-option says suid or dev. The plan goes
on to stdout with the image record's "mount" field added.
With --unmount, undo such a mount (no plan is read)."""

EPILOG = """\
examples:
  tosi-resolve alpine | tosi-fetch | tosi-unpack | tosi-mount /run/rootfs
  tosi-mount --unmount --clean /run/rootfs

""" + exit_status_epilog(PROG, "the mount failed (privilege, missing layers)",
                                  reads_plan=True, targets="a mount point or upper dir")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_workdir_flag(parser, from_plan=True, what="the cache the plan was unpacked in")
    parser.add_argument("--overlaydir", metavar="DIR",
                        help="where the layers' overlay dirs and short links are, as given to "
                        "tosi-unpack (default: <workdir>/overlays)")
    parser.add_argument("--read-only", action="store_true",
                        help="mount the lowerdirs only: no upper dir, writes fail")
    parser.add_argument("--keep-upper", action="store_true",
                        help="reuse a non-empty MOUNTPOINT.upper left by an earlier mount")
    parser.add_argument("--mount-option", metavar="OPTS", action="append", default=[],
                        dest="mount_options",
                        help="per-mount flags, comma-separated, repeatable: nosuid/suid, "
                        "nodev/dev, noexec/exec, noatime/relatime/strictatime, "
                        "nodiratime/diratime (default: nosuid,nodev when other users can "
                        "reach MOUNTPOINT, else none)")
    parser.add_argument("--unmount", action="store_true",
                        help="unmount the overlay at MOUNTPOINT instead of mounting")
    parser.add_argument("--clean", action="store_true",
                        help="with --unmount: also remove MOUNTPOINT.upper and MOUNTPOINT.work, "
                        "and MOUNTPOINT if tosi-mount created it; never what another user made")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT",
                        help="directory to mount on (created if missing, must be empty)")
    return parser


def body(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    if args.clean and not args.unmount:
        raise UsageError("--clean goes with --unmount")
    if args.unmount and (args.read_only or args.keep_upper or args.mount_options):
        raise UsageError("--read-only, --keep-upper and --mount-option are for mounting, "
                         "not --unmount")
    from .. import mount
    from ..plan import FdLines, PlanReader

    if args.unmount:
        mount.unmount_image(args.mountpoint, clean=args.clean)
        return 0
    refuse_terminal_stdin(PROG, "the plan tosi-unpack writes (without --into)",
                          "tosi-resolve alpine | tosi-fetch | tosi-unpack | tosi-mount /run/rootfs")
    reader = PlanReader(FdLines(sys.stdin.fileno()), workdir=lambda image: plan_workdir(
        args.workdir, image, args.overlaydir), uses=("overlay",))
    layers = reader.layers()
    image = reader.image.with_mount(mount.mount_image(
        reader.image, layers, args.mountpoint, overlaydir=args.overlaydir,
        workdir=reader.workdir,
        read_only=args.read_only, keep_upper=args.keep_upper,
        mount_options=args.mount_options))
    out = PlanOutput(sys.stdout, _describe)
    out.write_plan(image, layers)
    out.finish()
    return 0


def _describe(image, layers):
    """What a terminal gets instead of the plan."""
    mounted = image.mount or {}
    if mounted.get("readOnly"):
        writes = "read-only"
    else:
        writes = f"writes go to {mounted.get('upper')}"
    options = mounted.get("options") or []
    return (f"mounted {image_name(image)} at {mounted.get('target')}: overlayfs of "
            f"{count(len(layers), 'layer')}, {writes}" + (f", {','.join(options)}" if options else "")
            + f" (undo: tosi-mount --unmount {mounted.get('target')})")


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, body, argv)
