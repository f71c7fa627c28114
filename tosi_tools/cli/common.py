"""What every executable shares: flag parsing that fails in one line, error mapping, logging.

Exit status (the same for every command, see the man pages):
  0 success; 1 operational failure (registry, network, digest, cache, unpack, mount);
  2 usage error (bad flags, bad reference, malformed plan on stdin, an unsafe path such
  as a workdir another user could have made); 130 interrupted.
"""

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import TosiError, UsageError, quoted

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Downloads or extractions at once: each is a thread (and a connection); more than
# this only costs memory.
MAX_PARALLEL = 64

log = logging.getLogger("tosi")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def new_parser(prog, description, epilog=None):
    parser = OneLineParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"{prog} version {__version__}",
        help="print the version and exit",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="log more to stderr (repeat for more detail)",
    )
    return parser


def count_type(low, high=MAX_PARALLEL):
    """An argparse type: a decimal integer from `low` to `high`, else one line of usage error."""
    def parse(text):
        digits = text.lstrip("0") or "0"
        if not (text.isascii() and text.isdigit() and len(digits) <= len(str(high))
                and low <= int(digits) <= high):
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, "
                                             f"not {quoted(text)}")
        return int(digits)
    parse.__name__ = "count"
    return parse


def add_workdir_flag(parser, from_plan=False):
    """--workdir; `from_plan`: for a stage that reads a plan, whose workdir is the
    default (resolved by plan_workdir, so the flag's own default is None)."""
    if from_plan:
        parser.add_argument(
            "--workdir", default=None, metavar="DIR",
            help="cache directory for manifests, configs, layers and overlays (default: the "
            "plan's workdir, which must be a tosi workdir; if it names none, $TOSI_WORKDIR "
            "or /tmp/tosi)",
        )
        return
    parser.add_argument(
        "--workdir", default=os.environ.get("TOSI_WORKDIR", "/tmp/tosi"), metavar="DIR",
        help="cache directory for manifests, configs, layers and overlays "
        "(default: $TOSI_WORKDIR or /tmp/tosi)",
    )


def exit_status_epilog(prog, failure, reads_plan=False):
    """The exit statuses, as the end of a --help epilog; `failure`: what exit 1 means."""
    import textwrap

    unsafe = "not private or not yours" + (
        ", or named by the plan and not a tosi workdir" if reads_plan else "")
    return textwrap.fill(
        f"exit status: 0 success; 1 {failure}; 2 bad flags or input, or an unsafe workdir "
        f"({unsafe}: see FILES in {prog}(1)); 130 interrupted.", 79, break_on_hyphens=False,
        break_long_words=False) + "\n"
def add_min_free_flag(parser, where):
    """--min-free SIZE: the free space (and inodes) a stage leaves on `where` (tosi_tools.space)."""
    import argparse

    from ..errors import UsageError
    from ..space import parse_size

    def size(text):
        try:
            parse_size(text, "--min-free")
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[1]) from None
        return text

    parser.add_argument(
        "--min-free", type=size, metavar="SIZE",
        help=f"stop while {where} still has SIZE free, e.g. 64M, 2G or 1%%; 0: fill it "
        "(default: $TOSI_MIN_FREE, else 1%% of the filesystem, at least 8M and at most 1G, "
        "and 1%% of its inodes)")


def add_credential_flags(parser):
    """--username, --password, --password-stdin: the same for every command that logs in."""
    parser.add_argument("--username", metavar="U", help="registry user name")
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument("--password", metavar="P", help="registry password (visible in ps; "
                        "prefer --password-stdin)")
    secret.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin")
    parser.add_argument("--authfile", metavar="FILE",
                        help="containers auth.json to read credentials from first (default: "
                        "$REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json)")


def check_authfile(path, flag="--authfile"):
    """Refuse an --authfile that names no file (podman refuses it too)."""
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{flag} {quoted(path)}: no such file")


def password_from_stdin(args):
    """The first line of stdin with --password-stdin, else None; an empty one is a usage error."""
    if not args.password_stdin:
        return None
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise UsageError("--password-stdin: no password on stdin")
    return password


def setup_logging(prog, verbosity):
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger("tosi")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def run(prog, body, argv=None):
    """Call body(argv) and turn every failure into one line on stderr and an exit status."""
    try:
        return body(argv) or EXIT_OK
    except TosiError as exc:
        if os.environ.get("TOSI_DEBUG") and exc.__cause__ is not None \
                and not isinstance(exc.__cause__, (TosiError, OSError)):
            raise  # a bug the library reported as an error: its traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our stdout went away (e.g. `| head`); nothing left to say.
        _silence_stdout()
        return EXIT_FAILURE
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # the promise is one line, never a traceback
        if os.environ.get("TOSI_DEBUG"):
            raise
        print(f"{prog}: error: internal error: {type(exc).__name__}: {exc} "
              "(set TOSI_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAILURE


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def not_yet_implemented(prog):
    def body(argv):
        parser = new_parser(prog, f"{prog}: not yet implemented")
        parser.parse_args(argv)
        print(f"{prog}: error: not yet implemented", file=sys.stderr)
        return EXIT_FAILURE
    return body


def plan_workdir(flag, image=None, overlaydir=None):
    """The workdir a plan-reading stage uses: --workdir, else the one the plan names
    (where resolve cached manifests and configs; used only if it holds the marker
    .tosi-workdir, see tosi_tools.cache), else $TOSI_WORKDIR or /tmp/tosi.
    Pair with add_workdir_flag(parser, from_plan=True)."""
    from ..cache import DEFAULT_WORKDIR, workdir_for

    return workdir_for(flag, image, overlaydir, default=os.environ.get("TOSI_WORKDIR") or DEFAULT_WORKDIR)
