"""tosi: the original tool's command line, running every stage in one process.

Flags follow Go's flag package, as the original's did: `-flag value`,
`-flag=value`, `--flag value` and `--flag=value` for flags with a value; a
boolean flag is `-flag` or `-flag=true|false` (never `-flag false`). Parsing
stops at the first non-flag argument or at `--`.
"""

import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NamedTuple

from .. import __version__
from ..cache import DEFAULT_WORKDIR
from ..errors import UsageError, quoted
from .common import (
    EXIT_OK, MAX_PARALLEL, check_authfile, exit_status_epilog, nearest_flag, read_password_line, run,
    setup_logging,
)

PROG = "tosi"

SUMMARY = """\
usage: tosi -image IMAGE [-extractto DIR | -mount DIR] [flags]

Pull a container image from an OCI/Docker registry into the workdir cache and
unpack its layers into the overlay cache; with -extractto, combine them into
one directory instead; with -mount, also mount them there as overlayfs.
Flags may be written -flag, --flag, -flag=value or --flag=value.
See tosi(1)."""

EXAMPLES = """\
examples:
  tosi -image nginx -extractto /tmp/nginx-rootfs
  tosi -image quay.io/quay/redis -mount /run/rootfs
  tosi -image bitnami/tomcat:8.5.31 -saveconfig /tmp/tomcat.config
  tosi -image quay.io/bitriseio/android-ndk -parallel-downloads 8
  tosi -workdir /mnt/image-cache -image alpine"""

BOOL, STRING, INT, LIST = "bool", "string", "int", "list"  # LIST: a string flag that repeats


class Flag(NamedTuple):
    name: str
    kind: str
    help: str
    default: object = None
    metavar: str = ""


