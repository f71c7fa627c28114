"""Images without a registry: OCI image layouts and `docker save` archives.

An OCI image layout (image-spec image-layout.md; what skopeo, umoci and buildah
write) is a directory: `oci-layout` ({"imageLayoutVersion": "1.0.0"}),
`index.json` (an image index whose entries are named by the annotation
org.opencontainers.image.ref.name) and `blobs/<alg>/<hex>`. A docker-save archive
is a tar, plain or gzip-compressed, holding `manifest.json` ([{"Config",
"RepoTags", "Layers"}], each a member's name) and, since Docker 25, an OCI layout
beside it (index.json entries annotated io.containerd.image.name as well).

Resolve finds the image here (`open_store`, then `LayoutStore.find` /
`ArchiveStore.find`: index.json, manifests and configs, each read with a cap and
checked against its digest); fetch reads the blobs through `LayoutBlobSource` and
`ArchiveBlobSource` (`blob_source` makes one from a plan's "source"), which are
registry.BlobSource: blobs.Downloader hashes what they give as it hashes a
registry's answers, and only bytes matching the plan's digest and size enter the
cache.

An archive's member is read in place (a plain tar: from its offset; a gzip tar:
decompressed from the start up to it). The layers of the manifest.json form are
named by no digest: resolve hashes each one as stored, and the plan describes it
as that digest and size with the media type its first bytes show (uncompressed
tar for docker save, whose layer digest is then its diffID).

Nothing here is trusted for being there: the directory or archive may belong to
anyone and a plan naming it is untrusted. Files are opened one path component at
a time, never through a symlink that leads out of the layout directory; only
regular files and regular tar members are read, and no more bytes than the
descriptor naming them says.
"""

import errno
import hashlib
import json
import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, NamedTuple, Optional

from .digest import CHUNK, Digest, VerifyingHasher
from .errors import DigestMismatch, ManifestError, NotFound, SourceError, TosiError, UsageError, quoted
from .imageplatform import Platform
from .manifest import (
    IMAGE_TYPES, INDEX_TYPES, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, OCI_INDEX, OCI_MANIFEST, Descriptor,
    ImageManifest, Index, parse_manifest,
)
from .reference import DOCKER_ARCHIVE, OCI_LAYOUT, Reference, SourceReference, parse_reference

log = logging.getLogger("tosi.offline")

# The plan's source "type"s.
OCI_LAYOUT_SOURCE = "oci-layout"
DOCKER_ARCHIVE_SOURCE = "docker-archive"
SOURCE_TYPES = (OCI_LAYOUT_SOURCE, DOCKER_ARCHIVE_SOURCE)

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # Docker 25's docker save writes it beside REF_NAME
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MAX_SYMLINKS = 40
MAX_SMALL_FILE = 64 << 10  # oci-layout
MAX_ARCHIVE_MANIFEST = 4 << 20  # manifest.json
MAX_MEMBERS = 200_000  # a tar with more members is no image archive (tarfile keeps each in memory)
_SMALL_MEMBER = 1 << 20  # a gzip archive's members up to this size are kept from the scan...
_SMALL_MEMBERS_TOTAL = 16 << 20  # ...up to this much in all
_GZIP_MAGIC = b"\x1f\x8b"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted as a blob must not block the open (it is refused after it).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def blob_name(digest: Digest) -> str:
    """Where an OCI layout keeps a blob, relative to its root."""
    return f"blobs/{digest.algorithm}/{digest.hex}"


# ---------------------------------------------------------------- reading files safely

def _refuse_escape(root: str, what: str) -> SourceError:
    return SourceError(f"{what}: a symlink in {root} leads out of it; refused", path=root)


