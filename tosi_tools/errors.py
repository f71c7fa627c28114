"""Typed errors raised by the library; the executables turn them into one line on stderr.

Each error carries the exit status its executable uses, so every command maps
failures the same way (documented in the man pages, EXIT STATUS).

A message quotes bad input with `quoted()`: at most QUOTE_LIMIT characters of
it, so a hostile plan line, digest list or tar entry name cannot flood stderr.
"""

QUOTE_LIMIT = 80


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr() of bad input for an error message: a longer one as its first and
    last `limit` / 2 characters (or bytes), the end of a path being as telling
    as its start, and how long it was."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        unit = "characters" if isinstance(value, str) else "bytes"
        head = limit // 2
        return f"{value[:head]!r}...{value[head - limit:]!r} ({len(value)} {unit})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


# How the command that runs spells the flags a message names: the stages take
# "--name", tosi takes "-name" and calls the stages' --into -extractto. Set once
# per command by cli.common.run (set_flag_style); library callers get the stages'.
_flag_prefix = "--"
_UMBRELLA_NAMES = {"into": "extractto"}


def set_flag_style(prefix: str) -> str:
    """Name flags with `prefix` ("--": a stage, "-": tosi) from now on; returns the old one."""
    global _flag_prefix
    old, _flag_prefix = _flag_prefix, prefix
    return old


def umbrella() -> bool:
    """Whether the command that runs is tosi (one dash), which has no stage-only flags."""
    return _flag_prefix == "-"


def flag(name: str) -> str:
    """The stage flag `name` (without dashes) as the command that runs spells it:
    flag("username") is "--username" in a stage and "-username" in tosi."""
    if umbrella():
        return "-" + _UMBRELLA_NAMES.get(name, name)
    return "--" + name


def for_command(stage: str, tosi: str) -> str:
    """The advice that fits the command that runs: `stage`'s for a stage, else `tosi`'s
    (for advice naming a stage-only flag, such as tosi-mount --keep-upper)."""
    return tosi if umbrella() else stage


def counted(count: int, word: str, plural: str | None = None) -> str:
    """"1 layer", "2 layers": a count and its noun, for messages and logs."""
    return f"{count} {word if count == 1 else plural or word + 's'}"


class TosiError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 1


class UsageError(TosiError):
    """The command line or its input is malformed (exit 2)."""

    exit_code = 2


class UnsafePath(UsageError):
    """A path tosi would create, follow or trust outside a target root (the workdir,
    a side directory of a mount, a path named by a plan) could be controlled by
    another local user or lies outside where it belongs (exit 2)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class InvalidReference(UsageError):
    """An image reference does not follow the distribution reference grammar."""


class PlanError(UsageError):
    """The plan on stdin is not a valid tosi plan."""


class PlanSizeMismatch(PlanError):
    """A plan gives a blob a size its bytes do not have, though they match its digest:
    the digest alone makes a blob good, so the plan is wrong, not the blob, which
    stays in the cache untouched (exit 2)."""

    def __init__(self, message: str, plan_size: int | None = None, real_size: int | None = None) -> None:
        super().__init__(message)
        self.plan_size = plan_size
        self.real_size = real_size


class AmbiguousShortName(InvalidReference):
    """A short name (no registry host) has no alias, and registries.conf's
    short-name-mode "enforcing" forbids guessing among several
    unqualified-search-registries (exit 2)."""


class ConfigError(UsageError):
    """A configuration file tosi reads (containers' registries.conf and its
    drop-ins, short-name-aliases.conf, Docker's daemon.json) is malformed or asks
    for something tosi does not do; the message names the file (exit 2)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class BlockedReference(UsageError):
    """registries.conf blocks pulls of the reference: the [[registry]] whose
    prefix matches it says blocked = true (exit 2)."""

    def __init__(self, message: str, prefix: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.prefix = prefix
        self.path = path


class SourceError(UsageError):
    """A local image source (an OCI image layout, a docker-save archive) is missing,
    malformed, or does not hold the image named, or names it ambiguously (exit 2)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class RegistryError(TosiError):
    """The registry answered with an error (unknown repository, tag, blob, ...)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class NotFound(RegistryError):
    """Repository, tag, manifest or blob unknown to the registry."""


class Unauthorized(RegistryError):
    """Credentials are missing or wrong, or access was denied."""


class Unreachable(TosiError):
    """The registry could not be reached (DNS, refused connection, timeout)."""


class Unavailable(RegistryError, Unreachable):
    """A server answered that it is busy or down for a moment (408, 429, 5xx; a token
    server's too): worth another try, after `retry_after` seconds if it said so."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class Cancelled(TosiError):
    """Work was stopped because something it belongs to gave up (a fetch whose other
    download failed first, a reader that was interrupted)."""


class TLSFailure(TosiError):
    """TLS handshake or certificate verification failed."""


class ManifestError(TosiError):
    """A manifest or index is malformed, too large or of an unsupported kind."""


class DigestMismatch(TosiError):
    """Content does not hash to (or is not the size of) the digest that names it."""


class DiffIDMismatch(DigestMismatch):
    """A layer's uncompressed content does not hash to the diffID stated for it (by
    the plan, from the image config): `actual` is what it hashes to."""

    def __init__(self, message: str, actual: str | None = None, stated: str | None = None) -> None:
        super().__init__(message)
        self.actual = actual
        self.stated = stated


class NoMatchingPlatform(TosiError):
    """An index has no manifest for the requested platform."""


class CacheError(TosiError):
    """The workdir cache is missing a blob, or holds a corrupt one."""


class QuarantinedBlob(CacheError):
    """A cached blob failed to unpack, then to match its digest, and was moved to the
    workdir's quarantine: fetching it again may fix it."""


class UnpackError(TosiError):
    """A layer could not be applied (malformed tar, unsupported compression, caps exceeded)."""


class MediaTypeMismatch(UnpackError):
    """A layer blob's first bytes show another compression than its media type names
    (`expected`: what the type says; `found`: what the blob is, e.g. "zstd-compressed")."""

    def __init__(self, message: str, media_type: str | None = None, expected: str | None = None,
                 found: str | None = None) -> None:
        super().__init__(message)
        self.media_type = media_type
        self.expected = expected
        self.found = found


class UnsafeEntry(UnpackError):
    """A layer entry tries to leave the target root or smuggle forbidden metadata."""


class ReserveReached(UnpackError):
    """Writing a layer (or downloading a blob) stopped because its filesystem was down
    to the reserve of free space or inodes that tosi leaves (tosi_tools.space)."""

    def __init__(self, message: str, filesystem: str | None = None, free_bytes: int | None = None,
                 free_inodes: int | None = None, reserve_bytes: int | None = None,
                 reserve_inodes: int | None = None) -> None:
        super().__init__(message)
        self.filesystem = filesystem
        self.free_bytes = free_bytes
        self.free_inodes = free_inodes
        self.reserve_bytes = reserve_bytes
        self.reserve_inodes = reserve_inodes


class MountError(TosiError):
    """An overlay mount or unmount failed or was refused."""
