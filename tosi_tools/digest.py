"""Content digests (`algorithm:hex`) as the OCI image-spec defines them."""

import hashlib
import re

from .errors import DigestMismatch, UsageError, quoted

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
        # "layer 0 (sha256:...)" names its digest already: say it once.
        self._named = what if str(self.digest) in what else f"{what} {self.digest}"
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


def verify_file(path: str, digest: str, size: int | None = None, what: str = "blob") -> None:
    """Re-hash a file in constant memory; raise DigestMismatch if it is not `digest`."""
    hasher = VerifyingHasher(digest, size, what)
    with open(path, "rb") as f:
        # Hash beyond the declared size too, so a longer file is reported by its real size.
        hasher.size = None
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            hasher.update(chunk)
    hasher.size = size
    hasher.check()