def open_inside(root: str, relative: str, what: str) -> int:
    """A descriptor of the regular file `relative` names inside the directory `root`,
    opened one component at a time (O_NOFOLLOW): a symlink on the way is followed only
    while it stays inside `root` (relative, or absolute naming `root` itself); one
    that leaves it is refused (SourceError), as is anything but a regular file.
    FileNotFoundError when there is no such file."""
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"{root}: no such directory", path=root) from None
    except NotADirectoryError:
        raise SourceError(f"{root}: not a directory (an OCI image layout is one)", path=root) from None
    except OSError as exc:
        raise SourceError(f"{root}: {exc.strerror}", path=root) from None
    opened: list[int] = []  # directories below root, innermost last
    try:
        todo = list(reversed(relative.split("/")))
        links = 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not opened:
                    raise _refuse_escape(root, what)
                os.close(opened.pop())
                continue
            dir_fd = opened[-1] if opened else root_fd
            last = not any(p not in ("", ".") for p in todo)
            try:
                fd = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_symlink(dir_fd, part):
                    if exc.errno == errno.ENOTDIR:
                        raise FileNotFoundError(errno.ENOENT, "not a directory on the way", part) from None
                    raise
                links += 1
                if links > MAX_SYMLINKS:
                    raise SourceError(f"{what}: more than {MAX_SYMLINKS} symlinks in {root}", path=root) from None
                target = os.readlink(part, dir_fd=dir_fd)
                if target.startswith("/"):
                    inside = _inside(root, target)
                    if inside is None:
                        raise _refuse_escape(root, what) from None
                    for fd_below in opened:
                        os.close(fd_below)
                    opened.clear()
                    target = inside
                todo.extend(reversed(target.split("/")))
                continue
            if not last:
                opened.append(fd)
                continue
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise SourceError(f"{what}: {os.path.join(root, relative)} is not a regular file", path=root)
            return fd
        raise SourceError(f"{what}: {quoted(relative)} names no file in {root}", path=root)
    finally:
        for fd_below in opened:
            os.close(fd_below)
        os.close(root_fd)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _inside(root: str, target: str) -> Optional[str]:
    """`target` (absolute) relative to `root` if it lies inside it, else None."""
    for base in {os.path.normpath(root), os.path.realpath(root)}:
        normal = os.path.normpath(target)
        if normal == base:
            return "."
        if normal.startswith(base.rstrip("/") + "/"):
            return normal[len(base.rstrip("/")) + 1:]
    return None


