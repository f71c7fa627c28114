"""Download one blob into the cache: streamed hashing, resume, retries, redirects, locking.

A blob goes to `<final>.partial` while it arrives and is renamed to `<final>`
only once its size and digest check out, so the cache never holds a bad blob
under its name. The partial file survives a failed attempt (and a killed
process): the next attempt hashes what is there and asks for the rest with a
Range request (a server that will not give a range sends the whole, and the
bytes we have are passed over). A per-blob fcntl lock makes concurrent
processes wait for each other instead of downloading the same bytes twice.

A blob whose bytes do not match its digest (a byte flipped by a proxy or a CDN
edge, a server sending more than the descriptor's size) is discarded and
downloaded again from byte 0, never resumed: at most DIGEST_RETRIES more times
(2, so three downloads in all; a check of bytes an earlier run left in the
partial file does not count). Then the download fails naming the blob and what
each attempt hashed to. The verified file is fsynced before it is renamed into
place and its directory after, so after a power loss a blob under its final
name is whole; the disk is started on it every WRITEBACK_STEP bytes as they
arrive, so that fsync finds little left to write.

A BlobDownload can be watched while it runs (`wait_for`), so a consumer may
read the partial file behind the writer; bytes it reads are not verified until
`result()` returns. A restart from 0 starts a new `generation`: a watcher of
an older one gets `Restarted` (it read bad bytes and must start over).
"""

import contextlib
import logging
import os
import threading
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

from . import space
from .cache import Workdir, file_lock, fsync_dir, fsync_path, require_cached, start_writeback
from .digest import CHUNK, DIGEST_RETRIES, Digest, VerifyingHasher, verify_file
from .errors import (  # Cancelled: its home was here, callers still import it from here
    CacheError, Cancelled, DigestMismatch, NotFound, RegistryError, TosiError, Unreachable, quoted,
)
from .registry import BlobSource, RangeRefused, RegistryBlobSource, URLBlobSource
from .transport import BACKOFF_BASE, RetryPolicy, Temporary, rewrap

log = logging.getLogger("tosi.blobs")

__all__ = ["BlobDownload", "Cancelled", "DIGEST_RETRIES", "Downloader", "Restarted"]
# The disk is started on each this many bytes of a blob as they arrive (cache.start_writeback).
WRITEBACK_STEP = 8 << 20


class Restarted(DigestMismatch):
    """The bytes a watcher read turned out wrong; the blob is downloading again from 0."""


class _WholeBlob(Temporary):
    """The server will not continue the partial file: ask for the whole blob and
    pass over the bytes we have, so what was written stays (and is verified)."""


