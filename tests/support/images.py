"""Build image layers with tarfile and push images through the registry's HTTP API.

Nothing here mocks the registry: blobs go up with POST + PUT uploads, manifests
with PUT, exactly as a client like docker or crane pushes them.
"""

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field

import requests
import zstandard

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- tar entries

def file_entry(name, data=b"", mode=0o644, uid=0, gid=0, mtime=1_600_000_000, pax=None):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.uid, info.gid, info.mtime = uid, gid, mtime
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def dir_entry(name, mode=0o755, uid=0, gid=0, mtime=1_600_000_000, pax=None):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.uid, info.gid, info.mtime = uid, gid, mtime
    if pax:
        info.pax_headers = dict(pax)
    return info, None


def symlink_entry(name, target, uid=0, gid=0, mtime=1_600_000_000, pax=None):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    info.uid, info.gid, info.mtime = uid, gid, mtime
    if pax:
        info.pax_headers = dict(pax)
    return info, None


def hardlink_entry(name, target, mtime=1_600_000_000):
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    info.mtime = mtime
    return info, None


def special_entry(name, kind, major=0, minor=0, mode=0o644, uid=0, gid=0):
    """kind: tarfile.CHRTYPE, BLKTYPE or FIFOTYPE."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = major, minor
    info.mode, info.uid, info.gid = mode, uid, gid
    info.mtime = 1_600_000_000
    return info, None


def whiteout_entry(path):
    """`.wh.<name>` next to the path it deletes."""
    head, _, tail = path.rstrip("/").rpartition("/")
    return file_entry(f"{head}/.wh.{tail}" if head else f".wh.{tail}")


def opaque_entry(directory):
    return file_entry(f"{directory.rstrip('/')}/.wh..wh..opq")


def tar_bytes(entries, format=tarfile.PAX_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def pax_record(key, value):
    """One PAX record, b"<length> <key>=<value>\\n", its length counting its own digits."""
    key = key.encode() if isinstance(key, str) else key
    value = value.encode() if isinstance(value, str) else value
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def gnu_posix_times(mtime="1700000000.123456789", atime="1700000001.5", ctime="1700000002.25"):
    """The records GNU tar --format=posix writes before every member (times as given)."""
    return pax_record("mtime", mtime) + pax_record("atime", atime) + pax_record("ctime", ctime)


def pax_header(records, name="PaxHeaders/f"):
    """A PAX extended header ('x') that holds `records` (bytes, well-formed or not) as they are."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.XHDTYPE
    info.size = len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def pax_tar(members, end=True):
    """A ustar archive of (records, entry) pairs: each entry after a PAX header of
    `records` (raw bytes; None: no PAX header), as GNU tar --format=posix lays them out."""
    out = []
    for records, (info, data) in members:
        if records is not None:
            out.append(pax_header(records, "PaxHeaders/" + info.name.rstrip("/").rpartition("/")[2]))
        data = data or b""
        out.append(info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512))
    if end:
        out.append(bytes(1024))
    return b"".join(out)


# ---------------------------------------------------------------- blobs

@dataclass
class Layer:
    data: bytes              # the blob as pushed (compressed or not)
    media_type: str
    diff_id: str             # sha256 of the uncompressed tar
    urls: list = field(default_factory=list)
    annotations: dict = field(default_factory=dict)

    @property
    def digest(self):
        return sha256(self.data)

    def descriptor(self):
        d = {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}
        if self.urls:
            d["urls"] = self.urls
        if self.annotations:
            d["annotations"] = self.annotations
        return d


def make_layer(entries=None, compression="gzip", oci=False, raw_tar=None):
    """A layer from tar entries (or ready tar bytes) compressed as asked."""
    tar = raw_tar if raw_tar is not None else tar_bytes(entries or [])
    if compression == "gzip":
        data = gzip.compress(tar, compresslevel=6, mtime=0)
        media = OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP
    elif compression == "zstd":
        data = zstandard.ZstdCompressor().compress(tar)
        media = OCI_LAYER_ZSTD
    elif compression in (None, "none"):
        data = tar
        media = OCI_LAYER_TAR
    else:
        raise ValueError(compression)
    return Layer(data=data, media_type=media, diff_id=sha256(tar))


def make_config(layers, os_="linux", arch="amd64", variant=None, config=None):
    body = {
        "architecture": arch,
        "os": os_,
        "config": config if config is not None else {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": "tosi-tools test"} for _ in layers],
    }
    if variant:
        body["variant"] = variant
    return json.dumps(body, sort_keys=True).encode()


# ---------------------------------------------------------------- pushing

class Pusher:
    """Pushes blobs and manifests to a registry; `session` may carry auth."""

    def __init__(self, base_url, session=None, verify=False):
        self.base = base_url.rstrip("/")
        self.session = session or requests.Session()
        self.session.verify = verify

    def push_blob(self, repo, data):
        digest = sha256(data)
        head = self.session.head(f"{self.base}/v2/{repo}/blobs/{digest}")
        if head.status_code == 200:
            return digest
        r = self.session.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        location = r.headers["Location"]
        if location.startswith("/"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        r = self.session.put(
            f"{location}{sep}digest={digest}", data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        r.raise_for_status()
        return digest

    def push_manifest(self, repo, reference, body, media_type):
        if not isinstance(body, bytes):
            body = json.dumps(body, indent=3).encode()
        r = self.session.put(
            f"{self.base}/v2/{repo}/manifests/{reference}", data=body,
            headers={"Content-Type": media_type},
        )
        if r.status_code >= 400:
            raise RuntimeError(f"manifest push {repo}:{reference}: {r.status_code} {r.text}")
        return sha256(body)

    def push_image(self, repo, tag, layers, oci=False, os_="linux", arch="amd64",
                   variant=None, config=None, skip_blobs=()):
        """Push layers, config and an image manifest; returns a PushedImage."""
        config_bytes = make_config(layers, os_, arch, variant, config)
        for layer in layers:
            if layer.digest not in skip_blobs:
                self.push_blob(repo, layer.data)
        self.push_blob(repo, config_bytes)
        media = OCI_MANIFEST if oci else DOCKER_MANIFEST
        manifest = {
            "schemaVersion": 2,
            "mediaType": media,
            "config": {
                "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
                "size": len(config_bytes),
                "digest": sha256(config_bytes),
            },
            "layers": [layer.descriptor() for layer in layers],
        }
        body = json.dumps(manifest, indent=3).encode()
        digest = self.push_manifest(repo, tag or sha256(body), body, media)
        return PushedImage(repo=repo, tag=tag, digest=digest, manifest=body, media_type=media,
                           config=config_bytes, layers=list(layers),
                           platform={"os": os_, "architecture": arch, **({"variant": variant} if variant else {})})

    def push_index(self, repo, tag, images, oci=True, extra_manifests=()):
        """Push an OCI index (or Docker manifest list) over already pushed images."""
        media = OCI_INDEX if oci else DOCKER_LIST
        entries = [
            {"mediaType": img.media_type, "size": len(img.manifest), "digest": img.digest,
             "platform": img.platform}
            for img in images
        ]
        entries.extend(extra_manifests)
        body = json.dumps({"schemaVersion": 2, "mediaType": media, "manifests": entries}, indent=3).encode()
        digest = self.push_manifest(repo, tag, body, media)
        return digest, body


@dataclass
class PushedImage:
    repo: str
    tag: str
    digest: str
    manifest: bytes
    media_type: str
    config: bytes
    layers: list
    platform: dict