def _read_capped(read: Callable[[int], bytes], limit: int, what: str, too_large: type[TosiError]) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = read(min(CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise too_large(f"{what}: larger than {limit} bytes; refused")


def _verified(data: bytes, digest: Digest, size: Optional[int], what: str) -> bytes:
    hasher = VerifyingHasher(digest, size, what)
    hasher.update(data)
    hasher.check()
    return data


def _json_object(data: bytes, what: str) -> Any:
    """JSON from a source file; the message never quotes the bytes (a hardlink planted
    there could be any file root may read)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise SourceError(f"{what}: not JSON") from None


# ---------------------------------------------------------------- streams for the downloader

class LocalStream:
    """A blob's bytes read from a local file, shaped as transport.BodyStream: `status`
    200 (from byte 0) or 206 with a Content-Range, `headers`, `read1`, `shutdown`."""

    def __init__(self, read: Callable[[int], bytes], offset: int, size: int,
                 close: Callable[[], None], url: str) -> None:
        self._read = read
        self._left = max(size - offset, 0)
        self._close = close
        self._stopped = False
        self.status = 206 if offset else 200
        self.headers: dict[str, str] = {}
        if offset:
            self.headers["Content-Range"] = f"bytes {offset}-{max(size - 1, offset)}/{size}"
        self.reason = "OK"
        self.url = url

    def read1(self, size: int) -> bytes:
        if self._stopped or self._left <= 0:
            return b""
        try:
            chunk = self._read(min(size, self._left))
        except (OSError, EOFError, tarfile.TarError, ValueError) as exc:
            raise SourceError(f"{self.url}: unreadable ({exc})") from None
        if not chunk:
            raise SourceError(f"{self.url}: ends {self._left} bytes early (truncated?)")
        self._left -= len(chunk)
        return chunk

    def shutdown(self) -> None:
        self._stopped = True

    def ended_early(self, count: int, size: int) -> TosiError:
        """What the downloader raises when the file ends before the descriptor's size."""
        return SourceError(f"{self.url}: {count} bytes, the plan says {size}")

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "LocalStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fd_stream(fd: int, start: int, size: int, offset: int, url: str) -> LocalStream:
    position = [start + offset]

    def read(n: int) -> bytes:
        chunk = os.pread(fd, n, position[0])
        position[0] += len(chunk)
        return chunk

    return LocalStream(read, offset, size, lambda: os.close(fd), url)


# ---------------------------------------------------------------- OCI image layouts

class LayoutStore:
    """An OCI image layout directory: its index.json and blobs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"OCI layout {path}"

    def _read(self, relative: str, limit: int, what: str, too_large: type[TosiError] = SourceError) -> bytes:
        fd = open_inside(self.path, relative, what)
        try:
            return _read_capped(lambda n: os.read(fd, n), limit, what, too_large)
        finally:
            os.close(fd)

    def check(self) -> None:
        """SourceError unless the directory holds an oci-layout file of version 1."""
        what = f"{self.where}: oci-layout"
        try:
            data = self._read("oci-layout", MAX_SMALL_FILE, what)
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                raise SourceError(f"{self.path}: no such directory", path=self.path) from None
            raise SourceError(f"{self.path}: no oci-layout file; not an OCI image layout",
                              path=self.path) from None
        body = _json_object(data, what)
        version = body.get("imageLayoutVersion") if isinstance(body, dict) else None
        if not isinstance(version, str) or not version.startswith("1."):
            raise SourceError(f"{what}: imageLayoutVersion {quoted(version)}, expected 1.0.0", path=self.path)

    def index_json(self) -> bytes:
        try:
            return self._read("index.json", MAX_MANIFEST_SIZE, f"{self.where}: index.json")
        except FileNotFoundError:
            raise SourceError(f"{self.where}: no index.json", path=self.path) from None

    def read_blob(self, digest: Digest, size: Optional[int], limit: int, what: str) -> bytes:
        """A blob's bytes, checked against `digest` and `size` (None: any up to `limit`)."""
        if size is not None and size > limit:
            raise ManifestError(f"{what}: {size} bytes, more than {limit >> 20} MiB; refused")
        try:
            data = self._read(blob_name(digest), limit if size is None else size, what,
                              too_large=DigestMismatch)
        except FileNotFoundError:
            raise SourceError(f"{what}: not in {self.where} ({blob_name(digest)})", path=self.path) from None
        return _verified(data, digest, size, what)

    def find(self, ref: SourceReference, wanted: Platform) -> "Found":
        self.check()
        matcher = None
        if ref.tag is not None:
            tag = ref.tag
            matcher = _Matcher(f"tagged {quoted(tag)}", lambda entry: _annotation(entry, REF_NAME) == tag)
        found = _find_in_index(self, self.index_json(), matcher, ref.digest, wanted)
        return found._replace(source={"type": OCI_LAYOUT_SOURCE, "path": self.path})


class LayoutBlobSource:
    """The blobs of an OCI image layout (a registry.BlobSource)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"oci:{path}"

    def open(self, digest: str, offset: int = 0, what: Optional[str] = None,
             timeout: Any = None) -> LocalStream:
        digest = Digest(digest)
        what = what or f"blob {digest}"
        relative = blob_name(digest)
        try:
            fd = open_inside(self.path, relative, what)
        except FileNotFoundError:
            raise NotFound(f"{what}: not in the OCI layout {self.path} ({relative})") from None
        except OSError as exc:
            raise SourceError(f"{what}: {os.path.join(self.path, relative)}: {exc.strerror}",
                              path=self.path) from None
        size = os.fstat(fd).st_size
        return _fd_stream(fd, 0, size, min(offset, size), os.path.join(self.path, relative))


# ---------------------------------------------------------------- docker-save archives

class Member(NamedTuple):
    name: str
    offset: int  # of its data in the (uncompressed) tar stream
    size: int


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


class _OpenArchive:
    """One pass over an archive's members, in order (tarfile over the plain or
    decompressed file): `members()` yields (TarInfo, reader of its data)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = _open_regular(path)
        self.file = os.fdopen(self.fd, "rb", closefd=True)
        head = os.pread(self.fd, 2, 0)
        self.size = os.fstat(self.fd).st_size
        self.compressed = head == _GZIP_MAGIC
        self._gzip: Optional[IO[bytes]] = None
        try:
            if self.compressed:
                from .compression import _gzip_module

                self._gzip = _gzip_module.GzipFile(fileobj=self.file, mode="rb")
                self.tar = tarfile.open(fileobj=self._gzip, mode="r|")
            else:
                self.tar = tarfile.open(fileobj=self.file, mode="r:")
        except BaseException as exc:
            self.close()
            if isinstance(exc, Exception):
                raise _corrupt(path, exc) from None
            raise

    def members(self) -> Iterator[tarfile.TarInfo]:
        count = 0
        try:
            while True:
                info = self.tar.next()
                if info is None:
                    return
                count += 1
                if count > MAX_MEMBERS:
                    raise SourceError(f"{self.path}: more than {MAX_MEMBERS} members; not an image archive",
                                      path=self.path)
                self.tar.members.clear()  # type: ignore[attr-defined]  # nothing is looked up by name
                yield info
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise _corrupt(self.path, exc) from None
        except Exception as exc:  # isal's IsalError, zlib.error
            raise _corrupt(self.path, exc) from None

    def reader(self, info: tarfile.TarInfo) -> Callable[[int], bytes]:
        """Reads the data of `info` (the member just yielded) from its start."""
        if not self.compressed:
            fd = self.fd
            position = [info.offset_data]

            def read_at(n: int) -> bytes:
                chunk = os.pread(fd, min(n, info.offset_data + info.size - position[0]), position[0])
                position[0] += len(chunk)
                return chunk

            return read_at
        extracted = self.tar.extractfile(info)
        assert extracted is not None  # a regular member

        def read(n: int) -> bytes:
            try:
                return extracted.read(n)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise _corrupt(self.path, exc) from None
            except Exception as exc:  # isal's IsalError, zlib.error
                raise _corrupt(self.path, exc) from None

        return read

    def close(self) -> None:
        for closable in (getattr(self, "tar", None), self._gzip, self.file):
            if closable is not None:
                try:
                    closable.close()
                except Exception:  # noqa: BLE001 - a corrupt stream may fail to close; nothing to keep
                    pass


def _open_regular(path: str) -> int:
    try:
        fd = os.open(path, _FILE_FLAGS)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file", path=path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: the archive itself may be a symlink the user named
            fd = os.open(path, _FILE_FLAGS & ~os.O_NOFOLLOW)
        else:
            raise SourceError(f"{path}: {exc.strerror}", path=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"{path}: not a regular file (a docker-save archive is a tar file)", path=path)
    return fd


def _corrupt(path: str, exc: BaseException) -> SourceError:
    if isinstance(exc, SourceError):
        return exc
    detail = str(exc) or type(exc).__name__
    return SourceError(f"{path}: corrupt or not a tar archive ({detail[:120]})", path=path)


def _regular(info: tarfile.TarInfo) -> bool:
    return info.isreg() and not info.issparse()


class ArchiveStore:
    """A docker-save archive: its members (scanned once), read in place."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"archive {path}"
        self.members: dict[str, Member] = {}
        self.duplicates: set[str] = set()
        self._small: dict[str, bytes] = {}
        self.compressed = False
        self._scan()

    def _scan(self) -> None:
        archive = _OpenArchive(self.path)
        kept = 0
        try:
            self.compressed = archive.compressed
            for info in archive.members():
                if not _regular(info):
                    continue
                name = _member_name(info.name)
                if not archive.compressed and info.offset_data + info.size > archive.size:
                    raise SourceError(f"{self.path}: truncated ({quoted(name)} ends beyond the file)",
                                      path=self.path)
                if name in self.members:
                    self.duplicates.add(name)
                self.members[name] = Member(name, info.offset_data, info.size)
                # A gzip archive is read again from its start for each member: the small
                # ones (manifests, configs) are kept from this pass instead.
                if archive.compressed and info.size <= _SMALL_MEMBER and kept + info.size <= _SMALL_MEMBERS_TOTAL:
                    self._small[name] = _read_capped(archive.reader(info), info.size, self.where, SourceError)
                    kept += info.size
        finally:
            archive.close()
        if not self.members:
            raise SourceError(f"{self.path}: an empty archive", path=self.path)

    def member(self, name: str, what: str) -> Member:
        if name in self.duplicates:
            raise SourceError(f"{what}: {self.where} holds {quoted(name)} more than once; refused",
                              path=self.path)
        member = self.members.get(_member_name(name))
        if member is None:
            raise SourceError(f"{what}: {self.where} holds no {quoted(name)}", path=self.path)
        return member

    def read_member(self, name: str, limit: int, what: str, too_large: type[TosiError] = SourceError) -> bytes:
        member = self.member(name, what)
        if member.size > limit:
            raise too_large(f"{what}: {member.size} bytes, more than {limit} allowed; refused")
        if member.name in self._small:
            return self._small[member.name]
        with self.open_member(member, 0, what) as stream:
            return _read_capped(stream.read1, limit, what, too_large)

    def open_member(self, member: Member, offset: int, what: str) -> LocalStream:
        return open_member(self.path, member.name, offset, what, expected=member)

    def read_blob(self, digest: Digest, size: Optional[int], limit: int, what: str) -> bytes:
        if size is not None and size > limit:
            raise ManifestError(f"{what}: {size} bytes, more than {limit >> 20} MiB; refused")
        data = self.read_member(blob_name(digest), limit if size is None else size, what,
                                too_large=DigestMismatch)
        return _verified(data, digest, size, what)

    def hash_members(self, names: list[str], what: str) -> dict[str, tuple[Digest, int, bytes]]:
        """{name: (sha256 digest, size, first 512 bytes)} of members, in one pass."""
        wanted = {self.member(name, what).name for name in names}
        hashed: dict[str, tuple[Digest, int, bytes]] = {}
        archive = _OpenArchive(self.path)
        try:
            for info in archive.members():
                name = _member_name(info.name)
                if name not in wanted or not _regular(info):
                    continue
                read = archive.reader(info)
                hasher = hashlib.sha256()
                head = b""
                left = info.size
                while left > 0:
                    chunk = read(min(CHUNK, left))
                    if not chunk:
                        raise SourceError(f"{what}: {self.where}: {quoted(name)} is truncated", path=self.path)
                    if len(head) < 512:
                        head += chunk[:512 - len(head)]
                    hasher.update(chunk)
                    left -= len(chunk)
                hashed[name] = (Digest(f"sha256:{hasher.hexdigest()}"), info.size, head)
        finally:
            archive.close()
        return hashed

    def find(self, ref: SourceReference, wanted: Platform) -> "Found":
        found = None
        if "index.json" in self.members and "oci-layout" in self.members:
            found = self._find_oci(ref, wanted)
        if found is None:
            if "manifest.json" not in self.members:
                raise SourceError(f"{self.path}: no manifest.json or index.json; not a docker-save archive",
                                  path=self.path)
            found = self._find_saved(ref.name, wanted)
        return found

    def _find_oci(self, ref: SourceReference, wanted: Platform) -> Optional["Found"]:
        """The image of the archive's OCI layout, or None where its index.json names
        no image by REF (the manifest.json form may)."""
        index_json = self.read_member("index.json", MAX_MANIFEST_SIZE, f"{self.where}: index.json")
        matcher = None
        if ref.name is not None:
            name = ref.name.normalized()
            matcher = _Matcher(f"named {name}", lambda entry: name in _entry_names(entry))
        try:
            found = _find_in_index(self, index_json, matcher, None, wanted)
        except _Unnamed:
            return None
        members: dict[str, str] = {}
        for descriptor in [found.manifest.config, *found.manifest.layers]:
            digest = Digest(descriptor["digest"])
            members[digest] = self.member(blob_name(digest), f"{self.where}: blob {digest}").name
        return found._replace(source=self._source(members))

    def _source(self, members: Mapping[str, str]) -> dict[str, Any]:
        return {"type": DOCKER_ARCHIVE_SOURCE, "path": self.path, "members": dict(members)}

    def _find_saved(self, name: Optional[Reference], wanted: Platform) -> "Found":
        """The image of manifest.json (docker save's own form): a manifest is made for it."""
        what = f"{self.where}: manifest.json"
        body = _json_object(self.read_member("manifest.json", MAX_ARCHIVE_MANIFEST, what), what)
        if not isinstance(body, list) or not all(isinstance(e, dict) for e in body):
            raise SourceError(f"{what}: not a list of images")
        images = []
        for entry in body:
            tags = entry.get("RepoTags") or []
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise SourceError(f"{what}: RepoTags is not a list of names")
            images.append((entry, [_normalized_name(t) for t in tags]))
        if name is not None:
            wanted_name = name.normalized()
            chosen = [image for image in images if wanted_name in image[1]]
            if not chosen:
                raise SourceError(f"{self.path}: no image named {wanted_name} (it has: "
                                  f"{_listed(t for _e, tags in images for t in tags if t)})", path=self.path)
        else:
            chosen = images
        if len(chosen) != 1:
            raise SourceError(f"{self.path}: holds {len(chosen)} images; name one: docker-archive:{self.path}:NAME:TAG "
                              f"(it has: {_listed(t for _e, tags in chosen for t in tags if t)})", path=self.path)
        entry = chosen[0][0]
        config_name, layer_names = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list) \
                or not all(isinstance(n, str) for n in layer_names):
            raise SourceError(f"{what}: an image without Config or Layers")
        config_member = self.member(config_name, what)
        config_bytes = self.read_member(config_name, MAX_CONFIG_SIZE, f"{self.where}: {config_name}",
                                        too_large=ManifestError)
        config_digest = Digest("sha256:" + _sha256_hex(config_bytes))
        hashed = self.hash_members(layer_names, what)
        from .compression import sniff

        layers = []
        members: dict[str, str] = {config_digest: config_member.name}
        for layer_name in layer_names:
            digest, size, head = hashed[self.member(layer_name, what).name]
            kind = sniff(head)
            if kind not in ("tar", "gzip", "zstd"):
                raise SourceError(f"{what}: layer {quoted(layer_name)} is {kind}-compressed; "
                                  "tar, gzip and zstd layers are read")
            layers.append({"mediaType": OCI_LAYER if kind == "tar" else f"{OCI_LAYER}+{kind}",
                           "digest": digest, "size": size})
            members[digest] = self.member(layer_name, what).name
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                    "layers": layers}
        data = json.dumps(manifest, separators=(",", ":")).encode()
        parsed = parse_manifest(data, OCI_MANIFEST, what=f"{self.where}: the manifest made for manifest.json")
        assert isinstance(parsed, ImageManifest)
        return Found(data, parsed, Digest("sha256:" + _sha256_hex(data)), None, None,
                     self._source(members), lambda *_args: config_bytes)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _normalized_name(text: str) -> Optional[str]:
    try:
        return parse_reference(text).normalized()
    except UsageError:
        return None


