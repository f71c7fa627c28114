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
import email.utils
import logging
import os
import random
import socket
import threading
import time
from urllib.parse import urlsplit

import requests
import urllib3

from . import space
from .auth import parse_challenge
from .cache import file_lock, fsync_dir, fsync_path, require_cached, start_writeback
from .digest import CHUNK, DIGEST_RETRIES, Digest, VerifyingHasher, verify_file
from .errors import (
    CacheError, DigestMismatch, NotFound, RegistryError, TosiError, Unauthorized, Unreachable, quoted,
)
from .registry import redirect_target

log = logging.getLogger("tosi.blobs")

MAX_REDIRECTS = 10
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
RETRYABLE_STATUSES = (408, 429)
# The disk is started on each this many bytes of a blob as they arrive (cache.start_writeback).
WRITEBACK_STEP = 8 << 20


class Cancelled(TosiError):
    """The download was stopped because the fetch it belongs to gave up."""


class Restarted(DigestMismatch):
    """The bytes a watcher read turned out wrong; the blob is downloading again from 0."""


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may fix."""

    def __init__(self, error, retry_after=None, without_range=False):
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after
        # The server will not continue the partial file: ask for the whole blob and
        # pass over the bytes we have, so what was written stays (and is verified).
        self.without_range = without_range


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

    def __init__(self, digest, size, final_path, what=None, urls=()):
        self.digest = Digest(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CacheError(f"{what or self.digest}: descriptor has no valid size ({quoted(size)})")
        self.size = size
        self.final_path = final_path
        self.partial_path = final_path + ".partial"
        self.lock_path = final_path + ".lock"
        self.what = what or f"blob {self.digest}"
        self.urls = [u for u in urls or () if isinstance(u, str) and urlsplit(u).scheme in ("http", "https")]
        self.reused = False
        self.restarts = 0
        self._auth_retried = False
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
    def written(self):
        with self._cond:
            return self._written

    @property
    def generation(self):
        """Counts the restarts from byte 0 (bytes of an older generation were wrong)."""
        with self._cond:
            return self._generation

    @property
    def done(self):
        with self._cond:
            return self._done

    def wait_for(self, offset, timeout=None, generation=None):
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

    def settled(self, generation, timeout=None):
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

    def result(self, timeout=None):
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
    """Runs BlobDownloads against one registry client with a shared retry policy.

    `progress(download, event, nbytes)` is called from the downloading thread with
    event "start" (nbytes: bytes already present), "advance" (nbytes: new bytes),
    "restart" (nbytes: bytes discarded, for a download from byte 0 again),
    "reused" or "done".
    """

    def __init__(self, client, repository, retries=5, validate_cache=False, progress=None,
                 cancel_event=None, backoff_base=BACKOFF_BASE, read_timeout=None, on_failure=None,
                 digest_retries=DIGEST_RETRIES, reserve=None):
        self.client = client
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
        self.timeout = (client.timeout[0], read_timeout) if read_timeout else None
        self._receiving = set()
        self._receiving_lock = threading.Lock()

    def abort(self):
        """Cancel every download of this downloader, also those blocked on a silent socket."""
        self.cancelled.set()
        with self._receiving_lock:
            for resp in self._receiving:
                _shut_down(resp)

    def run(self, download):
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
        # A cached blob is taken without the lock; re-hashing one (and replacing it) needs it.
        if not self.validate_cache and _cached(download):
            self._reused(download)
            return
        with file_lock(download.lock_path):
            # Another process may have finished it while we waited for the lock.
            if self._valid_in_cache(download):
                self._reused(download)
                return
            self._download(download)

    def _valid_in_cache(self, download):
        if not _cached(download):
            return False
        if self.validate_cache:
            try:
                verify_file(download.final_path, download.digest, download.size, download.what)
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
                hasher.check()
                break
            except DigestMismatch as exc:
                got = hasher.hashed() if hasher.count <= download.size else \
                    f"more than {download.size} bytes"
                seen[got] = seen.get(got, 0) + 1
                if not from_earlier_run:
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
        self.progress(download, "done", download.size)

    def _attempts(self, download, hasher):
        attempt = 0
        while True:
            if self.cancelled.is_set():
                raise Cancelled(f"{download.what}: cancelled")
            try:
                self._attempt(download, hasher)
                return hasher
            except _Retryable as failure:
                if failure.without_range:
                    download._whole = True
                if attempt >= self.retries:
                    raise _exhausted(download, failure.error, attempt + 1) from None
                delay = self._delay(attempt, failure.retry_after)
                attempt += 1
                log.info("%s: %s; retry %d of %d in %.1fs", download.what, failure.error,
                         attempt, self.retries, delay)
                if self.cancelled.wait(delay):
                    raise Cancelled(f"{download.what}: cancelled") from None

    def _delay(self, attempt, retry_after):
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP)
        ceiling = min(BACKOFF_CAP, self.backoff_base * (2 ** attempt))
        return random.uniform(ceiling / 2, ceiling)

    # ------------------------------------------------------------ one attempt

    def _attempt(self, download, hasher):
        if hasher.count == download.size:
            return
        sources = [None] + download.urls
        for source in sources:
            try:
                resp = self._open(download, hasher.count, source)
            except NotFound:
                if source == sources[-1]:
                    raise
                continue
            with resp, self._watching(resp):
                self._receive(download, hasher, resp)
            return

    @contextlib.contextmanager
    def _watching(self, resp):
        with self._receiving_lock:
            self._receiving.add(resp)
        try:
            yield
        finally:
            with self._receiving_lock:
                self._receiving.discard(resp)

    def _open(self, download, offset, source):
        """GET the blob (from the registry, or the foreign URL `source`), following redirects."""
        headers = {"Accept-Encoding": "identity"}
        if offset and not download._whole:
            headers["Range"] = f"bytes={offset}-"
        if source is None:
            url = self.client.url(self.client.blob_path(self.repository, download.digest))
        else:
            url = source
        for _hop in range(MAX_REDIRECTS + 1):
            resp = self._get(url, headers, registry=source is None, what=download.what)
            if resp.status_code not in REDIRECT_STATUSES:
                break
            location = resp.headers.get("Location")
            resp.close()
            if not location:
                raise RegistryError(f"{download.what}: redirect without a Location", status=resp.status_code)
            target = redirect_target(url, location)
            if target is None:
                raise RegistryError(f"{download.what}: redirect to {location[:200]!r}, no http(s) URL")
            url = target
        else:
            resp.close()
            raise RegistryError(f"{download.what}: more than {MAX_REDIRECTS} redirects")
        status = resp.status_code
        if status in (200, 206):
            return resp
        retry_after = _retry_after(resp.headers.get("Retry-After"))
        if status == 416 and offset:
            resp.close()
            # The partial is no prefix the server recognizes: start over.
            raise _Retryable(RegistryError(f"range {offset}- refused (416)", status=status),
                             without_range=True)
        if status == 401:
            # send() already renewed the token once; one more try covers a token that
            # expired in between. Basic credentials do not expire: that refusal is final.
            if _bearer_challenge(resp) and not download._auth_retried:
                download._auth_retried = True
                resp.close()
                raise _Retryable(Unauthorized(f"{download.what}: token refused (401)", status=401), 0)
            with resp:
                self.client.check(resp, f"{download.what}: GET {_redact(url)}")
        if status >= 500 or status in RETRYABLE_STATUSES:
            resp.close()
            error = RegistryError(f"{status} {resp.reason or ''}".strip(), status=status)
            raise _Retryable(error, retry_after)
        with resp:
            self.client.check(resp, f"{download.what}: GET {_redact(url)}")
        raise RegistryError(f"{download.what}: GET {_redact(url)}: unexpected status {status}", status=status)

    def _get(self, url, headers, registry, what):
        try:
            if registry:
                # send() adds credentials for the registry's own host only.
                return self.client.send("GET", url, repository=self.repository, headers=headers,
                                        stream=True, allow_redirects=False, timeout=self.timeout)
            # Foreign layer URLs never see the registry's credentials, whatever their host.
            return self.client.session.get(url, headers=headers, stream=True, allow_redirects=False,
                                           timeout=self.timeout or self.client.timeout,
                                           verify=getattr(self.client, "verify", None))
        except Unreachable as exc:
            raise _Retryable(exc) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable(Unreachable(f"{urlsplit(url).netloc} unreachable: {exc}")) from None
        except (requests.RequestException, ValueError) as exc:
            # A malformed header or Location (requests parses it even when not following).
            raise RegistryError(f"{what}: GET {_redact(url)}: {_short(exc)}") from None

    def _receive(self, download, hasher, resp):
        offset = hasher.count
        skip = 0
        if resp.status_code == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                raise _Retryable(RegistryError(f"asked for bytes {offset}-, got a range starting at {start}"),
                                 without_range=True)
        elif offset:
            # The server ignored Range and sends the whole blob: pass over what we have.
            log.info("%s: server ignored the Range request, reading %d bytes again", download.what, offset)
            skip = offset
        with open(download.partial_path, "ab", buffering=0) as out:
            out.seek(offset)
            out.truncate()
            with space.guard(out.fileno(), self.reserve, download.what, download.partial_path) \
                    or contextlib.nullcontext() as guard:
                stream = resp.raw
                unflushed = 0  # written since the last start_writeback
                while True:
                    if self.cancelled.is_set():
                        raise Cancelled(f"{download.what}: cancelled")
                    try:
                        # read1: whatever has arrived, so watchers see bytes as they come.
                        chunk = stream.read1(CHUNK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                        broke = Unreachable(f"connection broke after {hasher.count} bytes: {_short(exc)}")
                        raise _Retryable(broke) from None
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
        if hasher.count < download.size:
            raise _Retryable(Unreachable(f"connection closed after {hasher.count} of {download.size} bytes"))


def _shut_down(resp):
    # shutdown(), unlike close(), wakes a thread blocked in recv() on the socket.
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _cached(download):
    """Whether the blob is in the cache; one that tosi did not write is refused (UnsafePath)."""
    try:
        st = os.lstat(download.final_path)
    except FileNotFoundError:
        return False
    require_cached(download.final_path, st, "cached blob")
    return True


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
    ranked = sorted(seen.items(), key=lambda kv: -kv[1])
    counts = ", ".join(f"{n} {'hashed ' if i == 0 else ''}to {got}" for i, (got, n) in enumerate(ranked))
    return DigestMismatch(f"{error}; giving up after {attempts} downloads ({counts})")


def _exhausted(download, error, attempts):
    message = f"{download.what}: giving up after {attempts} attempts: {error}"
    if isinstance(error, RegistryError):
        return type(error)(message, status=error.status, code=error.code)
    return type(error)(message)


def _bearer_challenge(resp):
    return parse_challenge(resp.headers.get("WWW-Authenticate", ""))[0] == "bearer"


def _retry_after(value):
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _content_range_start(value):
    # "bytes 100-199/200"
    try:
        unit, _, rest = value.partition(" ")
        return int(rest.split("-", 1)[0]) if unit == "bytes" else None
    except (AttributeError, ValueError):
        return None


def _redact(url):
    # Blob storage URLs carry signatures in the query; keep them out of messages.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _short(exc):
    # urllib3 nests the cause (IncompleteRead, a socket error) in its own exception's args.
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return "read timed out"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        cause = exc.args[-1] if len(exc.args) > 1 else None
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        return "the server closed the connection early"
    return str(exc)[:200]
