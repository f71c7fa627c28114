"""A streaming tar reader made for applying layers: one pass, no seeking, little per-entry work.

Python's tarfile costs more per member than writing the member does (it
parses every field, keeps every member, and copies data through several
buffers), which for a layer of 100,000 small files is most of the time spent.
This reader parses only what a layer needs (ustar, GNU and PAX headers, long
names and links, xattrs, GNU sparse formats 0.0, 0.1, 1.0 and old GNU), yields
light entries, and lets the caller copy an entry's data straight from the
decompressed chunks to a file descriptor.
"""

import os
import re
from fractions import Fraction
from typing import Any, Protocol

from .digest import CHUNK
from .errors import UnpackError, quoted

try:
    from ._tarheader import files as _plain_files
    from ._tarheader import parse as _parse_plain
except ImportError:  # pragma: no cover - built only where a C compiler was at install time
    _parse_plain = _plain_files = None  # type: ignore[assignment]  # checked before each use

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_MAX_META = 16 << 20  # PAX records, long names and sparse maps are metadata, not data

REG, LNK, SYM, CHR, BLK, DIR, FIFO = "0", "1", "2", "3", "4", "5", "6"
_REG_TYPES = {"0": REG, "\0": REG, "7": REG}
_NO_DATA_TYPES = {LNK, SYM, CHR, BLK, DIR, FIFO}
_PAX_NUMBERS = {"size", "uid", "gid"}

# What the system calls applying an entry take; a header (base-256) or PAX record
# may say anything, and anything else is refused here, naming the entry.
MAX_ID = (1 << 32) - 2          # uid_t; (uid_t)-1 tells chown "leave it"
MAX_DEV = (1 << 31) - 1         # os.makedev() takes C ints
MAX_OFFSET = (1 << 63) - 1      # off_t: sizes and sparse offsets
MAX_TIME = ((1 << 63) - 1) // 10**9  # seconds whose nanoseconds fit in 64 bits (the file writer's)
MIN_TIME = -MAX_TIME
_PAX_TIME = re.compile(rb"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def plain_files_available() -> bool:
    """Whether TarReader.plain_files can take anything (the C parser is built)."""
    return _plain_files is not None


class BinaryReader(Protocol):
    """What a TarReader reads from: a binary stream's read(n)."""

    def read(self, n: int, /) -> bytes: ...


class Entry:
    """One member: what applying it needs, nothing more."""

    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname",
                 "devmajor", "devminor", "xattrs", "sparse", "data_size")
    name: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int | Fraction  # seconds; a PAX time with a fraction is exact
    linkname: str
    devmajor: int
    devminor: int
    xattrs: Any  # () or [(name, value bytes)]
    sparse: list[tuple[int, int]] | None
    data_size: int

    def isdir(self) -> bool:
        return self.type == DIR

    def __repr__(self) -> str:
        return f"<Entry {self.type} {self.name!r}>"


def entry_of(fields: tuple) -> Entry:
    """The Entry of a plain header's fields, as _tarheader gives them."""
    e = Entry()
    (e.name, e.type, e.mode, e.uid, e.gid, e.size, e.mtime, e.linkname,
     e.devmajor, e.devminor, e.data_size) = fields
    e.xattrs = ()
    e.sparse = None
    return e


class _BadHeader(ValueError):
    pass


def _number(field):
    # int(..., 8) alone would take "-1", "+644", "0o644" and "0_644", which Go's
    # archive/tar (Docker's reader) refuses: only octal digits count.
    digits = field.strip(b" \0")  # the usual "0000644\0"
    if digits.isdigit():
        try:
            return int(digits, 8)
        except ValueError:  # an 8 or a 9
            pass
    return _unusual_number(field)


def _unusual_number(field):
    if field[:1] and field[0] & 0x80:  # GNU base-256 for values octal cannot hold
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 1 << (8 * (len(field) - 1))
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.isdigit():
        try:
            return int(text, 8)
        except ValueError:
            pass
    raise _BadHeader(f"bad number {bytes(field)!r}")