def _entry_names(entry: Descriptor) -> set[str]:
    """The references an index.json entry of a docker-save archive is named by."""
    names = set()
    for key in (CONTAINERD_NAME, REF_NAME):
        value = _annotation(entry, key)
        normalized = _normalized_name(value) if value else None
        if normalized:
            names.add(normalized)
    return names


def _listed(names: Any, limit: int = 8) -> str:
    unique = sorted(set(names))
    if not unique:
        return "no names"
    shown = ", ".join(quoted(n, 60) for n in unique[:limit])
    return shown + (f" and {len(unique) - limit} more" if len(unique) > limit else "")


def open_member(path: str, name: str, offset: int, what: str, expected: Optional[Member] = None) -> LocalStream:
    """The data of the archive member `name` from `offset` on, read in place (a plain
    tar: from its offset in the file; a gzip one: decompressed up to it). NotFound when
    the archive holds no such regular member; a member other than `expected` (same
    name, offset and size: what resolve scanned) is SourceError."""
    archive = _OpenArchive(path)
    try:
        for info in archive.members():
            if _member_name(info.name) != name:
                continue
            if not _regular(info):
                raise SourceError(f"{what}: {quoted(name)} in {path} is not a regular file", path=path)
            if expected is not None and (info.offset_data, info.size) != (expected.offset, expected.size):
                raise SourceError(f"{what}: {path} changed while it was read", path=path)
            url = f"{path}:{name}"
            offset = min(offset, info.size)
            if not archive.compressed:
                fd = os.dup(archive.fd)
                archive.close()
                return _fd_stream(fd, info.offset_data, info.size, offset, url)
            read = archive.reader(info)
            left = offset
            while left:  # a gzip stream is not seekable: pass over what the cache has
                chunk = read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
            return LocalStream(read, offset, info.size, archive.close, url)
        raise NotFound(f"{what}: not in the archive {path} ({quoted(name)})")
    except BaseException:
        archive.close()
        raise


