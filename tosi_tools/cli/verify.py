"""tosi-verify: re-hash the cached blobs a plan (or a digest list) names."""

import argparse
import itertools
import sys
from collections.abc import Sequence

from .common import (
    EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_workdir_flag, exit_status_epilog, new_parser, plan_workdir, run,
    setup_logging,
)
from .terminal import PlanOutput, count, image_name, next_stage, refuse_terminal_stdin

PROG = "tosi-verify"

DESCRIPTION = """\
Read a plan, or a list of digests (one sha256:<hex> per line), on stdin and
re-hash each blob it names in the cache. A plan is written back to stdout
(records in order, up to the first bad blob); a digest list comes back as the
digests that verified.

Every missing or corrupt blob is reported on stderr, one line each; a corrupt
blob is moved to <workdir>/quarantine so the next tosi-fetch downloads it again.
A blob is good when its bytes match its digest: a plan that gives a good blob
another size is wrong (exit 2, one line naming the layer, the plan's size and
the blob's), and the blob stays in the cache.
"""

EPILOG = exit_status_epilog(PROG, "a blob is missing or corrupt, or there is no workdir",
                            reads_plan=True)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(PROG, DESCRIPTION, EPILOG)
    add_workdir_flag(parser, from_plan=True)  # the plan's workdir unless the flag is given
    return parser


def _first_line(lines):
    """The lines read up to the first that is not blank (as plan_line reads it), and
    that line as text; None for it at the end of the input."""
    from ..plan import plan_line

    read = []
    for line in lines:
        read.append(line)
        text = plan_line(line, len(read))
        if text.strip():
            return read, text
    return read, None


def _verify_plan(lines, workdir_flag, report):
    from ..plan import PlanReader
    from ..verify import config_check, layer_check, verify_blobs

    reader = PlanReader(
        lines, workdir=lambda image: plan_workdir(workdir_flag, image).check_if_named_by_plan(),
        uses=("path", "config path"))
    image = reader.image
    layers = reader.layers()
    workdir = reader.workdir.check()
    checks = [layer_check(workdir, record) for record in layers]
    # Each record goes out once its blob verified: the image record with its config.
    outputs = list(layers)
    writer = PlanOutput(sys.stdout, _describe)
    if image.config is not None:
        checks.insert(0, config_check(workdir, image.config))
        outputs.insert(0, image)
    else:
        writer.write(image)
    status = EXIT_OK
    for check, record in zip(verify_blobs(workdir, checks), outputs):
        if not check.ok:
            status = _worse(status, check, report)
        elif status == EXIT_OK:
            writer.write(record)
    if status == EXIT_OK:
        writer.finish()
    return status


def _worse(status, check, report):
    """Report a failed check (a blob named twice, once), and the exit status with it:
    a plan that lies about a good blob's size is bad input (2), whatever else failed."""
    from ..errors import PlanError

    if check.same_as is None or check.error is not check.same_as.error:
        report(check.error)
    if isinstance(check.error, PlanError):
        return EXIT_USAGE
    return status if status == EXIT_USAGE else EXIT_FAILURE


def _describe(image, layers):
    """What a terminal gets instead of the plan."""
    what = count(len(layers), "layer")
    if image.config is not None:
        what = f"the config and {what}"
    return f"verified {image_name(image)}: {what}, in {image.workdir}" + next_stage("tosi-unpack")


def _verify_digests(lines, workdir_flag, report):
    from ..plan import read_digest_list
    from ..verify import digest_check, verify_blobs

    digests = list(read_digest_list(lines))  # a malformed list is refused first
    workdir = plan_workdir(workdir_flag).check()
    checks = [digest_check(workdir, d) for d in digests]
    status = EXIT_OK
    for check in verify_blobs(workdir, checks):
        if check.ok:
            print(check.digest, flush=True)
        else:
            status = _worse(status, check, report)
    return status


def body(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(PROG, args.verbose)
    refuse_terminal_stdin(PROG, "a plan (or a list of digests)",
                          "tosi-resolve alpine | tosi-fetch | tosi-verify | tosi-unpack --into /tmp/rootfs")

    def report(error):
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)

    from ..plan import FdLines

    stdin = FdLines(sys.stdin.fileno())  # bytes: plan_line decodes them, whatever the locale
    read, first = _first_line(stdin)
    if first is None:
        from ..errors import PlanError
        raise PlanError("stdin: nothing to verify (expected a plan or a digest list)")
    lines = itertools.chain(read, stdin)
    verify = _verify_plan if first.lstrip().startswith("{") else _verify_digests
    return verify(lines, args.workdir, report)


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, body, argv)
