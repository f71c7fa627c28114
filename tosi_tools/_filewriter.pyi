# The interface of the C extension built from _filewriter.c (see filewriter.py).
from collections.abc import Sequence

# (dir_fd, name, data, mode, flags, uid, gid, mtime_ns)
Task = tuple[int, bytes, bytes, int, int, int, int, int]

class Writer:
    def submit(self, tasks: Sequence[Task], fds: Sequence[int], /) -> None: ...
    def wait(self) -> tuple[int, int] | None: ...
    def close(self) -> None: ...