class ArchiveBlobSource:
    """The blobs of a docker-save archive (a registry.BlobSource): `members` maps each
    digest to the member holding it (the plan's source "members")."""

    def __init__(self, path: str, members: Mapping[str, str]) -> None:
        self.path = path
        self.members = dict(members)
        self.name = f"docker-archive:{path}"

    def open(self, digest: str, offset: int = 0, what: Optional[str] = None,
             timeout: Any = None) -> LocalStream:
        what = what or f"blob {digest}"
        name = self.members.get(digest)
        if name is None:
            raise NotFound(f"{what}: the plan's source names no member of {self.path} for it")
        return open_member(self.path, name, offset, what)


def blob_source(source: Mapping[str, Any]) -> LayoutBlobSource | ArchiveBlobSource:
    """The BlobSource a plan's (checked) "source" field names."""
    kind = source["type"]
    if kind == OCI_LAYOUT_SOURCE:
        return LayoutBlobSource(source["path"])
    if kind == DOCKER_ARCHIVE_SOURCE:
        return ArchiveBlobSource(source["path"], source.get("members") or {})
    raise SourceError(f"the plan's source type {quoted(kind)} is not one of {', '.join(SOURCE_TYPES)}")


# ---------------------------------------------------------------- finding the image

class Found(NamedTuple):
    """An image found in a source: the image manifest (`data`, parsed `manifest`,
    `digest`), the `index_record` (descriptor) of the index the reference named (or None), the `platform`
    the index gave (or None), the plan's `source` field, and `read_blob(digest,
    size, limit, what)` (the config's bytes, checked against its digest: `config()`)."""

    data: bytes
    manifest: ImageManifest
    digest: Digest
    index_record: Optional[Descriptor]
    platform: Optional[Platform]
    source: dict[str, Any]
    read_blob: Callable[[Digest, Optional[int], int, str], bytes]

    def config(self) -> bytes:
        """The image config's bytes from the source, checked against the manifest's descriptor."""
        descriptor = self.manifest.config
        digest = Digest(descriptor["digest"])
        return self.read_blob(digest, descriptor["size"], MAX_CONFIG_SIZE, f"image config {digest}")


