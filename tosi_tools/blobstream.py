"""Read a blob while it downloads: the bytes behind a BlobDownload, as a binary stream.

The downloader hashes the bytes as it writes them to the partial file, so a
reader following it gets the blob in one pass over the network and is verified
on that same pass: it returns the end of the stream (b"") only once the download
has checked size and digest, and raises the download's error instead if it did
not. A consumer that reads to the end (the layer extraction does) therefore
cannot finish on bytes that turn out to be wrong; it must publish nothing
before that end.

The reader never reads past `written`, which the downloader never moves back
within one generation of the download (a server that will not resume is read
again from the start, passing over the bytes already there). Should the file
still hold fewer bytes than that, the reader waits and reads them again, from
whatever file then holds them: a blob is content-addressed, the same bytes lie
at each offset whatever the attempt, and the digest catches it if they do not.

When the digest does catch it, the downloader starts the blob over from byte 0
(a new generation) and the reader raises `blobs.Restarted`: its consumer read
wrong bytes and must start over with a new reader. A consumer may also fail on
wrong bytes before the download's verdict (a gzip CRC, a tar header checksum):
`bad_bytes()` then waits for that verdict and tells whether the bytes were to
blame. `DownloadStreams` does so for the layers of a pull, so that
`pipeline.pull` redoes such a layer instead of failing.
"""

import io
import os
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from .blobs import BlobDownload, Cancelled, Restarted
from .cache import DropBehind
from .digest import CHUNK
from .errors import CacheError, TosiError

if TYPE_CHECKING:
    from .fetch import LayerHandle
    from .plan import LayerRecord

POLL_SECONDS = 0.05  # how quickly a blocked read notices interrupt()
MIN_READ = 64 << 10  # read(n) waits for this much (or n, or the end), then takes what is there