FLAGS = [
    Flag("alsologtostderr", BOOL, "log to standard error as well as files (logs always go to "
         "stderr here; this also shows informational messages)", False),
    Flag("authfile", STRING, "containers auth.json to read registry credentials from before the "
         "other stored ones (default: $REGISTRY_AUTH_FILE, else "
         "$XDG_RUNTIME_DIR/containers/auth.json).", metavar="FILE"),
    Flag("ca-file", STRING, "CA bundle to verify the registry's certificate with (default: the "
         "host's certs.d directory and the system CAs, or $REQUESTS_CA_BUNDLE).", metavar="FILE"),
    Flag("extractto", STRING, "Extract and combine all layers of an image directly into this "
         "directory. Mutually exclusive with -mount <dir>.", metavar="DIR"),
    Flag("image", STRING, "Image repository to pull, e.g. alpine, alpine:3.20, "
         "quay.io/quay/redis or 127.0.0.1:5000/repo@sha256:<hex>; or without a registry "
         "oci:DIR[:TAG|@DIGEST] (an OCI image layout) or docker-archive:FILE[:NAME:TAG] "
         "(a docker save tar).", metavar="IMAGE"),
    Flag("insecure", BOOL, "Allow plain HTTP and unverified TLS for a registry that is not on "
         "loopback.", False),
    Flag("keep-root-mode", BOOL, "With -extractto: give the directory the image's root mode "
         "even when other users can reach it and the image holds setuid/setgid files or "
         "devices (by default it then stays 0700, with a warning).", False),
    Flag("log_backtrace_at", STRING, "when logging hits line file:N, emit a stack trace "
         "(accepted for compatibility; ignored)", metavar="FILE:N"),
    Flag("log_dir", STRING, "If non-empty, write log files in this directory (accepted for "
         "compatibility; logs go to stderr only)", metavar="DIR"),
    Flag("logtostderr", BOOL, "log to standard error instead of files (logs always go to "
         "stderr here; this also shows informational messages)", False),
    Flag("mirror", LIST, "A registry mirror or pull-through cache, [http(s)://]HOST[:PORT][/NAMESPACE], "
         "to try before the image's registry; repeatable, tried in order. Replaces the mirrors "
         "registries.conf and daemon.json name for the image.", (), metavar="URL"),
    Flag("min-free", STRING, "Stop a download or an extraction while its filesystem still has "
         "SIZE free, e.g. 64M, 2G or 1%; 0 turns the guard off (default: $TOSI_MIN_FREE, else 1% "
         "of the filesystem, at least 8M and at most 1G, and 1% of its inodes).", metavar="SIZE"),
    Flag("mount", STRING, "Create an overlayfs mount in this directory, with the image's layers "
         "as lowerdirs and <dir>.upper and <dir>.work beside it. The directory will be created "
         "if it does not exist. Mutually exclusive with -extractto <dir>.", metavar="DIR"),
    Flag("mount-option", LIST, "With -mount: per-mount flags, comma-separated, repeatable: "
         "nosuid/suid, nodev/dev, noexec/exec, noatime/relatime/strictatime, "
         "nodiratime/diratime. Where other users can reach the mount point it is mounted "
         "nosuid,nodev unless this says suid or dev.", (), metavar="OPTS"),
    Flag("overlaydir", STRING, "Working directory for extracting layers. By default, it will be "
         "<workdir>/overlays.", metavar="DIR"),
    Flag("parallel-downloads", INT, "Number of layers to download in parallel; 0 means one per "
         f"layer; at most {MAX_PARALLEL}.", 4, metavar="N"),
    Flag("password", STRING, "Password for registry login.", metavar="PASSWORD"),
    Flag("password-stdin", BOOL, "Read the password for registry login from the first line of "
         "stdin.", False),
    Flag("platform", STRING, "Platform to pick from a multi-platform image, as OS/ARCH[/VARIANT] "
         "(default: this machine's).", metavar="OS/ARCH[/VARIANT]"),
    Flag("progress", BOOL, "Show progress bars on stderr: bytes downloaded, then layers "
         "extracted with their entries and bytes (default: only when stderr is a terminal; "
         "-progress=false never).", None),
    Flag("read-only", BOOL, "With -mount: mount the layers only, without an upper dir, so "
         "writes fail.", False),
    Flag("saveconfig", STRING, "Save config from image to this file as JSON.", metavar="FILE"),
    Flag("stderrthreshold", STRING, "logs at or above this threshold go to stderr "
         "(INFO, WARNING, ERROR or FATAL, or 0-3)", "ERROR", metavar="LEVEL"),
    Flag("url", STRING, "DEPRECATED. Use -image instead with the registry server as the first "
         "part of the image. Registry base URL (http(s)://HOST[:PORT] or HOST[:PORT]); -image is "
         "then the repository on it as given.", metavar="URL"),
    Flag("username", STRING, "Username for registry login.", metavar="USERNAME"),
    Flag("v", INT, "log level for V logs: 1 shows informational messages, 2 and more debug "
         "detail", 0, metavar="LEVEL"),
    Flag("validate-cache", BOOL, "validate already downloaded layers in cache via verifying "
         "their checksum", False),
    Flag("version", BOOL, "Print version and exit.", False),
    Flag("vmodule", STRING, "comma-separated list of pattern=N settings for file-filtered "
         "logging (accepted for compatibility; ignored)", metavar="LIST"),
    Flag("workdir", STRING, "Working directory, used for caching.", DEFAULT_WORKDIR,
         metavar="DIR"),
]
FLAG_BY_NAME = {flag.name: flag for flag in FLAGS}
HELP_NAMES = ("h", "help")
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}
_THRESHOLDS = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
               "FATAL": logging.CRITICAL}


class HelpRequested(Exception):
    pass


def _default_note(flag):
    if flag.default in (None, False, 0, "", ()):
        return ""
    return f' (default "{flag.default}")' if flag.kind == STRING else f" (default {flag.default})"


def help_text() -> str:
    lines = [SUMMARY, "", "flags:"]
    for flag in FLAGS:
        lines.append(f"  -{flag.name}" + (f" {flag.metavar}" if flag.metavar else ""))
        lines.append(textwrap.fill(flag.help + _default_note(flag), 79, initial_indent=" " * 8,
                                   subsequent_indent=" " * 8, break_on_hyphens=False))
    lines += ["  -h, -help", "        Print this help and exit.", "", EXAMPLES, "",
              exit_status_epilog(PROG, "the registry, network, cache, unpack or mount failed",
                                 targets="an -extractto or -mount directory")]
    return "\n".join(lines)


