# The interface of the C extension built from _tarheader.c (see tarstream.py).
from typing import Any

# (name, type, mode, uid, gid, size, mtime, linkname, devmajor, devminor, data_size)
Fields = tuple[str, str, int, int, int, int, int, str, int, int, int]

def parse(buf: bytes, pos: int, /) -> Fields | None: ...

# (new pos, files taken, their data bytes, bytes charged); see _tarheader.c
def files(buf: bytes, pos: int, prefix: bytes, max_files: int, max_bytes: int, max_size: int,
          room_bytes: int, room_inodes: int, dir_fd: int, canonical: tuple[str, ...], as_root: bool,
          chown_all: bool, euid: int, egid: int, umask: int,
          into: tuple[list[Any], list[Any], set[Any], set[Any] | None], /) -> tuple[int, int, int, int]: ...
