"""Write images as tools write them without a registry: OCI image layouts (skopeo,
umoci, buildah: oci-layout, index.json, blobs/<alg>/<hex>) and `docker save`
archives (manifest.json form with <id>/layer.tar, and Docker 25's OCI form beside
it), plain or gzip, built with tarfile and json from the images the tests push
(tests.support.images.PushedImage)."""

import gzip
import hashlib
import io
import json
import os
import tarfile

import zstandard

from tests.support.images import OCI_INDEX, sha256

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


def uncompressed(layer):
    """The tar bytes of a tests.support.images.Layer."""
    if layer.data[:2] == b"\x1f\x8b":
        return gzip.decompress(layer.data)
    if layer.data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(layer.data)
    return layer.data


def manifest_descriptor(image, annotations=None, platform=False):
    d = {"mediaType": image.media_type, "digest": image.digest, "size": len(image.manifest)}
    if platform:
        d["platform"] = image.platform
    if annotations:
        d["annotations"] = dict(annotations)
    return d


def image_blobs(image):
    """{digest: bytes} of a pushed image: manifest, config, layers."""
    blobs = {image.digest: image.manifest, sha256(image.config): image.config}
    for layer in image.layers:
        blobs[layer.digest] = layer.data
    return blobs


def index_blob(images):
    """An OCI image index over pushed images, each entry with its platform: (digest, bytes)."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                       "manifests": [manifest_descriptor(i, platform=True) for i in images]}).encode()
    return sha256(body), body


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root, version="1.0.0"):
        self.root = str(root)
        os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(self.root, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": version}, f)
        self.entries = []

    def blob_path(self, digest):
        algorithm, hexpart = digest.split(":")
        return os.path.join(self.root, "blobs", algorithm, hexpart)

    def put(self, data):
        digest = sha256(data)
        with open(self.blob_path(digest), "wb") as f:
            f.write(data)
        return digest

    def add_image(self, image, tag=None, platform=False):
        for data in image_blobs(image).values():
            self.put(data)
        self.entries.append(manifest_descriptor(image, {REF_NAME: tag} if tag else None, platform))
        return self.write_index()

    def add_index(self, images, tag=None):
        """A multi-platform image index over `images`, named `tag` in index.json."""
        for image in images:
            for data in image_blobs(image).values():
                self.put(data)
        digest, body = index_blob(images)
        self.put(body)
        entry = {"mediaType": OCI_INDEX, "digest": digest, "size": len(body)}
        if tag:
            entry["annotations"] = {REF_NAME: tag}
        self.entries.append(entry)
        self.write_index()
        return digest

    def write_index(self):
        with open(os.path.join(self.root, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}, f)
        return self


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_600_000_000
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def docker_save(path, images, form="manifest.json", compress=None):
    """Write a `docker save` archive of [(PushedImage, [repo tags])] to `path`.

    form "manifest.json": docker save before Docker 25: <config hex>.json, one
    <id>/layer.tar (uncompressed) per layer with VERSION and json, manifest.json and
    repositories. form "oci": Docker 25's: blobs/sha256/<hex> (the pushed blobs as
    they are), index.json (entries annotated with the image name and the tag),
    oci-layout, and manifest.json naming the same blobs. compress: None or "gzip"."""
    buf = io.BytesIO()
    manifest_json = []
    index_entries = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        written = set()
        for image, tags in images:
            if form == "oci":
                for digest, data in image_blobs(image).items():
                    if digest not in written:
                        written.add(digest)
                        _add(tar, f"blobs/sha256/{digest[7:]}", data)
                manifest_json.append({"Config": f"blobs/sha256/{sha256(image.config)[7:]}",
                                      "RepoTags": list(tags),
                                      "Layers": [f"blobs/sha256/{layer.digest[7:]}" for layer in image.layers]})
                for tag in tags or [None]:
                    annotations = {}
                    if tag:
                        annotations = {CONTAINERD_NAME: _docker_name(tag), REF_NAME: tag.rpartition(":")[2]}
                    index_entries.append(manifest_descriptor(image, annotations))
            else:
                config_name = f"{sha256(image.config)[7:]}.json"
                _add(tar, config_name, image.config)
                layer_names = []
                parent = ""
                for layer in image.layers:
                    layer_id = hashlib.sha256((parent + layer.diff_id).encode()).hexdigest()
                    _add(tar, f"{layer_id}/VERSION", b"1.0")
                    _add(tar, f"{layer_id}/json", json.dumps({"id": layer_id}).encode())
                    _add(tar, f"{layer_id}/layer.tar", uncompressed(layer))
                    layer_names.append(f"{layer_id}/layer.tar")
                    parent = layer_id
                manifest_json.append({"Config": config_name, "RepoTags": list(tags), "Layers": layer_names})
        _add(tar, "manifest.json", json.dumps(manifest_json).encode())
        if form == "oci":
            _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add(tar, "index.json", json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                "manifests": index_entries}).encode())
        else:
            _add(tar, "repositories", b"{}")
    data = buf.getvalue()
    if compress == "gzip":
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _docker_name(tag):
    name, _, version = tag.rpartition(":")
    if "/" not in name:
        name = f"library/{name}"
    if "." not in name.split("/")[0]:
        name = f"docker.io/{name}"
    return f"{name}:{version}"
