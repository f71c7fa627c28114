"""Decompressing readers for layer blobs: gzip, zstd or plain tar.

The compression comes from the layer's media type and is checked against the
blob's magic bytes, so a mislabelled blob is an error instead of garbage fed to
the tar reader. Decompression runs in its own thread (zlib, isal and zstd drop
the GIL while they work) and hands bounded chunks to the reader, which is also
where the decompressed size is capped: a decompression bomb stops with an
UnpackError long before it fills a disk or the memory. The same thread hashes
the decompressed bytes when asked (the layer's diffID), so checking it costs no
second pass; hashlib drops the GIL too.

A gzip blob may hold several members: they decompress to their concatenation,
as gzip(1) and Go's reader have it.
"""

import gzip
import queue
import threading
import types
from typing import Any

import zstandard

from .digest import CHUNK
from .errors import MediaTypeMismatch, UnpackError, quoted

_gzip_module: types.ModuleType
_IsalError: type[Exception]
try:  # the isal gzip decoder is several times faster than zlib's
    from isal import igzip as _gzip_module
    from isal.igzip_lib import IsalError as _IsalError  # type: ignore[assignment]  # isal's stub: an instance
except ImportError:  # pragma: no cover - isal is a dependency where it has wheels (setup.cfg); zlib elsewhere
    _gzip_module = gzip
    _IsalError = OSError  # caught already

GZIP, ZSTD, TAR = "gzip", "zstd", "tar"
QUEUE_CHUNKS = 8
_HEAD = 512

_MAGIC = [
    (GZIP, b"\x1f\x8b"),
    (ZSTD, b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("xz", b"\xfd7zXZ\x00"),
]


def compression_of(media_type: str | None) -> str:
    """gzip, zstd or tar for a layer media type (OCI or Docker); UnpackError for others."""
    mt = (media_type or "").strip().lower()
    if mt.endswith(("+gzip", ".tar.gzip")):
        return GZIP
    if mt.endswith("+zstd"):
        return ZSTD
    if mt.endswith((".tar", "layer.v1.tar")) or mt in ("application/x-tar",):
        return TAR
    raise UnpackError(f"unsupported layer media type {quoted(media_type)} "
                      "(known: gzip, zstd and uncompressed tar layers)")


def sniff(head: bytes) -> str:
    """The compression the first bytes of a blob show ("tar" when none is recognised)."""
    for name, magic in _MAGIC:
        if head.startswith(magic):
            return name
    # A zstd stream may open with a skippable frame (magic 0x184D2A50 to 0x184D2A5F,
    # little-endian), as seekable-zstd and other framing tools write.
    if head[:1] and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return ZSTD
    return TAR


class _Prefixed:
    """A stream with some bytes already read from it put back in front."""

    def __init__(self, head, stream):
        self._head = head
        self._stream = stream

    def read(self, n=-1):
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._stream.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._stream.read(n)

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _ZstdReader:
    def __init__(self, stream):
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            stream, read_size=CHUNK, read_across_frames=True)

    def read(self, n):
        return self._reader.read(n)


class DecompressedStream:
    """The decompressed bytes of a blob, produced by a background thread.

    `read(n)` returns at most n bytes, b"" at the end. Errors of the
    decompressor (corrupt data, the size cap) surface as UnpackError from
    `read`. `hasher` (anything with update(bytes)) is fed every decompressed
    byte by the thread; it has seen the whole stream once `read` has returned
    b"". Always `close()` it, which stops the thread.
    """

    def __init__(self, decoder: Any, what: str, max_bytes: int | None = None, hasher: Any = None,
                 source: Any = None) -> None:
        self._decoder = decoder
        self._source = source  # the blob stream, if it can be interrupted (a download in flight)
        self._what = what
        self._max_bytes = max_bytes
        self._hasher = hasher
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._done = False
        self.total = 0
        self._thread = threading.Thread(target=self._produce, name=f"decompress {what}", daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        total = 0
        try:
            while not self._stop.is_set():
                chunk = self._decoder.read(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if self._max_bytes is not None and total > self._max_bytes:
                    raise UnpackError(
                        f"{self._what}: decompresses to more than {self._max_bytes} bytes "
                        "(the cap for one layer; see TOSI_MAX_LAYER_BYTES)")
                if self._hasher is not None:
                    self._hasher.update(chunk)
                if not self._put(chunk):
                    return
            self._put(None)
        except UnpackError as exc:
            self._put(exc)
        except (OSError, EOFError, zstandard.ZstdError, ValueError, _IsalError) as exc:
            # zlib/isal raise OSError subclasses or EOFError for corrupt or truncated data,
            # isal also its own IsalError (an invalid deflate block)
            self._put(UnpackError(f"{self._what}: corrupt or truncated compressed data ({exc})"))
        except Exception as exc:  # delivered to the reader rather than lost in this thread
            self._put(exc)

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            parts: list[bytes] = []
            while True:
                chunk = self.read(CHUNK)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        while self._pos >= len(self._buf):
            if self._done:
                return b""
            item = self._queue.get()
            if item is None:
                self._done = True
                return b""
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._buf, self._pos = item, 0
            self.total += len(item)
        start = self._pos
        end = min(start + n, len(self._buf))
        self._pos = end
        if start == 0 and end == len(self._buf):
            return self._buf
        return self._buf[start:end]

    def drain(self) -> None:
        """Read to the end of the stream, discarding: what follows a tar's end marker
        still counts for the diffID, and a compressed stream is only checked whole."""
        self._buf, self._pos = b"", 0
        while self.read(CHUNK):
            pass

    def close(self) -> None:
        self._stop.set()
        interrupt = getattr(self._source, "interrupt", None)
        if interrupt is not None and not self._done:
            interrupt()  # else a blob still downloading would hold the thread until its next bytes
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()
        closer = getattr(self._decoder, "close", None)
        if closer:
            try:
                closer()
            except Exception:
                pass

    def __enter__(self) -> "DecompressedStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_layer(stream: Any, media_type: str | None, what: str = "layer", max_bytes: int | None = None,
               hasher: Any = None) -> DecompressedStream:
    """A DecompressedStream over a layer blob read from `stream` (any binary reader).

    The media type names the compression; the magic bytes must agree with it.
    `hasher` is fed the decompressed bytes (see DecompressedStream).
    """
    expected = compression_of(media_type)
    head = stream.read(_HEAD)
    found = sniff(head)
    if head and found != expected:
        said = "uncompressed tar" if expected == TAR else expected
        shown = "not compressed" if found == TAR else f"{found}-compressed"
        raise MediaTypeMismatch(f"{what}: media type {media_type} says {said}, but the blob is {shown}",
                                media_type=media_type, expected=said, found=shown)
    source = _Prefixed(head, stream)
    decoder: Any
    if not head:
        decoder = source  # an empty blob: an empty layer whatever its type
    elif expected == GZIP:
        decoder = _gzip_module.GzipFile(fileobj=source, mode="rb")
    elif expected == ZSTD:
        decoder = _ZstdReader(source)
    else:
        decoder = source
    return DecompressedStream(decoder, what, max_bytes, hasher, source=stream)
