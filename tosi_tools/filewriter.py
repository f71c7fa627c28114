"""Small regular files created by a C thread, beside the Python code that parses the layer.

For a layer of many small files the system calls that create each one (open,
write, fchown, utimensat, close) cost about as much as parsing its header in
Python. A Python thread cannot overlap the two, since it must take the GIL
back after every call; the thread of the `_filewriter` extension is plain C
and takes batches of files, so it can. Without the extension (it is built when
a C compiler is there, and is optional) `available()` is False and appliers
write every file themselves.

Safety stays with the applier (layer.FileQueue drives this): the thread gets directory handles the applier
resolved inside the root (duplicated per batch, so they remain the same open
directories whatever the applier's cache closes), single-component names, and
creates each file with O_CREAT|O_EXCL|O_NOFOLLOW as the applier would. Order
stays with it too: it calls `sync()` before any entry that is not such a file.

The thread stops at the first failure (a name that exists, ENOSPC, ...) and
skips the rest until the next sync, which hands back that task and all after
it for the applier to redo, in order, through its own code path and error
handling. So the thread never has to know what a failure means.
"""

from __future__ import annotations

import os
import sys
from typing import Any

try:
    from . import _filewriter
except ImportError:  # pragma: no cover - depends on a C compiler at install time
    _filewriter = None  # type: ignore[assignment]  # available() says so

# os.fsencode's arguments, for a cheaper call of str.encode per file
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
CHOWN, CHMOD = 1, 2
MAX_FILE = 64 << 10      # bigger files are written by the applier itself
_BATCH_FILES = 32
_FIRST_BATCH_FILES = 4   # after a sync the thread is idle: give it work soon, then in bigger batches
_BATCH_BYTES = 512 << 10
# What may wait for a sync (its data is held until then): bounded, so memory does
# not grow with the layer.
_BACKLOG_FILES = 2048
_BACKLOG_BYTES = 4 << 20


def available() -> bool:
    """Whether files can go to the C thread (TOSI_FILE_WRITER=0 turns it off)."""
    return _filewriter is not None and os.environ.get("TOSI_FILE_WRITER", "1") != "0"


def make_dir(dir_fd: int, name: str, mode: int, uid: int, gid: int, chown: bool) -> bool:
    """Make the directory `name` in `dir_fd` (with `chown`, owned by uid:gid) without
    letting go of the GIL (see _filewriter.c); False, having made nothing, where the
    extension is not built or `name` exists: the caller's own code handles those."""
    if _filewriter is None:
        return False
    try:
        _filewriter.make_dir(dir_fd, name, mode, uid, gid, chown)
    except FileExistsError:
        return False
    return True


class FileWriter:
    """The applier's side: `add()` files, `sync()` to learn which ones it must redo."""

    def __init__(self) -> None:
        self._writer = _filewriter.Writer()
        self._tasks: list[Any] = []  # the caller's task objects since the last sync, in order
        self._batch: list[Any] = []
        self._bytes = 0
        self._dups: dict[int, int] = {}  # caller's dir fd -> our duplicate, for the batch being built
        self._limit = _FIRST_BATCH_FILES
        self._backlog_bytes = 0

    def add(self, dir_fd: int, base: str, data: bytes, mode: int, flags: int, uid: int, gid: int,
            mtime_ns: int, task: Any) -> None:
        """Queue one file; `task` is what sync() hands back if it must be redone."""
        dup = self._dups.get(dir_fd)
        if dup is None:
            dup = self._dups[dir_fd] = _filewriter.dup(dir_fd)
        self._batch.append((dup, base.encode(_FS_ENCODING, _FS_ERRORS), data, mode, flags, uid, gid, mtime_ns))
        self._tasks.append(task)
        self._bytes += len(data)
        self._backlog_bytes += len(data)
        if len(self._batch) >= self._limit or self._bytes >= _BATCH_BYTES:
            self._submit()
            self._limit = min(2 * self._limit, _BATCH_FILES)

    def add_run(self, dir_fd: int, take: Any) -> int:
        """Queue files made elsewhere (tarstream.TarReader.plain_files), all in `dir_fd`:
        `take(dup, batch, tasks, max_files, max_bytes)` appends at most max_files of them
        to `batch` (add's tuples, with `dup` as their directory) and their tasks to
        `tasks`, stopping once their data reaches max_bytes, and returns (files, data
        bytes). How many it queued."""
        dup = self._dups.get(dir_fd)
        if dup is None:
            dup = self._dups[dir_fd] = _filewriter.dup(dir_fd)
        max_files = min(self._limit - len(self._batch), _BACKLOG_FILES - len(self._tasks))
        max_bytes = min(_BATCH_BYTES - self._bytes, _BACKLOG_BYTES - self._backlog_bytes)
        if max_files <= 0 or max_bytes <= 0:
            return 0
        count, nbytes = take(dup, self._batch, self._tasks, max_files, max_bytes)
        self._bytes += nbytes
        self._backlog_bytes += nbytes
        if len(self._batch) >= self._limit or self._bytes >= _BATCH_BYTES:
            self._submit()
            self._limit = min(2 * self._limit, _BATCH_FILES)
        return count

    def _submit(self):
        if not self._batch:
            return
        batch, dups = self._batch, list(self._dups.values())
        self._batch, self._bytes, self._dups = [], 0, {}
        try:
            self._writer.submit(batch, dups)  # the thread closes the dups after the batch
        except BaseException:
            for dup in dups:
                os.close(dup)
            raise

    @property
    def full(self) -> bool:
        """Whether the caller should sync now: enough is held for redoing."""
        return len(self._tasks) >= _BACKLOG_FILES or self._backlog_bytes >= _BACKLOG_BYTES

    def sync(self) -> list:
        """Wait until the thread has done everything queued; the tasks it did not do."""
        self._submit()
        failed = self._writer.wait()
        tasks, self._tasks = self._tasks, []
        self._limit = _FIRST_BATCH_FILES
        self._backlog_bytes = 0
        return tasks[failed[0]:] if failed is not None else []

    def close(self) -> None:
        """Let the thread finish what is queued, then stop it (what failed is not redone)."""
        try:
            self._submit()
        finally:
            self._writer.close()
            self._tasks = []
