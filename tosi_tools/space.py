"""The free-space reserve: a layer or a blob may not fill its filesystem.

Whatever writes much (a layer being applied, a blob being downloaded) charges
what it writes to a `Guard`, which asks the filesystem (fstatvfs) how much is
left now and then and raises `ReserveReached` while the reserve is still free:
of blocks (f_bavail) and of inodes (f_favail; a layer of millions of empty files
is a bomb too). The size caps of layer.Limits bound a layer; this bounds the
filesystem, which a layer under the caps can still fill.

The reserve (`Reserve`, set with --min-free or TOSI_MIN_FREE) is by default the
larger of 8 MiB and 1% of the filesystem, at most 1 GiB; for inodes the larger
of 512 and 1% of them, at most 65536 (TOSI_MIN_FREE_INODES). "0" turns the
guard off. A filesystem that counts no blocks or no inodes (f_blocks or
f_files 0, as btrfs reports inodes) is not checked for that kind.

Cost: one fstatvfs per check. The charges of all the guards of a process on
one filesystem add up (parallel extractions share it); a check is due once
they reach half of the headroom the previous check found (what is free above
the reserve), and at most every 16 MiB or 4096 inodes, so far from full a
check comes rarely and near the reserve often, never letting the writers of
this process step over it by more than what they do not charge (directory
blocks, extents: the other half). Other processes writing to the same
filesystem are seen at the next check.
"""

import os
import threading
from collections.abc import Mapping
from typing import NamedTuple, Optional

from .errors import ReserveReached, UsageError, flag

MIB = 1 << 20
DEFAULT_MIN_BYTES = 8 * MIB
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MIN_INODES = 512
DEFAULT_MAX_INODES = 65536
DEFAULT_PERCENT = 1
CHECK_BYTES = 16 * MIB
CHECK_INODES = 4096
# The most a writer charges at once (a layer's data step, a blob's chunk): at a check,
# each other writer on the filesystem may have that much charged and not yet written.
STEP = 1 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# An amount to keep free: a count (bytes, inodes) or ("%", percent of the filesystem).
Amount = int | tuple[str, int]


class Reserve(NamedTuple):
    """What must stay free: each of `size`, `inodes` is None (the default rule),
    an absolute count (bytes, inodes) or ("%", percent of the filesystem)."""

    size: Optional[Amount] = None
    inodes: Optional[Amount] = None

    @property
    def off(self) -> bool:
        return self.size == 0 and self.inodes == 0

    @classmethod
    def parse(cls, text: str, what: str | None = None) -> "Reserve":
        """A reserve from "SIZE" (e.g. 64M, 2G, 1%, 0): SIZE for bytes, the default rule
        for inodes; "0" turns the guard off. UsageError if malformed."""
        size = parse_size(text, what or flag("min-free"))
        return cls(size, 0 if size == 0 else None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, size_text: str | None = None) -> "Reserve":
        """TOSI_MIN_FREE and TOSI_MIN_FREE_INODES; `size_text` (a flag) overrides the former."""
        text = size_text if size_text is not None else environ.get("TOSI_MIN_FREE")
        size = parse_size(text, flag("min-free") if size_text is not None else "TOSI_MIN_FREE") \
            if text else None
        inodes_text = environ.get("TOSI_MIN_FREE_INODES")
        inodes: Amount | None
        if inodes_text:
            inodes = parse_size(inodes_text, "TOSI_MIN_FREE_INODES", units=False)
        else:
            inodes = 0 if size == 0 else None
        return cls(size, inodes)

    def for_filesystem(self, st: os.statvfs_result) -> tuple[int, int]:
        """(bytes, inodes) to keep free on the filesystem of statvfs result `st`."""
        total_bytes = st.f_blocks * st.f_frsize
        return (_amount(self.size, total_bytes, DEFAULT_MIN_BYTES, DEFAULT_MAX_BYTES),
                _amount(self.inodes, st.f_files, DEFAULT_MIN_INODES, DEFAULT_MAX_INODES))