class _Matcher(NamedTuple):
    what: str  # "tagged 'x'"
    matches: Callable[[Descriptor], bool]


class _Unnamed(SourceError):
    """No index.json entry carries the name asked for."""


def _annotation(entry: Descriptor, key: str) -> Optional[str]:
    annotations = entry.get("annotations")
    value = annotations.get(key) if isinstance(annotations, dict) else None
    return value if isinstance(value, str) else None


def _find_in_index(store: LayoutStore | ArchiveStore, index_json: bytes, matcher: Optional[_Matcher],
                   digest: Optional[Digest], wanted: Platform) -> Found:
    what = f"{store.where}: index.json"
    top = parse_manifest(index_json, OCI_INDEX, what=what)
    if not isinstance(top, Index):
        raise SourceError(f"{what}: not an image index")
    entries = top.manifests
    if digest is not None:
        candidates = [e for e in entries if e["digest"] == digest]
        if not candidates:  # any manifest of the layout may be named by its digest
            data = store.read_blob(digest, None, MAX_MANIFEST_SIZE, f"manifest {digest}")
            parsed = parse_manifest(data, what=f"{store.where}: manifest {digest}")
            candidates = [{"mediaType": parsed.media_type, "digest": digest, "size": len(data)}]
    elif matcher is not None:
        candidates = [e for e in entries if matcher.matches(e)]
        if not candidates:
            tags = _listed(t for e in entries if (t := _annotation(e, REF_NAME)))
            raise _Unnamed(f"{store.where}: no image {matcher.what} (it has: {tags})", path=store.path)
    else:
        candidates = entries
        if not candidates:
            raise SourceError(f"{what}: lists no image", path=store.path)
    distinct = list({e["digest"]: e for e in candidates}.values())
    if len(distinct) == 1:
        chosen, platform = distinct[0], None
    elif all(e.get("platform") for e in distinct):
        # Entries of one name for several platforms: an index in all but name.
        chosen, platform = Index(OCI_INDEX, distinct).select(wanted)
    else:
        named = matcher.what if matcher else "in index.json"
        raise SourceError(f"{store.where}: {len(distinct)} images {named}; name one "
                          f"(tags: {_listed(t for e in distinct if (t := _annotation(e, REF_NAME)))}; "
                          f"or by digest: {distinct[0]['digest']}, ...)", path=store.path)

    def manifest_of(descriptor: Descriptor) -> ImageManifest | Index:
        d = Digest(descriptor["digest"])
        data = store.read_blob(d, descriptor["size"], MAX_MANIFEST_SIZE, f"{store.where}: manifest {d}")
        parsed = parse_manifest(data, descriptor["mediaType"], what=f"{store.where}: manifest {d}")
        if parsed.is_index != (descriptor["mediaType"] in INDEX_TYPES):
            raise ManifestError(f"{store.where}: manifest {d}: index.json names a {descriptor['mediaType']}, "
                                f"it is a {parsed.media_type}")
        return parsed

    index_record = None
    if chosen["mediaType"] in INDEX_TYPES:
        nested = manifest_of(chosen)
        assert isinstance(nested, Index)
        index_record = {"mediaType": nested.media_type, "digest": chosen["digest"], "size": chosen["size"]}

        def open_nested(descriptor: Descriptor) -> Index:
            opened = manifest_of(descriptor)
            assert isinstance(opened, Index)
            return opened

        chosen, platform = nested.select(wanted, open_nested=open_nested)
    elif chosen["mediaType"] not in IMAGE_TYPES:
        raise ManifestError(f"{store.where}: {chosen['digest']} is a {quoted(chosen['mediaType'])}, "
                            "not an image manifest or index")
    d = Digest(chosen["digest"])
    data = store.read_blob(d, chosen["size"], MAX_MANIFEST_SIZE, f"{store.where}: manifest {d}")
    manifest = parse_manifest(data, chosen["mediaType"], what=f"{store.where}: manifest {d}")
    if not isinstance(manifest, ImageManifest) or manifest.config_bytes is not None:
        raise ManifestError(f"{store.where}: manifest {d} is no schema2/OCI image manifest")
    return Found(data, manifest, d, index_record, platform, {}, store.read_blob)


def open_store(ref: SourceReference) -> LayoutStore | ArchiveStore:
    """The layout or archive `ref` names (SourceError if it is missing or no such thing)."""
    if ref.transport == OCI_LAYOUT:
        return LayoutStore(ref.path)
    if ref.transport == DOCKER_ARCHIVE:
        return ArchiveStore(ref.path)
    raise SourceError(f"unknown transport {quoted(ref.transport)}")