def _checksum_ok(block):
    try:
        stored = _number(block[148:156])
    except _BadHeader:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 256
    if unsigned == stored:
        return True
    # Some old tars summed signed chars.
    high = sum(1 for b in block if b & 0x80) - sum(1 for b in block[148:156] if b & 0x80)
    return unsigned - 256 * high == stored


def _text(field):
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _pax_time(value):
    """A PAX time (validated by _PAX_TIME): int seconds, or an exact Fraction when it
    has a fraction: a float would lose the nanoseconds Go's archive/tar keeps."""
    whole, dot, fraction = value.partition(b".")
    if not dot:
        return int(value)
    negative = whole.startswith(b"-")
    digits = whole.lstrip(b"-") + fraction
    number = Fraction(int(digits or b"0"), 10 ** len(fraction))
    return -number if negative else number


def _pax_records(data):
    """(key, raw value) pairs of a PAX extended header, in order (sparse 0.0 repeats keys)."""
    records = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos:pos + 1] == b"\0":
            break  # padding
        space = data.find(b" ", pos)
        if space < 0:
            raise UnpackError("malformed PAX header")
        length_text = data[pos:space]
        if not length_text.isdigit():  # int() would take "+12", " 12" or "1_2"
            raise UnpackError("malformed PAX header length")
        length = int(length_text)
        record = data[space + 1:pos + length]
        if length <= 0 or pos + length > end or not record.endswith(b"\n") or b"=" not in record:
            raise UnpackError("malformed PAX header record")
        key, _, value = record[:-1].partition(b"=")
        records.append((key.decode("utf-8", "surrogateescape"), value))
        pos += length
    return records