class FollowingReader(io.RawIOBase):
    """The bytes of `download` (a blobs.BlobDownload) as they arrive, then its verdict.

    `readinto` delivers what is there (at least one byte, waiting if need be);
    `read(n)` waits for min(n, MIN_READ) bytes unless the blob ends first (so a
    short head is never mistaken for a whole blob), then gives what is there, up
    to n: the consumer gets the bytes as they come. At the end of the blob both
    wait for the download's verdict before returning b"". Both raise the
    download's error if it fails, and `Cancelled` once `interrupt()` was called
    (from any thread) while they would have to wait.
    """

    def __init__(self, download: BlobDownload, on_interrupt: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self._download = download
        self._on_interrupt = on_interrupt
        self._pos = 0
        self._file: Optional[Any] = None
        self._dropping: Optional[DropBehind] = None
        self._interrupted = threading.Event()
        self._generation: Optional[int] = None  # of the download, fixed by the first byte read
        self.ended = False  # the whole blob was read and verified

    def readable(self) -> bool:
        return True

    def cached_path(self) -> Optional[str]:
        """The cache file the bytes came from when the blob was already cached (no
        download ran), else None: a layer that fails from such bytes is worth a check
        of the cached blob (unpack quarantines a corrupt one)."""
        return self._download.final_path if self._download.reused else None

    def interrupt(self) -> None:
        """Make a read blocked on the download (now or later) give up with Cancelled;
        the consumer calls it when it gives up early (and `on_interrupt()` is told)."""
        self._interrupted.set()
        if self._on_interrupt is not None:
            self._on_interrupt()

    def read(self, n: Optional[int] = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        parts: list[bytes] = []
        floor = min(n, MIN_READ)
        # Short only at the end of the blob, whose verdict the next read waits for.
        while floor > 0 and not (parts and self._pos >= self._download.size):
            buffer = bytearray(min(n, CHUNK))
            got = self.readinto(buffer)
            if not got:
                break
            parts.append(bytes(memoryview(buffer)[:got]))
            n -= got
            floor -= got
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        want = len(buffer)
        if want == 0:
            return 0
        size = self._download.size
        while True:
            if self._pos >= size:
                self._wait(size + 1)  # the verdict: raises unless the blob verified
                self._close_file()
                self.ended = True
                return 0
            written = self._wait(self._pos + 1)
            if self._file is None:
                if not self._open():
                    continue
            assert self._file is not None
            view = memoryview(buffer)[:min(want, written - self._pos)]
            count = os.preadv(self._file.fileno(), [view], self._pos)
            if count:
                self._pos += count
                if self._dropping is not None:
                    self._dropping.passed(self._pos)
                return count
            if self._download.generation != self._generation:
                continue  # the blob started over: the next wait says so
            if self._download.done:
                raise CacheError(f"{self._download.what}: {self._download.final_path} is shorter "
                                 f"than its {size} bytes")
            # Fewer bytes than `written` said: wait for them again, in whatever file
            # then holds them.
            self._close_file()

    def _wait(self, offset: int) -> int:
        """Block until `offset` bytes are in the partial file or the download ended."""
        download = self._download
        while True:
            if self._interrupted.is_set():
                self._close_file()
                raise Cancelled(f"{download.what}: reading stopped")
            if self._pos == 0:
                # Nothing read yet: a restart of the blob before this reader began is no harm.
                self._generation = download.generation
            try:
                written = download.wait_for(offset, timeout=POLL_SECONDS, generation=self._generation)
            except BaseException:
                self._close_file()
                raise
            if written >= offset or download.done:
                return written

    def bad_bytes(self) -> bool:
        """After the consumer failed: wait for the download's verdict on the bytes this
        reader gave; True if they were wrong (the blob is downloading again from byte 0,
        and the consumer should start over with a new reader), False if they were
        right or nothing was read. Raises the download's error if it failed (Cancelled
        included): that error, not the consumer's, says what went wrong."""
        if self.ended or self._generation is None:
            return False
        return self._download.settled(self._generation)

    def _open(self) -> bool:
        """Open the file holding the bytes; False if there is none yet."""
        self._close_file()
        download = self._download
        # The final name is trusted only once verified: before that it may be a stale
        # file the downloader is about to check and replace.
        done = download.done
        try:
            self._file = open(download.final_path if done else download.partial_path, "rb", buffering=0)
            self._dropping = DropBehind(self._file.fileno())
        except FileNotFoundError:
            if done:
                raise CacheError(f"{download.what}: {download.final_path} vanished") from None
            # Not made yet, or renamed into place just before the verdict: look again soon.
            self._interrupted.wait(POLL_SECONDS)
            return False
        return True

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._dropping = None

    def close(self) -> None:
        self._close_file()
        super().close()


def following(download: BlobDownload, on_interrupt: Optional[Callable[[], None]] = None,
              ) -> Optional[FollowingReader]:
    """A FollowingReader of `download`, or None if its blob is already verified in the
    cache (then read the cached file itself)."""
    if download.done:
        download.result()  # raises the download's error
        return None
    return FollowingReader(download, on_interrupt)


class DownloadStreams:
    """The blobs of a fetch in flight for unpack's `open_stream(record)`: collect the
    LayerHandles with `add` (fetch.fetch_plan's `early`), then `open(record)` gives a
    layer's blob as it arrives, or None once it is verified in the cache.

    The first reader whose consumer gives up early calls `cancel()` (stop the
    downloads: the other layers would wait for theirs in vain) and keeps the
    error it gave up on as `failure`, the cause the others' cancellations hide;
    unless the bytes it read turn out wrong (the download's verdict is awaited
    first) and the blob is downloading again: then nothing is cancelled, and
    `bad_bytes_read()` tells the caller to unpack that layer again.
    """

    def __init__(self, cancel: Optional[Callable[[], None]] = None) -> None:
        self._downloads: dict[int, BlobDownload] = {}
        self._cancel = cancel
        self._lock = threading.Lock()
        self._readers: list[FollowingReader] = []
        self._reader_of: dict[int, FollowingReader] = {}  # by layer index, the last opened
        self.failure: Optional[BaseException] = None

    def add(self, handle: "LayerHandle") -> None:
        self._downloads[handle.record.index] = handle.download

    def open(self, record: "LayerRecord") -> Optional[FollowingReader]:
        opened: list[FollowingReader] = []
        reader = following(self._downloads[record.index], on_interrupt=lambda: self._gave_up(opened[0]))
        with self._lock:
            if reader is None:  # the cached blob is read
                self._reader_of.pop(record.index, None)
            else:
                opened.append(reader)
                self._readers.append(reader)
                self._reader_of[record.index] = reader
        return reader

    def bad_bytes_read(self) -> bool:
        """After a failed unpack: True if a reader not read to its verified end gave
        bytes that turned out wrong (the consumer's failure is then no verdict on the
        layer: unpack it again, from new readers). Waits for those verdicts, and
        forgets the readers opened so far."""
        with self._lock:
            readers, self._readers = self._readers, []
        bad = False
        for reader in readers:
            try:
                bad = reader.bad_bytes() or bad
            except TosiError:
                pass  # the download failed: that failure is reported, not redone
        return bad

    def layer_failed(self, record: "LayerRecord", error: BaseException) -> None:
        """unpack's `on_failure`: the layer of `record` failed with `error`. A layer
        whose blob came from the cache, or whose reader had read to the end before the
        consumer gave up, has no reader to say so: stop the downloads as a reader
        that gave up does (the same verdict; twice is harmless)."""
        with self._lock:
            reader = self._reader_of.get(record.index)
        self._stop_for(error, reader)

    def _gave_up(self, reader: FollowingReader) -> None:
        # Called while the consumer's error propagates (from its cleanup): that is the cause.
        self._stop_for(sys.exc_info()[1], reader)

    def _stop_for(self, error: Optional[BaseException], reader: Optional[FollowingReader]) -> None:
        if isinstance(error, Exception) and not isinstance(error, Cancelled):
            try:
                if isinstance(error, Restarted) or (reader is not None and reader.bad_bytes()):
                    return  # the layer is unpacked again; the other downloads go on
            except Cancelled:
                pass
            except TosiError as exc:
                error = exc  # the download's own failure explains the consumer's
            with self._lock:
                if self.failure is None:
                    self.failure = error
        if self._cancel is not None:
            self._cancel()
