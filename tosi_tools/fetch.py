"""The fetch stage: a plan in, every blob it names in the cache, the plan out.

Downloads run on a thread pool over one registry client (one connection pool);
a blob named twice is downloaded once. Layer records come back in plan order,
each as soon as its own blob is verified, so the stage after this one can start
on the bottom layer while the others still download.

    fetcher = Fetcher(Workdir(root), client_for_image, parallel=4)
    with fetcher.start(image_record, layer_records) as run:
        for handle in run.layers:        # plan order
            handle.download.wait_for(n)  # watch the bytes arrive (optional)
            record = handle.result()     # the record with "path", or raises

Records in and out are plan.ImageRecord/LayerRecord (a mapping of the fields is
taken too, and checked).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional

from .digest import DIGEST_RETRIES
from .cache import Workdir
from .errors import Cancelled, PlanError, TosiError, quoted
from .plan import ImageRecord, LayerRecord

if TYPE_CHECKING:
    from .auth import Credentials, TokenCache
    from .keychain import Keychain
    from .blobs import BlobDownload, Downloader
    from .registry import RegistryClient
    from .space import Reserve

# blobs (and with it requests) is imported where a download starts: tosi-fetch's
# --help and --version take their defaults from here and load no HTTP library.

DEFAULT_PARALLEL = 4
DEFAULT_RETRIES = 5

# progress(download, event, nbytes): see blobs.Downloader.
Progress = Callable[["BlobDownload", str, int], None]
ClientForImage = Callable[[ImageRecord], "RegistryClient"]


class LayerHandle:
    """One layer record of the plan and the download that brings its blob."""

    def __init__(self, record: LayerRecord, download: BlobDownload, mirrored: bool = False) -> None:
        self.record = record
        self.download = download
        self.mirrored = mirrored  # the image has mirrors: "servedBy" says which source sent the blob

    def result(self, timeout: Optional[float] = None) -> LayerRecord:
        """The layer record with its cache "path" once the blob is verified (and
        "servedBy" when the image has mirrors and the blob was downloaded)."""
        path = self.download.result(timeout)
        return self.record.with_path(path, self.download.served_by if self.mirrored else None)


class FetchRun:
    """The downloads of one image: `.config` and `.layers` (LayerHandles in plan order)."""

    def __init__(self, fetcher: "Fetcher", config: Optional[BlobDownload], layers: list[LayerHandle]) -> None:
        self._fetcher = fetcher
        self.config = config
        self.layers = layers

    def cancel(self) -> None:
        """Stop the downloads (their partial files stay for a resume) and wait for them."""
        self._fetcher.close(cancel=True)

    def __enter__(self) -> "FetchRun":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._fetcher.close(cancel=exc_type is not None)


# Each later layer's download runs this much nicer than the one before it (up to 19).
NICE_STEP = 2
_BASE_NICE = os.getpriority(os.PRIO_PROCESS, 0)  # the process's, as the importing thread has it


def _run_behind(downloader: Any, download: Any, position: int) -> Any:
    """Run a download at a lower CPU priority the later its layer is: where the CPU, not the
    network, is what they share (a registry on a fast link), the bottom layer, which
    extraction needs first and which holds up every layer above it in a -extractto, gets
    it first, and later ones use what is left; where the network is the limit, priority
    changes nothing. A pool thread takes downloads in order, so it only ever lowers its
    own priority (which needs no privilege)."""
    if position:
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(_BASE_NICE + NICE_STEP * position, 19))
        except OSError:
            pass  # only the order of the work changes
    return downloader.run(download)



class Fetcher:
    """Downloads the blobs of plans into a workdir.

    `client_for_image(image_record)` gives the RegistryClient to use (the caller
    decides credentials and TLS); it is closed with the fetcher. An image record
    with a "source" (an OCI layout or a docker-save archive, tosi-plan(5)) is read
    from there instead (offline.blob_source), with no client, each blob once: a
    read that fails or does not match is not tried again.
    `progress(download, event, nbytes)`: see blobs.Downloader.
    `parallel` 0 means one download per distinct blob. `retries`: attempts after a
    transient failure (resumed with Range); `digest_retries`: downloads from byte 0
    after one whose bytes did not match (digest.DIGEST_RETRIES).
    """

    def __init__(self, workdir: Workdir, client_for_image: ClientForImage,
                 parallel: int = DEFAULT_PARALLEL, retries: int = DEFAULT_RETRIES,
                 validate_cache: bool = False, progress: Optional[Progress] = None,
                 read_timeout: Optional[float] = None, digest_retries: int = DIGEST_RETRIES,
                 reserve: Optional["Reserve"] = None) -> None:
        if parallel < 0:
            raise ValueError("parallel must be >= 0")
        self.workdir = workdir
        self.client_for_image = client_for_image
        self.parallel = parallel
        self.retries = retries
        self.digest_retries = digest_retries
        self.validate_cache = validate_cache
        self.progress = progress
        self.read_timeout = read_timeout
        self.reserve = reserve  # space.Reserve the cache's filesystem keeps (None: TOSI_MIN_FREE)
        self.cancelled = threading.Event()
        self.failure: Optional[TosiError] = None  # the first error; it cancels the other downloads
        self._pool: Optional[ThreadPoolExecutor] = None
        self._clients: list[Any] = []
        self._downloaders: list[Downloader] = []
        self._downloads: list[BlobDownload] = []

    def start(self, image: Mapping[str, Any], layers: Iterable[Mapping[str, Any]]) -> FetchRun:
        """Start downloading the config and every layer of `image`; returns a FetchRun."""
        from .blobs import BlobDownload, Downloader

        image = ImageRecord.of(image)
        if image.source is None:
            if not image.repository:
                raise PlanError("image record has no repository")
            if not (image.endpoint or image.registry):
                raise PlanError("image record names neither an endpoint nor a registry")
        records = [LayerRecord.of(record) for record in layers]
        self.workdir.ensure()  # private and ours, before a cached blob is looked at
        config = _config_download(self.workdir, image)
        unique = {config.final_path: config} if config else {}  # one download per cache file
        handles = []
        for record in records:
            digest = record.digest
            size = _require_size(record.size, f"layer {record.index}")
            path = self.workdir.layer_path(digest)
            if path not in unique:
                unique[path] = BlobDownload(
                    digest, size, path, what=f"layer {record.name}", urls=record.urls,
                )
            handles.append(LayerHandle(record, unique[path], mirrored=bool(image.mirrors)))
        retries, digest_retries = self.retries, self.digest_retries
        if image.source is not None:
            from .offline import blob_source as local_source

            # A local file does not get better by reading it again.
            client, source, retries, digest_retries = None, local_source(image.source), 0, 0
        else:
            from .mirrors import blob_source

            client = self.client_for_image(image)
            self._clients.append(client)
            source = blob_source(image, client)  # the image's mirrors, then its registry
            if hasattr(source, "close"):
                self._clients.append(source)
        downloader = Downloader(
            client, image.repository, retries=retries,
            validate_cache=self.validate_cache, progress=self.progress,
            cancel_event=self.cancelled, read_timeout=self.read_timeout, on_failure=self._failed,
            digest_retries=digest_retries,
            reserve=self.reserve, source=source,
        )
        self._downloaders.append(downloader)
        self._downloads.extend(unique.values())
        workers = self.parallel or max(len(unique), 1)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tosi-fetch")
        # The config first: it is small and the next stage needs it before any layer.
        for position, download in enumerate(unique.values()):
            self._pool.submit(_run_behind, downloader, download, max(position - 1, 0))
        return FetchRun(self, config, handles)

    def abort(self) -> None:
        """Stop every download now, from any thread (their partial files stay);
        close() still waits for them."""
        self._abort()

    def _failed(self, download: BlobDownload, error: TosiError) -> None:
        if self.failure is None:
            self.failure = error
        self._abort()

    def _abort(self) -> None:
        # Set first: a downloader made after this (its turn in the pool not come yet)
        # sees it before its first request, where the loop below cannot reach it.
        self.cancelled.set()
        for downloader in list(self._downloaders):
            downloader.abort()

    def close(self, cancel: bool = False) -> None:
        if cancel:
            self._abort()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            self._pool = None
        for download in self._downloads:
            if not download.done:  # its turn never came
                download._finish(Cancelled(f"{download.what}: cancelled"))
        for client in self._clients:
            client.close()
        self._clients = []
        self._downloaders = []
        self._downloads = []


def client_factory(credentials: Optional["Credentials"], pool_size: int,
                   token_cache: Optional["TokenCache"] = None, read_timeout: Optional[float] = None,
                   insecure: bool = False,
                   keychain: Optional["Keychain"] = None) -> ClientForImage:
    """A `client_for_image(image)` for Fetcher: a RegistryClient reaching the plan's
    registry the way resolve did (endpoint, insecure, caFile), with the credentials
    `keychain` (keychain.Keychain; else the fixed `credentials`) gives for it.

    The plan decides the transport only: credentials (bound to their registry,
    auth.Credentials) reach the plan's endpoint only if it is that registry's own,
    and Basic ones go over plain http or unverified TLS to a host off loopback
    only with `insecure` (the caller's own --insecure; the plan's is not enough).
    A client certificate and the CAs of the host's certs.d directory come from the
    keychain (`tls_for`), never from a plan."""
    from .keychain import Keychain, TLSConfig
    from .registry import RegistryClient
    from .transport import DEFAULT_READ_TIMEOUT, endpoint_for

    if keychain is None:
        keychain = Keychain.of(credentials)

    def client_for_image(image: ImageRecord) -> "RegistryClient":
        plan_insecure = image.insecure
        registry = image.registry
        # Fetcher.start refused a plan naming neither an endpoint nor a registry.
        endpoint = image.endpoint or endpoint_for(registry or "", plan_insecure)
        own = keychain.tls_for(registry)
        # The host's certs.d CAs are this machine's: added unless the plan names a CA file.
        tls = TLSConfig(image.ca_file, own.client_cert, plan_insecure,
                        () if image.ca_file or plan_insecure else own.added_cas)
        return RegistryClient(endpoint, keychain=keychain, registry=registry,
                              repository=image.repository, tls=tls,
                              read_timeout=read_timeout or DEFAULT_READ_TIMEOUT,
                              pool_size=pool_size, token_cache=token_cache,
                              credentials_insecure=insecure, endpoint_origin="the plan's endpoint")

    return client_for_image


def _config_download(workdir: Workdir, image: ImageRecord) -> Optional[BlobDownload]:
    from .blobs import BlobDownload

    digest = image.config_digest
    if digest is None:
        return None
    size = _require_size(image.config_size, "config")
    return BlobDownload(digest, size, workdir.config_path(digest),
                        what=f"config ({digest})")


def _require_size(size: Optional[int], what: str) -> int:
    # The size caps what is written to disk, so a blob without one is never fetched.
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise PlanError(f"{what} has no valid size ({quoted(size)})")
    return size


def fetch_plan(fetcher: Fetcher, image: Mapping[str, Any], layers: Iterable[Mapping[str, Any]],
               early: Optional[Callable[[LayerHandle], None]] = None,
               ) -> Iterator[ImageRecord | LayerRecord]:
    """Yield the plan's records as they become true: the image record once its config
    is cached (with the config "path"), then each layer record, in plan order, once its
    blob is verified (with "path").

    The first failure cancels the other downloads (their partial files stay) and is
    raised after the records before the first unfinished one were yielded.

    With `early(handle)`, each layer record is yielded at once instead, with the "path"
    its blob will have, after `early` was given its LayerHandle: the caller reads the
    blob as it arrives (blobstream.FollowingReader) and trusts nothing of it before
    `handle.download.result()`; the iteration ends only once every blob is
    verified, and raises the first failure otherwise.
    """
    image = ImageRecord.of(image)
    with fetcher.start(image, layers) as run:
        image = image.with_workdir(fetcher.workdir.root)
        try:
            if run.config is not None:
                served_by = run.config.served_by if image.mirrors else None
                image = image.with_config_path(run.config.result(), served_by)
            yield image
            for handle in run.layers:
                if early is None:
                    yield handle.result()
                else:
                    early(handle)
                    yield handle.record.with_path(handle.download.final_path)
            if early is not None:
                for handle in run.layers:  # verified too when nobody read it (its overlay was there)
                    handle.result()
        except Cancelled:
            # A blob later in the plan failed first: report that, not the cancellation.
            if fetcher.failure is not None:
                raise fetcher.failure from None
            raise
