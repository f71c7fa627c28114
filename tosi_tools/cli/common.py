"""What every executable shares: flag parsing that fails in one line, error mapping, logging.

Exit status (the same for every command, see the man pages):
  0 success; 1 operational failure (registry, network, digest, cache, unpack, mount);
  2 usage error (bad flags, bad reference, malformed plan on stdin, an unsafe path such
  as a workdir another user could have made); 130 interrupted (SIGINT, Ctrl-C);
  143 terminated (SIGTERM).

SIGTERM is handled as SIGINT is: `run` makes it raise `Terminated`, a
KeyboardInterrupt, in the main thread, so whatever cleans up after Ctrl-C cleans
up after it too: downloads and extractions stopped, locks released, temporary
files and half-made directories removed, a download's .partial kept for the next
run to resume, and "DIR is partially extracted" said of an -extractto target.
"""

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

from .. import __version__
from ..cache import DEFAULT_WORKDIR, Workdir
from ..errors import TosiError, UsageError, quoted, set_flag_style

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a process Ctrl-C ended
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143

# Downloads or extractions at once: each is a thread (and a connection); more than
# this only costs memory.
MAX_PARALLEL = 64

log = logging.getLogger("tosi")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr and exits 2."""

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            options = [name for action in self._actions for name in action.option_strings]
            for word in message[len(prefix):].split():
                hint = nearest_flag(word.partition("=")[0], options) if word.startswith("-") else None
                if hint:
                    message += f"; did you mean {hint}?"
                    break
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def nearest_flag(given: str, known: Sequence[str]) -> str | None:
    """The flag of `known` closest to the unknown `given` (a typo, or tosi's -flag
    given to a stage), or None when none is close."""
    import difflib

    close = difflib.get_close_matches(given, known, n=1, cutoff=0.75)
    return close[0] if close else None


def new_parser(prog: str, description: str, epilog: str | None = None) -> OneLineParser:
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


def count_type(low: int, high: int = MAX_PARALLEL) -> Callable[[str], int]:
    """An argparse type: a decimal integer from `low` to `high`, else one line of usage error."""
    def parse(text: str) -> int:
        digits = text.lstrip("0") or "0"
        if not (text.isascii() and text.isdigit() and len(digits) <= len(str(high))
                and low <= int(digits) <= high):
            raise argparse.ArgumentTypeError(f"expected an integer from {low} to {high}, "
                                             f"not {quoted(text)}")
        return int(digits)
    parse.__name__ = "count"
    return parse


def default_workdir() -> str:
    """The workdir when neither --workdir nor a plan names one: $TOSI_WORKDIR, else /tmp/tosi."""
    return os.environ.get("TOSI_WORKDIR") or DEFAULT_WORKDIR


def _workdir_default_help(from_plan: bool) -> str:
    """--workdir's default as --help states it: the rule, and what it comes to right now."""
    env = os.environ.get("TOSI_WORKDIR", "").replace("%", "%%")  # argparse %-formats help
    fallback = f"$TOSI_WORKDIR, here {env}" if env else f"{DEFAULT_WORKDIR}, as $TOSI_WORKDIR is unset"
    if from_plan:
        return ("default: the plan's workdir, which must be a tosi workdir; if it names none, "
                f"{fallback}")
    return f"default: {fallback}"


def add_workdir_flag(parser: argparse.ArgumentParser, from_plan: bool = False,
                     what: str = "cache directory for manifests, configs, layers and overlays") -> None:
    """--workdir; `from_plan`: for a stage that reads a plan, whose workdir is the
    default (resolved by plan_workdir, so the flag's own default is None). --help
    shows the default this run would use: $TOSI_WORKDIR's value when it is set."""
    parser.add_argument(
        "--workdir", default=None if from_plan else default_workdir(), metavar="DIR",
        help=f"{what} ({_workdir_default_help(from_plan)})",
    )


def exit_status_epilog(prog: str, failure: str, reads_plan: bool = False, targets: str = "") -> str:
    """The exit statuses, as the end of a --help epilog (as EXIT STATUS in the man
    pages); `failure`: what exit 1 means; `targets`: the directories that must be empty."""
    import textwrap

    unsafe = "not private or not yours" + (
        ", or named by the plan and not a tosi workdir" if reads_plan else "")
    return textwrap.fill(
        f"exit status: 0 success; 1 {failure}; 2 bad flags or input, "
        + (f"{targets} that is not empty, " if targets else "") + "or an unsafe workdir "
        f"({unsafe}: see FILES in {prog}(1)); 130 interrupted (SIGINT); 143 terminated "
        "(SIGTERM).", 79, break_on_hyphens=False,
        break_long_words=False) + "\n"
