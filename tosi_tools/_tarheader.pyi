# The interface of the C extension built from _tarheader.c (see tarstream.py).

# (name, type, mode, uid, gid, size, mtime, linkname, devmajor, devminor, data_size)
Fields = tuple[str, str, int, int, int, int, int, str, int, int, int]

def parse(buf: bytes, pos: int, /) -> Fields | None: ...
