"""tosi-fetch: make sure every blob of the plan on stdin is in the cache; the plan goes on."""

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..plan import ImageRecord, LayerRecord

from .common import (
    MAX_PARALLEL, add_credential_flags, add_min_free_flag, add_workdir_flag, check_authfile, count_type,
    exit_status_epilog, new_parser, password_from_stdin, plan_workdir, run, setup_logging,
)
from .terminal import PlanOutput, count, human_size, image_name, next_stage, refuse_terminal_stdin

PROG = "tosi-fetch"

DESCRIPTION = """\
Read a plan (from tosi-resolve) on stdin, download every layer blob and the
config that the cache does not hold yet, and write the plan to stdout with each
layer's cache "path" added. Each layer record is written as soon as its blob is
verified, so a following tosi-unpack can start on it.

Blobs are hashed while they arrive and renamed into place only when verified.
A blob is good when it matches its digest: a plan that gives a good blob
another size is wrong (exit 2), and the blob stays in the cache.
A broken download is resumed with a Range request; connection errors, read
timeouts, 5xx and 429 are retried with exponential backoff. Concurrent tosi
processes sharing a workdir wait for each other instead of downloading twice.
"""

EPILOG = """\
With --password-stdin the first line of stdin is the password and the plan follows.
Credentials otherwise come from TOSI_USERNAME/TOSI_PASSWORD, --authfile, containers'
auth.json or the docker config (~/.docker/config.json: inline or a credential helper).
A blob that would leave the cache's filesystem less free than the reserve
(--min-free, TOSI_MIN_FREE, TOSI_MIN_FREE_INODES) is refused before or while it arrives.
They are for the plan's "registry" and go only to that registry's own endpoint:
a plan whose "endpoint" names another host gets no credentials. Over plain http
(or unverified TLS) they go only to a loopback registry, unless --insecure is given.

"""


def build_parser() -> argparse.ArgumentParser:
    from ..fetch import DEFAULT_PARALLEL, DEFAULT_RETRIES

    parser = new_parser(PROG, DESCRIPTION, EPILOG + "\n" + exit_status_epilog(
        PROG, "a download failed", reads_plan=True))
    add_workdir_flag(parser, from_plan=True)  # the plan's workdir unless the flag is given
    parser.add_argument("--parallel", type=count_type(0), default=DEFAULT_PARALLEL, metavar="N",
                        help=f"download N blobs at once, at most {MAX_PARALLEL} "
                        f"(default {DEFAULT_PARALLEL}; 0: one per layer)")
    parser.add_argument("--validate-cache", action="store_true",
                        help="re-hash blobs already in the cache and replace bad ones")
    parser.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                        help="progress bars on stderr (auto: when stderr is a terminal)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                        help=f"retry each blob up to N times (default {DEFAULT_RETRIES})")
    parser.add_argument("--read-timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on a silent connection after SECONDS (default 60), then retry")
    add_min_free_flag(parser, "the cache's filesystem")
    add_credential_flags(parser)
    parser.add_argument("--insecure", action="store_true",
                        help="let credentials go over plain http (or unverified TLS) to a registry "
                        "that is not on loopback; the plan's \"insecure\" alone does not")
    parser.add_argument("--mirror", action="append", default=[], metavar="URL",
                        help="try this registry mirror or pull-through cache, [http(s)://]HOST[:PORT]"
                        "[/NAMESPACE], before the plan's registry; repeat for more, tried in order; "
                        "replaces the plan's \"mirrors\"")
    return parser


def body(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    if args.read_timeout is not None and args.read_timeout <= 0:
        parser.error("--read-timeout must be positive")
    setup_logging(PROG, args.verbose)
    refuse_terminal_stdin(PROG, "the plan tosi-resolve writes",
                          "tosi-resolve alpine | tosi-fetch | tosi-unpack --into /tmp/rootfs")

    from ..fetch import Fetcher, client_factory, fetch_plan
    from ..keychain import from_flags
    from ..plan import FdLines, PlanReader
    from ..space import Reserve
    from .progress import ProgressBars

    check_authfile(args.authfile)
    from ..mirrors import mirror_flag

    flag_mirrors = [mirror_flag(value) for value in args.mirror]
    # The password line and the plan read from one unbuffered reader of stdin's bytes.
    stdin = FdLines(sys.stdin.fileno())
    password = password_from_stdin(args, stdin)  # before the plan, which follows it on stdin
    # Fetch opens no cache path of the plan: their shape is checked, not their workdir.
    reader = PlanReader(stdin, workdir=lambda image: plan_workdir(args.workdir, image), uses=())
    image = reader.image
    layers = reader.layers()
    workdir = reader.workdir
    assert workdir is not None  # PlanReader was given a workdir callable
    if flag_mirrors:
        from ..mirrors import flag_specs

        image = image.with_mirrors(spec.to_record() for spec in flag_specs(
            flag_mirrors, image.repository or "", args.insecure, workdir))
    keychain = from_flags(args.username, args.password, password, insecure=args.insecure,
                          authfile=args.authfile)
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    bars = ProgressBars(image, layers, sys.stderr) if show else None
    pool_size = args.parallel or max(len(layers) + 1, 1)
    fetcher = Fetcher(workdir, client_factory(None, pool_size, read_timeout=args.read_timeout,
                                              insecure=args.insecure, keychain=keychain),
                      parallel=args.parallel, retries=args.retries,
                      validate_cache=args.validate_cache, progress=bars,
                      reserve=Reserve.from_env(size_text=args.min_free))
    try:
        records = fetch_plan(fetcher, image, layers)
        out = PlanOutput(sys.stdout, _describe)
        out.write_plan(next(records), records)
    except BaseException:
        if bars:
            bars.clear()  # before the error line
        raise
    finally:
        if bars:
            bars.close()
    out.finish()  # after the bars
    return 0


def _describe(image: "ImageRecord", layers: "list[LayerRecord]") -> str:
    """What a terminal gets instead of the plan."""
    from .progress import total_bytes

    return (f"fetched {image_name(image)}: {count(len(layers), 'layer')}, "
            f"{human_size(total_bytes(image, layers))}, in {image.workdir}"
            + next_stage("tosi-unpack"))


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, body, argv)