def _amount(spec: Amount | None, total: int, low: int, high: int) -> int:
    if spec is None:
        return min(max(low, total * DEFAULT_PERCENT // 100), high)
    if isinstance(spec, tuple):
        return total * spec[1] // 100
    return spec


def parse_size(text: object, what: str, units: bool = True) -> Amount:
    """An amount: N, N with a K/M/G/T suffix (powers of 1024; optionally "iB"/"B"), or N%."""
    raw = str(text).strip()
    t = raw.upper()
    if t.endswith("%"):
        try:
            percent = int(t[:-1])
        except ValueError:
            percent = -1
        if not 0 <= percent <= 100:
            raise UsageError(f"{what}: {raw!r} is not a percentage from 0% to 100%")
        return ("%", percent)
    for suffix in ("IB", "B"):
        if units and t.endswith(suffix) and len(t) > len(suffix):
            t = t[:-len(suffix)]
            break
    unit = t[-1:] if units and t[-1:] in _UNITS else ""
    number = t[:-1] if unit else t
    try:
        value = int(number)
    except ValueError:
        value = -1
    if value < 0 or not number.isdigit():
        form = "a size such as 64M, 1G or 2%" if units else "a count or a percentage such as 1%"
        raise UsageError(f"{what}: {raw!r} is not {form}")
    return value * _UNITS[unit]


def human(n: int) -> str:
    """A byte count as people read it: 7.9 MiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def mount_point(path: str) -> str:
    """The mount point of the filesystem holding `path` (the path itself if unknown)."""
    try:
        dev = os.stat(path).st_dev
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        found: str | None = None
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if fields[2].decode() == wanted and path.startswith(_unescape(fields[4])):
                    point = _unescape(fields[4])
                    if found is None or len(point) > len(found):
                        found = point
        return found or path
    except (OSError, IndexError, ValueError):
        return path


MEMORY_FILESYSTEMS = (b"tmpfs", b"ramfs")


def in_memory(fd: int) -> bool:
    """Whether the filesystem of `fd` keeps its files in memory (tmpfs, ramfs): nothing
    written there waits for a disk. False when unknown."""
    try:
        dev = os.fstat(fd).st_dev
        wanted = f"{os.major(dev)}:{os.minor(dev)}".encode()
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split(b" ")
                if fields[2] == wanted:
                    return line.split(b" - ", 1)[1].split(b" ")[0] in MEMORY_FILESYSTEMS
    except (OSError, IndexError):
        pass
    return False


def _unescape(field: bytes) -> str:
    text = field.decode("utf-8", "surrogateescape")
    for code in ("\\040", "\\011", "\\012", "\\134"):
        text = text.replace(code, chr(int(code[1:], 8)))
    return text


class _Meter:
    """What the guards of this process charged to one filesystem since its last check."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spent_bytes = 0
        self.spent_inodes = 0
        self.allow_bytes = 0   # 0: check at the first charge
        self.allow_inodes = 0
        self.writers = 0       # open guards
        self.checks = 0        # how many checks set allow_*: a guard's hold is for one of them


_meters: dict[int, _Meter] = {}
_meters_lock = threading.Lock()


def _meter_for(dev: int) -> _Meter:
    with _meters_lock:
        meter = _meters.get(dev)
        if meter is None:
            meter = _meters[dev] = _Meter()
        return meter


class Guard:
    """Charges of one writer to the filesystem holding the open file or directory `fd`.

    `what` starts the error (e.g. "layer 0 (sha256:...)"), `path` is where it
    writes (its filesystem is named in the error). `charge(nbytes, inodes)`
    says whether a check is due; `check()` does it, raising ReserveReached.
    The caller decides when it can check (after flushing what it has queued).
    """

    def __init__(self, fd: int, reserve: Reserve, what: str, path: str) -> None:
        self.fd = fd
        self.reserve = reserve
        self.what = what
        self.path = path
        meter = _meter_for(os.fstat(fd).st_dev)
        self._meter: _Meter | None = meter
        with meter.lock:
            meter.writers += 1
        # Charges held here before they reach the shared meter (its lock costs more
        # than a small file's charge): at most a quarter of what the meter allows,
        # shared among its writers, so the check still comes before the reserve.
        self._held_bytes = self._held_inodes = 0
        self._hold_bytes = self._hold_inodes = 0
        self._hold_for = -1  # the meter's `checks` the hold was worked out under

    def close(self) -> None:
        """This writer is done (what it wrote stays charged until the next check)."""
        m, self._meter = self._meter, None
        if m is not None:
            with m.lock:
                m.writers -= 1

    def __enter__(self) -> "Guard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_meter(self) -> _Meter:
        assert self._meter is not None, "the guard is closed"
        return self._meter

    def charge(self, nbytes: int, inodes: int = 0) -> bool:
        m = self._open_meter()
        held_bytes = self._held_bytes + nbytes
        held_inodes = self._held_inodes + inodes
        if held_bytes < self._hold_bytes and held_inodes < self._hold_inodes and m.checks == self._hold_for:
            self._held_bytes, self._held_inodes = held_bytes, held_inodes
            return False
        self._held_bytes = self._held_inodes = 0
        with m.lock:
            m.spent_bytes += held_bytes
            m.spent_inodes += held_inodes
            share = 4 * max(m.writers, 1)
            self._hold_bytes, self._hold_inodes = m.allow_bytes // share, m.allow_inodes // share
            self._hold_for = m.checks
            if m.spent_bytes < m.allow_bytes and m.spent_inodes < m.allow_inodes:
                return False
            m.spent_bytes = m.spent_inodes = 0
            return True

    def room(self) -> tuple[int, int]:
        """(bytes, inodes) that charge() would hold here without a check, all at once or
        in parts; what is taken of them is then held with hold()."""
        m = self._open_meter()
        if m.checks != self._hold_for:
            return 0, 0
        return (max(self._hold_bytes - self._held_bytes - 1, 0),
                max(self._hold_inodes - self._held_inodes - 1, 0))

    def hold(self, nbytes: int, inodes: int) -> None:
        """Hold charges that room() said fit (as charge() would, for less)."""
        self._held_bytes += nbytes
        self._held_inodes += inodes

    def spend(self, nbytes: int, inodes: int = 0) -> None:
        """charge() and, when due, check() that these are still free above the reserve."""
        if self.charge(nbytes, inodes):
            self.check(upcoming=(nbytes, inodes))

    def check(self, needed: int = 0, upcoming: tuple[int, int] = (0, 0)) -> None:
        """ReserveReached unless the filesystem has more than the reserve free, plus
        `needed` bytes (a whole blob: said so in the error) or `upcoming` (bytes, inodes)
        about to be written; sets when the next check is due."""
        st = os.fstatvfs(self.fd)
        keep_bytes, keep_inodes = self.reserve.for_filesystem(st)
        m = self._open_meter()
        others = max(m.writers - 1, 0)  # their last step may not show yet
        upcoming = (upcoming[0] + others * STEP, upcoming[1])
        free_bytes = st.f_bavail * st.f_frsize
        free_inodes = st.f_favail
        check_bytes = st.f_blocks > 0 and keep_bytes > 0
        check_inodes = st.f_files > 0 and keep_inodes > 0
        if (check_bytes and free_bytes - needed - upcoming[0] <= keep_bytes) \
                or (check_inodes and free_inodes - upcoming[1] <= keep_inodes):
            raise self._error(free_bytes, free_inodes, keep_bytes, keep_inodes, needed)
        allow_bytes = min((free_bytes - upcoming[0] - keep_bytes) // 2, CHECK_BYTES) \
            if check_bytes else CHECK_BYTES
        allow_inodes = min((free_inodes - keep_inodes) // 2, CHECK_INODES) if check_inodes else CHECK_INODES
        with m.lock:
            m.allow_bytes = max(allow_bytes, 1)
            m.allow_inodes = max(allow_inodes, 1)
            m.checks += 1

    def _error(self, free_bytes: int, free_inodes: int, keep_bytes: int, keep_inodes: int,
               needed: int) -> ReserveReached:
        fs = mount_point(self.path)
        if needed:
            left = f"needs {human(needed)} more, {fs} has {human(free_bytes)} free"
        else:
            left = f"stopped with {human(free_bytes)} and {free_inodes} inodes free on {fs}"
        return ReserveReached(
            f"{self.what}: {left}; the reserve is {human(keep_bytes)} and {keep_inodes} inodes "
            f"({flag('min-free')}, TOSI_MIN_FREE, TOSI_MIN_FREE_INODES)",
            filesystem=fs, free_bytes=free_bytes, free_inodes=free_inodes,
            reserve_bytes=keep_bytes, reserve_inodes=keep_inodes)


def guard(fd: int, reserve: Reserve | None, what: str, path: str) -> Guard | None:
    """A Guard, or None when `reserve` turns the guard off."""
    if reserve is None:
        reserve = Reserve()
    if reserve.off:
        return None
    return Guard(fd, reserve, what, path)