class TarReader:
    """Iterate over the entries of a tar stream (anything with read(n))."""

    def __init__(self, stream: BinaryReader, what: str = "layer") -> None:
        self._read = stream.read
        self._buf = b""
        self._pos = 0
        self._what = what
        self._globals: list[tuple[str, bytes]] = []
        self.pending = 0  # data bytes of the current entry the caller has not consumed
        self._pad = 0     # and the padding after them
        self._checked = False

    # ------------------------------------------------------------ buffer

    def _available(self, n):
        """Make n bytes available at _pos; False if the stream ends first."""
        have = len(self._buf) - self._pos
        if have >= n:
            return True
        parts = [self._buf[self._pos:]]
        while have < n:
            chunk = self._read(CHUNK)
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)
        self._pos = 0
        return have >= n

    def _take(self, n):
        if not self._available(n):
            raise UnpackError(f"{self._what}: the tar stream ends in the middle of an entry")
        start = self._pos
        self._pos += n
        return self._buf[start:self._pos]

    def _buffered(self):
        """How many bytes the buffer holds past _pos, refilled from the stream when none."""
        have = len(self._buf) - self._pos
        if have == 0:
            self._buf = self._read(CHUNK)
            self._pos = 0
            if not self._buf:
                raise UnpackError(f"{self._what}: the tar stream ends inside an entry's data")
            have = len(self._buf)
        return have

    def _skip(self, n):
        if self._pos + n <= len(self._buf):  # padding, mostly: in the buffer already
            self._pos += n
            return
        while n > 0:
            step = min(self._buffered(), n)
            self._pos += step
            n -= step

    def _padded(self, size):
        return self._take(size + (-size % BLOCK))[:size]

    # ------------------------------------------------------------ data

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next n data bytes of the current entry to fd."""
        if n > self.pending:
            raise UnpackError(f"{self._what}: an entry's sparse map claims more data than it has")
        self.pending -= n
        write = os.write
        while n > 0:
            step = min(self._buffered(), n)
            view = memoryview(self._buf)[self._pos:self._pos + step]
            while view:
                view = view[write(fd, view):]
            self._pos += step
            n -= step

    def read_data(self, n: int) -> bytes:
        if n > self.pending:
            raise UnpackError(f"{self._what}: an entry's sparse map claims more data than it has")
        self.pending -= n
        return self._take(n)

    def finish(self, limit: int) -> int:
        """Read what follows the end of the archive (once iteration stopped): its padding,
        which still counts for a layer's diffID. UnpackError past `limit` bytes, since an
        endless stream of padding would otherwise be read for ever."""
        extra = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while extra <= limit:
            chunk = self._read(CHUNK)
            if not chunk:
                return extra
            extra += len(chunk)
        raise UnpackError(f"{self._what}: more than {limit} bytes follow the tar's end-of-archive "
                          "marker (tar pads to 10 KiB records at most)")

    def plain_files(self, prefix: bytes, *args: Any) -> tuple[int, int, int]:
        """Take, at an entry boundary, the run of buffered plain small files named
        `prefix` + one plain component (see _tarheader.files, which `args` are for):
        (files taken, their data bytes, the bytes charged for them). (0, 0, 0) where
        the C parser is not built or PAX globals apply."""
        if _plain_files is None or self._globals:
            return 0, 0, 0
        if self.pending:
            self._skip(self.pending)
        if self._pad:
            self._skip(self._pad)
        self.pending = self._pad = 0
        self._pos, count, data_bytes, charged = _plain_files(self._buf, self._pos, prefix, *args)
        return count, data_bytes, charged

    # ------------------------------------------------------------ headers

    def __iter__(self) -> "TarReader":
        return self

    def __next__(self) -> Entry:
        # Whatever the caller left of the previous entry's data, and its padding.
        if self.pending:
            self._skip(self.pending)
        if self._pad:
            self._skip(self._pad)
        self.pending = self._pad = 0
        if _parse_plain is not None and not self._globals:
            # Most headers are plain (or after a PAX header of times alone): C parses
            # them, or answers None for the rest.
            self._available(BLOCK)
            parsed = _parse_plain(self._buf, self._pos)
            if parsed is not None:
                fields, self._pos = parsed
                self._checked = True
                e = Entry()
                (e.name, e.type, e.mode, e.uid, e.gid, e.size, e.mtime, e.linkname,
                 e.devmajor, e.devminor, data_size) = fields
                e.xattrs = ()
                e.sparse = None
                e.data_size = self.pending = data_size
                self._pad = -data_size % BLOCK
                return e
        try:
            entry = self._next_entry()
        except _BadHeader as exc:
            raise UnpackError(f"{self._what}: not a valid tar header ({exc})") from None
        if entry is None:
            raise StopIteration
        return entry

    def _block(self):
        if not self._available(BLOCK):
            if len(self._buf) - self._pos == 0:
                return None
            raise UnpackError(f"{self._what}: the tar stream ends inside a header")
        return self._take(BLOCK)

    def _next_entry(self):
        pax = []
        long_name = long_link = None
        while True:
            block = self._block()
            if block is None:
                return None  # a missing end marker is tolerated, as tar does
            if block == _ZERO_BLOCK:
                # The end is two zero blocks (or one, then the end of the stream). One
                # followed by a header would hide what comes after from GNU tar, which
                # stops there, while Go's archive/tar (Docker's) refuses the archive:
                # refused here too, since two readers would see two trees.
                after = self._block()
                if after is None or after == _ZERO_BLOCK:
                    return None
                raise UnpackError(f"{self._what}: a lone zero block inside the tar stream, "
                                  "followed by more headers (a damaged or crafted archive)")
            # The checksum tells a tar header from garbage; it proves nothing against a
            # crafted archive. Past the first header, ustar magic is taken as enough.
            if (self._checked and block[257:262] == b"ustar") or _checksum_ok(block):
                self._checked = True
            else:
                raise UnpackError(f"{self._what}: not a valid tar header (checksum mismatch)")
            kind = chr(block[156])
            size = _number(block[124:136])
            if kind in ("x", "g", "L", "K"):
                if size > _MAX_META:
                    raise UnpackError(f"{self._what}: a {size}-byte tar metadata header is too large")
                data = self._padded(size)
                if kind == "x":
                    pax.extend(_pax_records(data))
                elif kind == "g":
                    self._globals.extend(_pax_records(data))
                elif kind == "L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if kind == "V":  # a volume label names the archive, not a file
                self._skip(size + (-size % BLOCK))
                continue
            if self._globals:
                pax = self._globals + pax
            return self._entry(block, kind, size, pax, long_name, long_link)

    def _entry(self, block, kind, size, pax, long_name, long_link):
        e = Entry()
        if long_name is not None:
            name = long_name
        else:
            name = _text(block[0:100])
            if block[257:263] == b"ustar\0" and block[345] != 0:
                name = _text(block[345:500]) + "/" + name
        e.type = _REG_TYPES.get(kind, kind)
        e.mode = _number(block[100:108]) & 0o7777
        e.uid = _number(block[108:116])
        e.gid = _number(block[116:124])
        e.mtime = _number(block[136:148])
        e.linkname = long_link if long_link is not None else _text(block[157:257])
        e.devmajor = _number(block[329:337]) if kind in (CHR, BLK) else 0
        e.devminor = _number(block[337:345]) if kind in (CHR, BLK) else 0
        e.xattrs = ()
        e.sparse = None
        data_size = real_size = size
        sparse_pax = sparse_00 = None
        if pax:
            name, data_size, sparse_pax, sparse_00 = self._apply_pax(e, pax, name, size)
            real_size = data_size
        if e.type in _NO_DATA_TYPES:
            data_size = 0  # as tar does: only files (and unknown types) carry data
        elif e.type == REG and kind == "\0" and name.endswith("/"):
            e.type, data_size = DIR, 0  # pre-POSIX archives mark directories so
        if sparse_pax or sparse_00:
            name, real_size, data_size = self._pax_sparse(e, name, sparse_pax, sparse_00, data_size)
        elif kind == "S":
            real_size = self._old_gnu_sparse(e, block)
            e.type = REG
        if e.type == DIR:
            name = name.rstrip("/") or name
        if "\0" in name or "\0" in e.linkname or any("\0" in key for key, _ in e.xattrs):
            # Only PAX records can carry one; no system call takes such a name.
            raise UnpackError(f"{self._what}: entry {quoted(name)} has a NUL byte in a name")
        self._check_ranges(e, name, real_size, data_size)
        e.name = name
        e.size = real_size
        e.data_size = data_size
        self.pending = data_size
        self._pad = -data_size % BLOCK
        return e

    def _apply_pax(self, e, pax, name, size):
        """Fold PAX records into the entry; (name, data size, GNU sparse fields, sparse 0.0 map)."""
        xattrs = []
        sparse_pax = {}
        sparse_00 = []
        for key, value in pax:
            if key == "path":
                name = value.decode("utf-8", "surrogateescape")
            elif key == "linkpath":
                e.linkname = value.decode("utf-8", "surrogateescape")
            elif key in _PAX_NUMBERS:
                number = self._decimal(value, f"PAX {key}")
                if key == "size":
                    size = number
                elif key == "uid":
                    e.uid = number
                else:
                    e.gid = number
            elif key == "mtime":
                if not _PAX_TIME.fullmatch(value):
                    raise UnpackError(f"{self._what}: bad PAX mtime={quoted(value)}")
                if len(value.partition(b".")[0]) > 20:  # more than time_t has; else _check_ranges
                    raise UnpackError(f"{self._what}: PAX mtime={quoted(value)} out of range")
                e.mtime = _pax_time(value)
            elif key.startswith("SCHILY.xattr."):
                xattrs.append((key[13:], value))
            elif key in ("GNU.sparse.offset", "GNU.sparse.numbytes"):
                sparse_00.append(self._decimal(value, f"PAX {key}"))
            elif key.startswith("GNU.sparse."):
                sparse_pax[key[11:]] = value
        e.xattrs = xattrs or ()  # () as for a plain header (and _tarheader's)
        return name, size, sparse_pax, sparse_00

    def _decimal(self, value, what):
        """A decimal of PAX or a sparse map that fits in 63 bits, else UnpackError."""
        if not value.isdigit():  # bytes: ASCII digits only, no sign, space or "_"
            if value[:1] == b"-" and value[1:].isdigit():
                raise UnpackError(f"{self._what}: {what} {quoted(value)} out of range")
            raise UnpackError(f"{self._what}: bad {what} {quoted(value)}: expected a decimal number")
        digits = value.lstrip(b"0")
        if len(digits) > 19 or int(digits or b"0") > MAX_OFFSET:
            raise UnpackError(f"{self._what}: {what} {quoted(value)} out of range")
        return int(digits or b"0")

    def _check_ranges(self, e, name, real_size, data_size):
        """Refuse numbers no system call takes, before anything is made of the entry."""
        if not (0 <= e.uid <= MAX_ID and 0 <= e.gid <= MAX_ID):
            raise UnpackError(f"{self._what}: entry {quoted(name)}: uid/gid {e.uid}/{e.gid} "
                              f"out of range (0 to {MAX_ID})")
        if not MIN_TIME <= e.mtime <= MAX_TIME:
            raise UnpackError(f"{self._what}: entry {quoted(name)}: mtime "
                              f"{e.mtime if isinstance(e.mtime, int) else float(e.mtime)} out of range "
                              f"({MIN_TIME} to {MAX_TIME})")
        if not (0 <= real_size <= MAX_OFFSET and 0 <= data_size <= MAX_OFFSET):
            raise UnpackError(f"{self._what}: entry {quoted(name)}: size {real_size} out of range")
        if e.type in (CHR, BLK) and not (0 <= e.devmajor <= MAX_DEV and 0 <= e.devminor <= MAX_DEV):
            raise UnpackError(f"{self._what}: entry {quoted(name)}: device {e.devmajor},{e.devminor} "
                              f"out of range (0 to {MAX_DEV})")
        if e.sparse:
            for offset, size in e.sparse:
                if not (0 <= offset <= MAX_OFFSET and 0 <= size <= MAX_OFFSET - offset):
                    raise UnpackError(f"{self._what}: entry {quoted(name)}: sparse region "
                                      f"{offset}+{size} out of range")

    def _pax_sparse(self, e, name, fields, flat_map, data_size):
        if "name" in fields:
            name = fields["name"].decode("utf-8", "surrogateescape")
        real = fields.get("realsize") or fields.get("size")
        if real:
            real = self._decimal(real, "GNU sparse real size")
        if fields.get("major") == b"1":
            # 1.0: the map is text at the start of the data: count, then offset/size lines.
            flat_map, used = self._sparse_map_text(data_size)
            data_size -= used
        elif "map" in fields:
            flat_map = [self._decimal(x, "GNU sparse map number") for x in fields["map"].split(b",") if x]
        if len(flat_map) % 2:
            raise UnpackError(f"{self._what}: entry {quoted(name)}: a GNU sparse map of "
                              f"{len(flat_map)} numbers, not offset/size pairs")
        e.sparse = list(zip(flat_map[0::2], flat_map[1::2]))
        e.type = REG
        return name, real if real else data_size, data_size

    def _sparse_map_text(self, data_size):
        numbers = []
        used = 0
        count = None
        line = b""
        while count is None or len(numbers) < 2 * count:
            if used >= min(data_size, _MAX_META):
                raise UnpackError(f"{self._what}: malformed GNU sparse 1.0 map")
            block = self._take(BLOCK)
            used += BLOCK
            for piece in (line + block).split(b"\n")[:-1]:
                if count is None:
                    count = self._decimal(piece, "GNU sparse 1.0 map count")
                else:
                    numbers.append(self._decimal(piece, "GNU sparse 1.0 map number"))
            line = (line + block).rsplit(b"\n", 1)[-1]
        return numbers[:2 * count], used

    def _old_gnu_sparse(self, e, block):
        pairs = []

        def read_pairs(area, n):
            for i in range(n):
                off = _number(area[i * 24:i * 24 + 12])
                size = _number(area[i * 24 + 12:i * 24 + 24])
                if off or size:
                    pairs.append((off, size))

        read_pairs(block[386:482], 4)
        extended = block[482]
        while extended:
            if len(pairs) > _MAX_META // 24:
                raise UnpackError(f"{self._what}: an old GNU sparse map is too long")
            ext = self._take(BLOCK)
            read_pairs(ext[0:504], 21)
            extended = ext[504]
        e.sparse = pairs
        return _number(block[483:495])
