# The interface of the C extension built from _tarheader.c (see tarstream.py).
from typing import Any

from fractions import Fraction

# (name, type, mode, uid, gid, size, mtime, linkname, devmajor, devminor, data_size);
# mtime a Fraction where a PAX header of times gave one with a fraction
Fields = tuple[str, str, int, int, int, int, int | Fraction, str, int, int, int]

# (fields, where the entry's data starts: past its header and a PAX header of times before it)
def parse(buf: bytes, pos: int, /) -> tuple[Fields, int] | None: ...

# (new pos, files taken, their data bytes, bytes charged); see _tarheader.c
def files(buf: bytes, pos: int, prefix: bytes, max_files: int, max_bytes: int, max_size: int,
          room_bytes: int, room_inodes: int, dir_fd: int, canonical: tuple[str, ...], as_root: bool,
          chown_all: bool, euid: int, egid: int, umask: int,
          into: tuple[list[Any], list[Any], set[Any], set[Any] | None], /) -> tuple[int, int, int, int]: ...