class BlobDownload:
    """One blob on its way into the cache; observable by other threads while it runs.

    `written` counts the bytes of the blob present in `partial_path` (in order,
    from offset 0); `wait_for(offset)` blocks until that many are there, or the
    download ends. `result()` gives the verified final path or raises its error.
    Within one `generation`, `written` never goes back. When the bytes turn out
    not to match the digest and the blob is downloaded again from 0, `restarts`
    and `generation` count up and `written` goes back to 0; `wait_for(...,
    generation=g)` of an older generation then raises `Restarted`.
    """

    def __init__(self, digest: str, size: int, final_path: str, what: Optional[str] = None,
                 urls: Iterable[str] = ()) -> None:
        self.digest = Digest(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CacheError(f"{what or self.digest}: descriptor has no valid size ({quoted(size)})")
        self.size = size
        self.final_path = final_path
        self.partial_path = Workdir.partial_of(final_path)
        self.lock_path = Workdir.lock_of(final_path)
        self.what = what or f"blob {self.digest}"
        self.urls = [u for u in urls or () if isinstance(u, str) and urlsplit(u).scheme in ("http", "https")]
        self.reused = False
        self.served_by: Optional[str] = None  # the endpoint (or URL) that sent the bytes; None: cached
        self.restarts = 0
        self._whole = False  # ask without Range (the server did not honour one)
        self._cond = threading.Condition()
        self._written = 0
        self._generation = 0
        self._restart_reason = None
        self._done = False
        self._error = None

    def __repr__(self):
        return f"BlobDownload({self.digest}, {self.written}/{self.size}, done={self._done})"

    @property
    def written(self) -> int:
        with self._cond:
            return self._written

    @property
    def generation(self) -> int:
        """Counts the restarts from byte 0 (bytes of an older generation were wrong)."""
        with self._cond:
            return self._generation

    @property
    def done(self) -> bool:
        with self._cond:
            return self._done

    def wait_for(self, offset: int, timeout: Optional[float] = None, generation: Optional[int] = None) -> int:
        """Block until `offset` bytes are in the partial file, or the download ended;
        return how many are there. Raises the download's error if it failed, and
        `Restarted` if `generation` is given and the blob started over since. Waiting
        past `size` is waiting for the verdict (use `result()` for the final path)."""
        with self._cond:
            self._cond.wait_for(lambda: self._written >= offset or self._done
                                or (generation is not None and generation != self._generation), timeout)
            if generation is not None and generation != self._generation:
                raise Restarted(self._restart_reason)
            if self._error is not None:
                raise self._error
            return self._written

    def settled(self, generation: int, timeout: Optional[float] = None) -> bool:
        """Block until the bytes of `generation` are judged: True if they were wrong and
        the blob is downloading again, False once verified; raises the download's error
        (its last verdict, or Cancelled)."""
        with self._cond:
            self._cond.wait_for(lambda: self._done or generation != self._generation, timeout)
            if generation != self._generation:
                return True
            if not self._done:
                raise TimeoutError(f"{self.what}: still downloading")
            if self._error is not None:
                raise self._error
            return False

    def result(self, timeout: Optional[float] = None) -> str:
        """The final cache path once the blob is verified; raises the download's error."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"{self.what}: still downloading")
            if self._error is not None:
                raise self._error
            return self.final_path

    # The downloader's side.
    def _set_written(self, count):
        with self._cond:
            self._written = count
            self._cond.notify_all()

    def _restart(self, reason):
        """Empty the partial file for a fresh start from byte 0 (a new generation)."""
        with self._cond:
            with open(self.partial_path, "r+b") as f:
                f.truncate(0)
            self._written = 0
            self.restarts += 1
            self._generation += 1
            self._restart_reason = f"{reason}; downloading it again from byte 0"
            self._cond.notify_all()

    def _finish(self, error=None):
        with self._cond:
            self._error = error
            if error is None:
                self._written = self.size
            self._done = True
            self._cond.notify_all()


class Downloader:
    """Runs BlobDownloads from one BlobSource (default: `repository` of the registry
    `client` speaks to) under the transport's retry policy (`retries` attempts after
    the first, `backoff_base`); a descriptor's foreign URLs are asked when the
    source does not have the blob. A local `source` (offline.LayoutBlobSource,
    ArchiveBlobSource) needs no `client` (None): foreign URLs are then not asked.

    `progress(download, event, nbytes)` is called from the downloading thread with
    event "start" (nbytes: bytes already present), "advance" (nbytes: new bytes),
    "restart" (nbytes: bytes discarded, for a download from byte 0 again),
    "reused" or "done".
    """

    def __init__(self, client, repository, retries=5, validate_cache=False, progress=None,
                 cancel_event=None, backoff_base=BACKOFF_BASE, read_timeout=None, on_failure=None,
                 digest_retries=DIGEST_RETRIES, reserve=None, source: BlobSource | None = None):
        self.client = client
        self.source = source or RegistryBlobSource(client, repository)
        # The free space the cache's filesystem keeps (space.Reserve; None: TOSI_MIN_FREE or the default).
        self.reserve = reserve if reserve is not None else space.Reserve.from_env()
        self.repository = repository
        self.retries = retries
        self.digest_retries = digest_retries
        self.validate_cache = validate_cache
        self.progress = progress or (lambda download, event, nbytes: None)
        self.cancelled = cancel_event or threading.Event()
        self.on_failure = on_failure or (lambda download, error: None)
        self.backoff_base = backoff_base
        self.retry = RetryPolicy(retries, backoff_base=backoff_base)
        self.timeout = (client.timeout[0], read_timeout) if read_timeout and client is not None else None
        self._receiving: set[Any] = set()
        self._receiving_lock = threading.Lock()

    def abort(self) -> None:
        """Cancel every download of this downloader, also those blocked on a silent socket."""
        self.cancelled.set()
        with self._receiving_lock:
            for stream in self._receiving:
                stream.shutdown()

    def run(self, download: BlobDownload) -> BlobDownload:
        """Bring `download` into the cache; never raises, the outcome is in the download."""
        try:
            self._run(download)
        except TosiError as exc:
            self._fail(download, exc)
        except OSError as exc:
            self._fail(download, CacheError(
                f"{download.what}: {exc.strerror or exc} ({exc.filename or download.partial_path})"))
        except BaseException as exc:  # a bug must still wake the waiters
            self._fail(download, CacheError(f"{download.what}: internal error: {type(exc).__name__}: {exc}"))
            raise
        else:
            download._finish()
        return download

    def _fail(self, download, error):
        try:
            if not isinstance(error, Cancelled):
                # Before the waiters wake: they may ask which failure came first.
                self.on_failure(download, error)
        finally:
            download._finish(error)

    def _run(self, download):
        os.makedirs(os.path.dirname(download.final_path), exist_ok=True)
        # A cached blob of the plan's size is taken without the lock; re-hashing one (and
        # replacing it) needs it.
        if not self.validate_cache and _cached_size(download) == download.size:
            self._reused(download)
            return
        with file_lock(download.lock_path):
            # Another process may have finished it while we waited for the lock.
            if self._valid_in_cache(download):
                self._reused(download)
                return
            self._download(download)

    def _valid_in_cache(self, download):
        """Whether the cached blob can be used. One that is not the plan's size is
        re-hashed (any one with validate_cache): bytes that do not match the digest are
        removed for a new download; bytes that do are good, and a plan giving them
        another size is wrong: PlanSizeMismatch, the blob left as it is."""
        size = _cached_size(download)
        if size is None:
            return False
        if self.validate_cache or size != download.size:
            try:
                verify_file(download.final_path, download.digest, download.size, download.what,
                            plan_size=True)
            except DigestMismatch as exc:
                log.warning("%s; downloading it again", exc)
                _remove(download.final_path)
                return False
        return True

    def _reused(self, download):
        download.reused = True
        self.progress(download, "reused", download.size)

    def _download(self, download):
        hasher = _hash_partial(download)
        # An empty blob needs no request, but still a file to rename into place.
        with open(download.partial_path, "ab") as f:
            # A registry may send as much as the descriptor says: a blob that cannot fit
            # above the reserve fails now, not once it filled the filesystem.
            guard = space.guard(f.fileno(), self.reserve, download.what, download.partial_path)
            if guard is not None:
                with guard:
                    if download.size > hasher.count:
                        guard.check(needed=download.size - hasher.count)
        download._set_written(hasher.count)
        self.progress(download, "start", hasher.count)
        # Bytes an earlier run left (a crash may have lost their tail) are checked once
        # for free; then every download from byte 0 counts against the budget.
        from_earlier_run = hasher.count > 0
        downloads = 0
        seen = {}  # what the attempts hashed to -> how many times
        while True:
            try:
                hasher = self._attempts(download, hasher)
                if hasher.count < download.size and hasher.hashed() == download.digest:
                    break  # the whole blob, shorter than the plan says: kept, then refused below
                hasher.check()
                break
            except DigestMismatch as exc:
                got = hasher.hashed() if hasher.count <= download.size else \
                    f"more than {download.size} bytes"
                seen[got] = seen.get(got, 0) + 1
                # A mirror's wrong bytes move the download on to the next source for free.
                mismatched = getattr(self.source, "mismatched", None)
                moved_on = mismatched is not None and mismatched(download.digest)
                if not from_earlier_run and not moved_on:
                    downloads += 1
                if downloads > self.digest_retries:
                    # Bad bytes must not be resumed from: the next run starts afresh.
                    _remove(download.partial_path)
                    raise _mismatches(download, exc, seen) from None
                log.info("%s; downloading it again from byte 0", exc)
                download._restart(exc)
                self.progress(download, "restart", min(hasher.count, download.size))
                from_earlier_run = False
                hasher = VerifyingHasher(download.digest, download.size, download.what)
        fsync_path(download.partial_path)  # the data is on disk before the name says it is whole
        os.replace(download.partial_path, download.final_path)
        fsync_dir(os.path.dirname(download.final_path))
        # Bytes that match the digest are the blob: a plan that says another size is wrong.
        hasher.check_plan_size()
        self.progress(download, "done", download.size)

    def _attempts(self, download, hasher):
        def attempt():
            try:
                self._attempt(download, hasher)
            except _WholeBlob:
                download._whole = True
                raise
            except Unreachable as exc:
                if str(exc).startswith(download.what):
                    raise
                raise rewrap(exc, f"{download.what}: {exc}") from None  # named after the blob
            return hasher

        return self.retry.run(attempt, self.cancelled, download.what)

    # ------------------------------------------------------------ one attempt

    def _attempt(self, download, hasher):
        if hasher.count == download.size or hasher.hashed() == download.digest:
            return  # all there (or all the blob has, if the plan's size is wrong)
        # A local source (offline) has no client: a descriptor's foreign URLs are not asked.
        sources = [self.source] + [URLBlobSource(self.client, url) for url in download.urls
                                   if self.client is not None]
        offset = 0 if download._whole else hasher.count
        for source in sources:
            try:
                stream = source.open(download.digest, offset, what=download.what, timeout=self.timeout)
            except NotFound:
                if source is sources[-1]:
                    raise
                continue
            except RangeRefused as exc:
                raise _WholeBlob(exc) from None
            served_by = getattr(source, "served_by", None)
            download.served_by = served_by(download.digest) if served_by is not None else source.name
            with stream, self._watching(stream):
                self._receive(download, hasher, stream)
            return

    @contextlib.contextmanager
    def _watching(self, stream):
        with self._receiving_lock:
            self._receiving.add(stream)
        try:
            yield
        finally:
            with self._receiving_lock:
                self._receiving.discard(stream)

    def _receive(self, download, hasher, stream):
        offset = hasher.count
        skip = 0
        if stream.status == 206:
            start = _content_range_start(stream.headers.get("Content-Range"))
            if start != offset:
                raise _WholeBlob(RegistryError(
                    f"{download.what}: asked for bytes {offset}-, got a range starting at {start}"))
        elif offset:
            # The server ignored Range and sends the whole blob: pass over what we have.
            log.info("%s: server ignored the Range request, reading %d bytes again", download.what, offset)
            skip = offset
        with open(download.partial_path, "ab", buffering=0) as out:
            out.seek(offset)
            out.truncate()
            with space.guard(out.fileno(), self.reserve, download.what, download.partial_path) \
                    or contextlib.nullcontext() as guard:
                unflushed = 0  # written since the last start_writeback
                while True:
                    if self.cancelled.is_set():
                        raise Cancelled(f"{download.what}: cancelled")
                    try:
                        # read1: whatever has arrived, so watchers see bytes as they come.
                        chunk = stream.read1(CHUNK)
                    except Unreachable as exc:
                        raise Unreachable(f"connection broke after {hasher.count} bytes: {exc}") from None
                    if not chunk:
                        break
                    if skip:
                        dropped = min(skip, len(chunk))
                        skip -= dropped
                        chunk = chunk[dropped:]
                        if not chunk:
                            continue
                    hasher.update(chunk)  # raises before a byte beyond the descriptor's size is written
                    if guard is not None:
                        guard.spend(len(chunk))
                    out.write(chunk)
                    unflushed += len(chunk)
                    if unflushed >= WRITEBACK_STEP:  # the file ends at hasher.count
                        start_writeback(out.fileno(), hasher.count - unflushed, unflushed)
                        unflushed = 0
                    download._set_written(hasher.count)
                    self.progress(download, "advance", len(chunk))
        if hasher.count < download.size and hasher.hashed() != download.digest:
            ended_early = getattr(stream, "ended_early", None)  # a local file (offline.LocalStream)
            if ended_early is not None:
                raise ended_early(hasher.count, download.size)
            raise Unreachable(f"connection closed after {hasher.count} of {download.size} bytes")


def _cached_size(download):
    """The size of the blob in the cache, None if there is none; one that tosi did not
    write is refused (UnsafePath)."""
    try:
        st = os.lstat(download.final_path)
    except FileNotFoundError:
        return None
    require_cached(download.final_path, st, "cached blob")
    return st.st_size


def _hash_partial(download):
    """A hasher primed with the bytes a previous attempt left in the partial file."""
    hasher = VerifyingHasher(download.digest, download.size, download.what)
    try:
        with open(download.partial_path, "rb") as f:
            while hasher.count < download.size:
                chunk = f.read(min(CHUNK, download.size - hasher.count))
                if not chunk:
                    break
                hasher.update(chunk)
    except FileNotFoundError:
        return hasher
    if os.path.getsize(download.partial_path) > download.size:
        _truncate(download, hasher.count)
    if hasher.count:
        log.info("%s: resuming after %d bytes", download.what, hasher.count)
    return hasher


def _truncate(download, length=0):
    try:
        with open(download.partial_path, "r+b") as f:
            f.truncate(length)
    except FileNotFoundError:
        pass


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _mismatches(download, error, seen):
    """The final DigestMismatch: the last attempt's message and what the attempts hashed to."""
    attempts = sum(seen.values())
    if attempts == 1:  # read once (a local source): the mismatch says it all
        return DigestMismatch(str(error))
    ranked = sorted(seen.items(), key=lambda kv: -kv[1])
    counts = ", ".join(f"{n} {'hashed ' if i == 0 else ''}to {got}" for i, (got, n) in enumerate(ranked))
    return DigestMismatch(f"{error}; giving up after {attempts} downloads ({counts})")


def _content_range_start(value):
    # "bytes 100-199/200"
    try:
        unit, _, rest = value.partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except (AttributeError, ValueError):
        return None
