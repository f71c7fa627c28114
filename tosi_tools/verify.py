"""The verify stage: re-hash cached blobs, and move corrupt ones out of the cache.

A blob is good when its bytes hash to its digest: that alone decides. A plan
whose size for a good blob is wrong is the plan's error (PlanSizeMismatch); the
blob stays where it is. Only a blob that does not match its digest is moved aside.

Blobs are hashed in parallel, each in constant memory; results come back in the
order asked for. Paths always come from the workdir and the digest, never from
the input, so a hostile plan cannot make verify move files outside the cache.
"""

import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from .cache import Workdir
from .digest import Digest, plan_size_mismatch, verify_file
from .errors import CacheError, DigestMismatch, PlanSizeMismatch, TosiError
from .plan import LayerRecord

DEFAULT_PARALLEL = min(4, os.cpu_count() or 1)


class BlobCheck:
    """One blob to verify: its digest, declared size (or None) and cache path."""

    def __init__(self, digest: str, size: Optional[int], path: str, what: str) -> None:
        self.digest = digest
        self.size = size
        self.path = path
        self.what = what
        # CacheError: missing, unreadable or corrupt; PlanSizeMismatch: good, but not self.size.
        self.error: Optional[TosiError] = None
        self.real_size: Optional[int] = None  # the blob's size once it matched its digest
        self.same_as: Optional[BlobCheck] = None  # the check of the same blob earlier in the input, if any

    @property
    def ok(self) -> bool:
        return self.error is None


def layer_check(workdir: Workdir, record: Mapping[str, Any]) -> BlobCheck:
    record = LayerRecord.of(record)
    return BlobCheck(record.digest, record.size, workdir.layer_path(record.digest), f"layer {record.name}")


def config_check(workdir: Workdir, config: Mapping[str, Any]) -> BlobCheck:
    """The check of an image record's (checked) config descriptor."""
    return BlobCheck(config["digest"], config.get("size"), workdir.config_path(config["digest"]),
                     f"config ({config['digest']})")


def digest_check(workdir: Workdir, digest: Digest) -> BlobCheck:
    """A blob named only by its digest: a layer, or else a config, of the cache."""
    path = workdir.layer_path(digest)
    if not os.path.exists(path) and os.path.exists(workdir.config_path(digest)):
        path = workdir.config_path(digest)
    return BlobCheck(digest, None, path, f"blob {digest}")


def verify_blobs(workdir: Workdir, checks: Sequence[BlobCheck], parallel: int = DEFAULT_PARALLEL,
                 ) -> Iterator[BlobCheck]:
    """Yield each BlobCheck, in order, once verified; failures carry `.error` (a
    CacheError), and a corrupt blob has been moved to the quarantine directory.
    A blob that matches its digest but not the size its check gives has a
    PlanSizeMismatch for `.error`, and stays in the cache.
    A blob named twice is hashed once; the later check has `.same_as` set, and the
    same error unless the blob matched its digest (then its own size is compared).
    The workdir is checked first (cache.Workdir.check): it must be private and ours."""
    workdir.check()
    with ThreadPoolExecutor(max_workers=max(parallel, 1), thread_name_prefix="tosi-verify") as pool:
        first: dict[str, BlobCheck] = {}
        futures: list[Optional[Future[None]]] = []
        for check in checks:
            if check.path in first:
                check.same_as = first[check.path]
                futures.append(None)
            else:
                first[check.path] = check
                futures.append(pool.submit(_verify, workdir, check))
        for check, future in zip(checks, futures):
            if future is None:
                first_check = check.same_as
                assert first_check is not None  # a blob named before: no future of its own
                check.real_size = first_check.real_size
                if check.real_size is None:  # missing or corrupt: that blob's error
                    check.error = first_check.error
                elif check.size is not None and check.size != check.real_size:
                    check.error = plan_size_mismatch(check.what, check.digest, check.size, check.real_size)
            else:
                future.result()
            yield check


def _verify(workdir, check):
    try:
        check.real_size = verify_file(check.path, check.digest, check.size, check.what, plan_size=True)
    except PlanSizeMismatch as exc:
        # The bytes are good: the plan lies about their size. The blob stays.
        check.real_size = exc.real_size
        check.error = exc
    except FileNotFoundError:
        check.error = CacheError(f"{check.what}: missing from the cache ({check.path})")
    except DigestMismatch as exc:
        moved = _quarantine(workdir, check.path)
        check.error = CacheError(f"{exc}; moved to {moved}")
    except OSError as exc:
        check.error = CacheError(f"{check.what}: unreadable: {exc.strerror or exc} ({check.path})")
    return check


def _quarantine(workdir, path):
    return workdir.quarantine_blob(path)