def add_min_free_flag(parser: argparse.ArgumentParser, where: str) -> None:
    """--min-free SIZE: the free space (and inodes) a stage leaves on `where` (tosi_tools.space)."""
    import argparse

    from ..errors import UsageError
    from ..space import parse_size

    def size(text: str) -> str:
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


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
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


def password_from_stdin(args: argparse.Namespace, lines: Iterator[bytes] | None = None) -> str | None:
    """The first line of stdin with --password-stdin, else None; an empty one is a usage error.
    `lines`: stdin's lines as bytes (plan.FdLines), for a stage that reads its plan there next."""
    if not args.password_stdin:
        return None
    return read_password_line("--password-stdin", lines)


def read_password_line(flag: str, lines: Iterator[bytes] | None = None) -> str:
    """The first line of stdin (without its line end), read for `flag`; empty, or not
    UTF-8: a usage error.
    From `lines` (stdin's lines as bytes, plan.FdLines) if given, else from sys.stdin."""
    if lines is None:
        line = sys.stdin.readline()
    else:
        line = next(lines, b"").decode("utf-8", "surrogateescape")
    password = line.rstrip("\r\n")
    if not password:
        raise UsageError(f"{flag}: no password on stdin")
    try:
        password.encode("utf-8")  # bytes that are not UTF-8 read as lone surrogates
    except UnicodeEncodeError:
        raise UsageError(f"{flag}: the password on stdin is not UTF-8") from None
    return password


def setup_logging(prog: str, verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger("tosi")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt. A
    KeyboardInterrupt, so that the library stops and cleans up after both alike;
    `run` tells them apart only for the message and the exit status."""


_terminating = False  # a SIGTERM was turned into Terminated during this run


def _raise_terminated(signum: int, frame: object) -> None:
    global _terminating
    if _terminating:
        return  # already unwinding: a second SIGTERM must not cut the clean-up short
    _terminating = True
    raise Terminated()


def _handle_sigterm() -> Callable[[], None] | None:
    """Make SIGTERM raise Terminated in this (main) thread; returns what puts the
    previous handler back. None, and SIGTERM left alone, where Python lets no handler
    be set (another thread), where SIGTERM is ignored (the parent asked for that) and
    where a handler Python did not set has it."""
    global _terminating
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous == signal.SIG_IGN:
        return None
    _terminating = False
    signal.signal(signal.SIGTERM, _raise_terminated)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
    return restore


def run(prog: str, body: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None) -> int:
    """Call body(argv) and turn every failure into one line on stderr and an exit status.
    Messages name flags as `prog` spells them (errors.flag). SIGINT ends it with
    "interrupted" and 130, SIGTERM with "terminated" and 143, after the same clean-up."""
    old_style = set_flag_style("-" if prog == "tosi" else "--")
    restore = _handle_sigterm()
    try:
        return _run(prog, body, argv)
    finally:
        if restore is not None:
            restore()
        set_flag_style(old_style)


def _run(prog: str, body: Callable[[Sequence[str] | None], int | None],
         argv: Sequence[str] | None) -> int:
    try:
        return body(argv) or EXIT_OK
    except TosiError as exc:
        if os.environ.get("TOSI_DEBUG") and exc.__cause__ is not None \
                and not isinstance(exc.__cause__, (TosiError, OSError)):
            raise  # a bug the library reported as an error: its traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print(f"{prog}: error: terminated", file=sys.stderr)
        return EXIT_TERMINATED
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


def plan_workdir(flag: str | None, image: Mapping[str, Any] | None = None,
                 overlaydir: str | None = None) -> Workdir:
    """The workdir a plan-reading stage uses: --workdir, else the one the plan names
    (where resolve cached manifests and configs; used only if it holds the marker
    .tosi-workdir, see tosi_tools.cache), else default_workdir().
    Pair with add_workdir_flag(parser, from_plan=True)."""
    from ..cache import workdir_for

    return workdir_for(flag, image, overlaydir, default=default_workdir())