def parse_flags(argv: Sequence[str]) -> dict[str, Any]:
    """Go flag semantics over FLAGS; returns {name: value} with defaults filled in."""
    values: dict[str, Any] = {flag.name: flag.default for flag in FLAGS}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            break
        if len(arg) < 2 or not arg.startswith("-"):
            args.insert(0, arg)
            break
        text = arg[2:] if arg.startswith("--") else arg[1:]
        if not text or text.startswith(("-", "=")):
            raise UsageError(f"bad flag syntax: {arg}")
        name, has_value, value = text.partition("=")
        if name in HELP_NAMES:
            raise HelpRequested()
        flag = FLAG_BY_NAME.get(name)
        if flag is None:
            hint = nearest_flag(name, list(FLAG_BY_NAME))
            raise UsageError(f"flag provided but not defined: -{name}"
                             + (f"; did you mean -{hint}?" if hint else ""))
        if flag.kind == BOOL:
            if not has_value:
                value = "true"
            if value not in _TRUE | _FALSE:
                raise UsageError(f"invalid boolean value {quoted(value)} for -{name}")
            values[name] = value in _TRUE
        else:
            if not has_value:
                if not args:
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args.pop(0)
            if flag.kind == LIST:
                values[name] = values[name] + (value,)
            elif flag.kind == INT:
                try:
                    values[name] = int(value, 0)
                except ValueError:
                    raise UsageError(f"invalid value {quoted(value)} for -{name}: not an integer") from None
            else:
                values[name] = value
    if args:
        raise UsageError(f"unexpected argument {quoted(args[0])}: tosi takes flags only (-image IMAGE)")
    return values


def log_level(values: dict[str, Any]) -> int:
    """The stderr log level the glog-style flags ask for."""
    threshold = str(values["stderrthreshold"]).upper()
    if threshold.isdigit() and int(threshold) < len(_THRESHOLDS):
        threshold = list(_THRESHOLDS)[int(threshold)]
    if threshold not in _THRESHOLDS:
        raise UsageError(f"invalid value {quoted(values['stderrthreshold'])} for -stderrthreshold: "
                         "expected INFO, WARNING, ERROR, FATAL or 0-3")
    level = logging.WARNING
    if values["v"] >= 2:
        level = logging.DEBUG
    elif values["v"] == 1 or values["logtostderr"] or values["alsologtostderr"] \
            or _THRESHOLDS[threshold] == logging.INFO:
        level = logging.INFO
    return level


def check_flags(values: dict[str, Any]) -> None:
    """The flag combinations the original refused, and the new flags' own rules."""
    if not values["image"]:
        raise UsageError("-image is required")
    if values["password"] is not None and values["password-stdin"]:
        raise UsageError("-password and -password-stdin are mutually exclusive")
    if not 0 <= values["parallel-downloads"] <= MAX_PARALLEL:
        raise UsageError(f"-parallel-downloads must be from 0 (one per layer) to {MAX_PARALLEL}")
    for name in ("extractto", "mount", "saveconfig", "workdir", "overlaydir"):
        if values[name] == "":
            raise UsageError(f"-{name} needs a non-empty value")
    if values["min-free"] is not None:
        from ..space import parse_size

        parse_size(values["min-free"], "-min-free")
    check_authfile(values["authfile"], "-authfile")
    if values["ca-file"] is not None and not os.path.isfile(values["ca-file"]):
        raise UsageError(f"-ca-file {quoted(values['ca-file'])}: no such file")
    from ..mirrors import mirror_flag

    for text in values["mirror"]:
        mirror_flag(text, "-mirror")


def body(argv: Sequence[str] | None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        values = parse_flags(argv)
    except HelpRequested:
        sys.stdout.write(help_text())
        return EXIT_OK
    if values["version"]:
        print(f"{PROG} version {__version__}")
        return EXIT_OK
    level = log_level(values)
    check_flags(values)
    setup_logging(PROG, 0)
    logging.getLogger("tosi").setLevel(level)
    if values["log_dir"]:
        logging.getLogger("tosi").info("-log_dir is accepted but logs go to stderr only")

    from .. import pipeline

    password = values["password"]
    if values["password-stdin"]:
        password = read_password_line("-password-stdin")
    options = pipeline.PullOptions(
        image=values["image"],
        url=values["url"],
        workdir=values["workdir"],
        overlaydir=values["overlaydir"],
        extract_to=values["extractto"],
        mount=values["mount"],
        read_only=values["read-only"],
        save_config=values["saveconfig"],
        parallel=values["parallel-downloads"],
        username=values["username"],
        password=password,
        validate_cache=values["validate-cache"],
        platform=values["platform"],
        insecure=values["insecure"],
        mount_options=values["mount-option"],
        keep_root_mode=values["keep-root-mode"],
        min_free=values["min-free"],
        authfile=values["authfile"],
        ca_file=os.path.abspath(values["ca-file"]) if values["ca-file"] else None,
        mirrors=values["mirror"],
    )
    show = values["progress"] if values["progress"] is not None else sys.stderr.isatty()
    pipeline.pull(options, progress_for=_progress_bars if show else None)
    return EXIT_OK


def _progress_bars(image, layers):
    from .progress import ProgressBars

    return ProgressBars(image, layers, sys.stderr, blob_rows=False, extraction=True,
                        download_label="download")


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, body, argv)
