"""tosi-gc: list the images of a workdir, and remove what no kept image uses."""

import argparse
import datetime
import json
import sys
from collections.abc import Sequence

from ..errors import UsageError
from .common import add_workdir_flag, exit_status_epilog, new_parser, run, setup_logging

PROG = "tosi-gc"

DESCRIPTION = """\
Remove from the workdir what no cached image uses: blobs, configs, overlay dirs
and their records, short links, chain copies, attributes lowerdirs, stale locks
and temporaries. With --max-size, first remove the least recently used images
until the cache fits. Nothing a running pull holds or a live mount uses as a
lowerdir is removed. With --list, only list the cached images."""

EPILOG = """\
examples:
  tosi-gc --list
  tosi-gc --dry-run --max-size 10G --keep alpine:3.20
  tosi-gc --workdir /var/cache/tosi --max-size 500M

""" + exit_status_epilog(PROG, "something could not be removed, or there is no workdir")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_workdir_flag(parser)
    parser.add_argument("--list", action="store_true",
                        help="list the cached images (reference, digest, platform, size, last use): "
                        "a table on a terminal, else JSON lines; remove nothing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be removed and the bytes that would be freed; "
                        "remove nothing")
    parser.add_argument("--max-size", metavar="SIZE",
                        help="also remove the least recently used images until the cache takes at "
                        "most SIZE on disk (e.g. 10G, 500M; powers of 1024)")
    parser.add_argument("--keep", metavar="REF", nargs="+", action="extend", default=[],
                        help="keep the images REF names whatever --max-size says (repeatable)")
    return parser


def _when(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _list(images) -> None:
    from ..space import human

    if not sys.stdout.isatty():
        for image in images:
            print(json.dumps({
                "reference": image.reference, "registry": image.registry,
                "repository": image.repository, "digest": image.digest,
                "platform": image.platform, "size": image.size,
                "lastUsed": _when(image.last_used),
            }), flush=True)
        return
    rows = [("REFERENCE", "DIGEST", "PLATFORM", "SIZE", "LAST USED")]
    rows += [(image.reference, image.digest[:19], image.platform or "-", human(image.size),
              _when(image.last_used)) for image in images]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


def body(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    if args.list and (args.dry_run or args.max_size is not None or args.keep):
        raise UsageError("--list only lists: it goes with neither --dry-run, --max-size nor --keep")
    from .. import gc
    from ..cache import Workdir
    from ..space import human

    max_size = gc.parse_max_size(args.max_size) if args.max_size is not None else None
    workdir = Workdir(args.workdir)
    if args.list:
        _list(gc.list_images(workdir))
        return 0
    result = gc.collect(workdir, keep=args.keep, max_size=max_size, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for image in result.dropped:
        print(f"{verb} image {image.reference} ({image.digest})")
    for removal in result.removed:
        print(f"{verb} {removal.what} {removal.path} ({human(removal.size)})")
    for path in result.busy:
        print(f"{PROG}: kept {path}: in use by a running process", file=sys.stderr)
    print(f"{'would free' if args.dry_run else 'freed'} {result.freed} bytes ({human(result.freed)}); "
          f"the cache {'would take' if args.dry_run else 'takes'} {human(result.size_after)}")
    if max_size is not None and result.size_after > max_size:
        print(f"{PROG}: the cache is still larger than --max-size {args.max_size}: what is left is "
              "kept (--keep), in use or mounted", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, body, argv)
