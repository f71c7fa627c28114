"""Content digests (`algorithm:hex`) as the OCI image-spec defines them."""

import hashlib
import re

from .errors import DigestMismatch, PlanSizeMismatch, UsageError, quoted

# Algorithms a registry may name; anything else cannot be verified, so it is refused.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
CHUNK = 1 << 20  # one read of a blob or a layer stream (hashing, decompressing, tar parsing)


class Digest(str):
    """A validated digest string; `.algorithm` and `.hex` give its parts."""

    __slots__ = ()

    def __new__(cls, value: object) -> "Digest":
        if isinstance(value, Digest):
            return value
        if not isinstance(value, str):
            raise UsageError(f"invalid digest {quoted(value)}: not a string")
        m = _DIGEST_RE.fullmatch(value)
        if not m:
            raise UsageError(f"invalid digest {quoted(value)}: expected algorithm:hex")
        algo, hexpart = m.groups()
        want = _HEX_LENGTH.get(algo)
        if want is None:
            raise UsageError(f"invalid digest {quoted(value)}: unsupported algorithm {quoted(algo)}")
        if len(hexpart) != want or not re.fullmatch(r"[0-9a-f]+", hexpart):
            raise UsageError(f"invalid digest {quoted(value)}: {algo} needs {want} lower-case hex digits")
        return super().__new__(cls, value)

    @property
    def algorithm(self) -> str:
        return self.split(":", 1)[0]

    @property
    def hex(self) -> str:
        return self.split(":", 1)[1]

    def hasher(self) -> "hashlib._Hash":
        return hashlib.new(self.algorithm)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of a bytes object."""
    return Digest(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


# Content that does not hash to its digest was most likely corrupted on its way (a byte
# flipped by a proxy or a CDN edge): it is downloaded again from its start this many
# more times before the mismatch is final.
DIGEST_RETRIES = 2


class VerifyingHasher:
    """Hashes and counts bytes as they pass, then checks them against a descriptor."""

    def __init__(self, digest: str, size: int | None = None, what: str = "blob") -> None:
        self.digest = Digest(digest)
        self.size = size
        self.what = what
        self._named = blob_name(what, self.digest)
        self.count = 0
        self._hash = self.digest.hasher()

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hash.update(chunk)
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise DigestMismatch(
                f"{self._named}: more than the {self.size} bytes its descriptor names"
            )

    def copy(self) -> "VerifyingHasher":
        twin = VerifyingHasher.__new__(VerifyingHasher)
        twin.digest, twin.size, twin.what, twin.count = self.digest, self.size, self.what, self.count
        twin._named = self._named
        twin._hash = self._hash.copy()
        return twin

    def hashed(self) -> str:
        """The digest of the bytes seen so far ("sha256:...")."""
        return f"{self.digest.algorithm}:{self._hash.hexdigest()}"

    def check(self) -> None:
        """Raise DigestMismatch unless the bytes seen match size and digest."""
        if self.size is not None and self.count != self.size:
            raise DigestMismatch(
                f"{self._named}: size is {self.count} bytes, descriptor says {self.size}"
            )
        got = self.hashed()
        if got != self.digest:
            raise DigestMismatch(f"{self._named}: content hashes to {got}")

    def check_plan_size(self) -> None:
        """check(), for a size that a plan gives (untrusted input): the digest alone says
        whether the bytes are good. Bytes that hash to the digest but are not the size
        raise PlanSizeMismatch (the plan is wrong, the blob is good); others DigestMismatch."""
        if self.size is not None and self.count != self.size and self.hashed() == self.digest:
            raise plan_size_mismatch(self.what, self.digest, self.size, self.count)
        self.check()


def blob_name(what: str, digest: str) -> str:
    """How a message names a blob: `what` and its digest ("layer 0 (sha256:...)"
    names its digest already: said once)."""
    return what if str(digest) in what else f"{what} {digest}"


def plan_size_mismatch(what: str, digest: str, plan_size: int, real_size: int) -> PlanSizeMismatch:
    """The error for a blob that matches its digest but is not the size the plan
    gives it: the same words from every stage."""
    return PlanSizeMismatch(
        f"{blob_name(what, digest)}: the plan says {plan_size} bytes, but the blob is {real_size} bytes and "
        "matches its digest: the plan is wrong (the blob stays in the cache)",
        plan_size=plan_size, real_size=real_size)


def hash_file(path: str, digest: str, what: str = "blob") -> VerifyingHasher:
    """Hash a whole file in constant memory: `.count` is its size, `.hashed()` its digest."""
    hasher = VerifyingHasher(digest, None, what)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
    return hasher


def verify_file(path: str, digest: str, size: int | None = None, what: str = "blob",
                plan_size: bool = False) -> int:
    """Re-hash a file in constant memory; raise DigestMismatch if it is not `digest`
    (of `size` bytes, unless None); returns its size. With `plan_size`, the size is a
    plan's: a file that matches its digest is good whatever size the plan says, and a
    size that disagrees with it raises PlanSizeMismatch (VerifyingHasher.check_plan_size)."""
    # The whole file is hashed, so a longer file is reported by its real size.
    hasher = hash_file(path, digest, what)
    hasher.size = size
    if plan_size:
        hasher.check_plan_size()
    else:
        hasher.check()
    return hasher.count
