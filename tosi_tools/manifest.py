"""Manifests and indexes: recognize the kind, validate the fields tosi uses, pick a platform.

Kinds: Docker schema2 manifest and manifest list, OCI image manifest and index,
and Docker schema1 (signed or not), which is converted to the same shape as a
schema2 manifest: layers bottom first with the "throwaway" (empty) entries
dropped, and a config synthesized from the top history entry (schema1 has no
config blob, no layer sizes and no diff IDs).
"""

import base64
import json
from collections.abc import Callable
from typing import Any, NoReturn

from .digest import Digest, digest_of
from .errors import ManifestError, NoMatchingPlatform, UsageError, flag, quoted
from .imageplatform import Platform, best_match

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 16 << 20
# An index nesting indexes: how deep (the top one is level 1), and how many nested in all.
MAX_INDEX_DEPTH = 4
MAX_NESTED_INDEXES = 16

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

# An OCI descriptor (or index entry) as parsed from JSON.
Descriptor = dict[str, Any]

IMAGE_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
SCHEMA1_TYPES = (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED)
ALL_TYPES = INDEX_TYPES + IMAGE_TYPES + SCHEMA1_TYPES
ACCEPT = ", ".join([*INDEX_TYPES, *IMAGE_TYPES, *(f"{t};q=0.5" for t in SCHEMA1_TYPES)])

# Index entries that annotate another manifest instead of being an image (buildx attestations).
_REFERENCE_TYPE = "vnd.docker.reference.type"


class ImageManifest:
    """An image manifest: `config` and `layers` are descriptors (dicts), layers bottom first.

    For schema1, `config_bytes` holds the synthesized config and `config` its descriptor.
    """

    def __init__(self, media_type: str, config: Descriptor, layers: list[Descriptor],
                 config_bytes: bytes | None = None) -> None:
        self.media_type = media_type
        self.config = config
        self.layers = layers
        self.config_bytes = config_bytes

    @property
    def is_index(self) -> bool:
        return False


class Index:
    """A manifest list or image index: `manifests` are the entries' descriptors."""

    def __init__(self, media_type: str, manifests: list[Descriptor]) -> None:
        self.media_type = media_type
        self.manifests = manifests

    @property
    def is_index(self) -> bool:
        return True

    def image_entries(self) -> list[tuple[Descriptor, Platform | None]]:
        """Entries that are images for some platform: attestations and other kinds are skipped."""
        entries: list[tuple[Descriptor, Platform | None]] = []
        for entry in self.manifests:
            if entry["mediaType"] not in IMAGE_TYPES + SCHEMA1_TYPES:
                continue
            annotations = entry.get("annotations") or {}
            if isinstance(annotations, dict) and _REFERENCE_TYPE in annotations:
                continue
            platform = Platform.from_dict(entry.get("platform"))
            if platform is not None and "unknown" in (platform.os, platform.architecture):
                continue
            entries.append((entry, platform))
        return entries

    def select(self, wanted: Platform, open_nested: Callable[[Descriptor], "Index"] | None = None,
               ) -> tuple[Descriptor, Platform | None]:
        """(descriptor, platform) of the image entry for `wanted` (a Platform).

        Without one, the indexes this one lists for `wanted` or for no platform (OCI lets
        an index nest indexes) are searched, depth first and in order:
        `open_nested(descriptor)` gives the Index a descriptor names (None: nested indexes
        are not searched). Past MAX_INDEX_DEPTH levels or MAX_NESTED_INDEXES opened
        (no loop can hash, but a hostile registry can nest deep or wide) it is a
        ManifestError; NoMatchingPlatform lists the platforms of every index searched.
        """
        platforms: set[str] = set()
        found = self._find(wanted, open_nested, platforms, depth=1, budget=[MAX_NESTED_INDEXES])
        if found is None:
            listed = ", ".join(sorted(platforms)) or "none"
            raise NoMatchingPlatform(
                f"no image for platform {wanted} in the index (it has: {listed}; choose one with {flag('platform')})"
            )
        return found

    def _find(self, wanted, open_nested, platforms, depth, budget):
        entries = self.image_entries()
        i = best_match(wanted, [platform for _entry, platform in entries])
        if i is not None:
            return entries[i]
        platforms.update(str(p) for _e, p in entries if p is not None)
        for entry in self._nested_indexes(wanted) if open_nested else ():
            if depth == MAX_INDEX_DEPTH or budget[0] == 0:
                raise ManifestError(f"index {entry['digest']}: more than {MAX_INDEX_DEPTH} levels or "
                                    f"{MAX_NESTED_INDEXES} indexes nested; refused")
            budget[0] -= 1
            found = open_nested(entry)._find(wanted, open_nested, platforms, depth + 1, budget)
            if found is not None:
                return found
        return None

    def _nested_indexes(self, wanted):
        nested = []
        for entry in self.manifests:
            platform = Platform.from_dict(entry.get("platform"))
            if entry["mediaType"] in INDEX_TYPES and (platform is None
                                                      or best_match(wanted, [platform]) is not None):
                nested.append(entry)
        return nested


def _fail(what: str, message: str) -> NoReturn:
    raise ManifestError(f"malformed {what}: {message}")


def check_descriptor(d: Any, what: str) -> Descriptor:
    """A descriptor dict with a valid mediaType, digest and size (returned as is)."""
    if not isinstance(d, dict):
        _fail(what, "descriptor is not an object")
    if not isinstance(d.get("mediaType"), str) or not d["mediaType"]:
        _fail(what, "descriptor has no mediaType")
    try:
        Digest(d.get("digest"))
    except UsageError as exc:
        _fail(what, f"descriptor digest: {exc}")
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        _fail(what, f"descriptor {d.get('digest')} has no valid size")
    urls = d.get("urls")
    if urls is not None and (not isinstance(urls, list) or not all(isinstance(u, str) for u in urls)):
        _fail(what, f"descriptor {d['digest']} has malformed urls")
    return d


def _decode_json(data, what):
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(what, f"not JSON ({exc})")
    except RecursionError:
        _fail(what, "not JSON this reader takes (nested too deeply)")
    if not isinstance(body, dict):
        _fail(what, "not a JSON object")
    return body


def media_type_of(body: Any, content_type: str | None = None) -> str | None:
    """The manifest's kind: its own mediaType field, else the HTTP Content-Type, else its shape."""
    declared = body.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    header = (content_type or "").split(";")[0].strip()
    if body.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1_SIGNED if "signatures" in body else DOCKER_SCHEMA1
    if header in ALL_TYPES:
        return header
    if "manifests" in body:
        return OCI_INDEX
    if "config" in body and "layers" in body:
        return OCI_MANIFEST
    return header or None


def parse_manifest(data: bytes, content_type: str | None = None,
                   what: str = "manifest") -> "ImageManifest | Index":
    """Parse manifest or index bytes into an ImageManifest or an Index."""
    if len(data) > MAX_MANIFEST_SIZE:
        raise ManifestError(f"{what}: larger than {MAX_MANIFEST_SIZE >> 20} MiB, refused")
    body = _decode_json(data, what)
    media_type = media_type_of(body, content_type)
    if media_type in INDEX_TYPES:
        if body.get("schemaVersion") != 2:
            _fail(what, f"schemaVersion {quoted(body.get('schemaVersion'))}, expected 2")
        manifests = body.get("manifests")
        if not isinstance(manifests, list):
            _fail(what, "index has no manifests list")
        return Index(media_type, [check_descriptor(m, what) for m in manifests])
    if media_type in IMAGE_TYPES:
        if body.get("schemaVersion") != 2:
            _fail(what, f"schemaVersion {quoted(body.get('schemaVersion'))}, expected 2")
        config = check_descriptor(body.get("config"), f"{what} config")
        layers = body.get("layers")
        if not isinstance(layers, list):
            _fail(what, "manifest has no layers list")
        return ImageManifest(media_type, config, [check_descriptor(layer, what) for layer in layers])
    if media_type in SCHEMA1_TYPES:
        return _convert_schema1(body, what)
    raise ManifestError(f"{what}: unsupported manifest type {quoted(media_type)}")


def _convert_schema1(body, what):
    fs_layers, history = body.get("fsLayers"), body.get("history")
    if not isinstance(fs_layers, list) or not isinstance(history, list) or not fs_layers:
        _fail(what, "schema1 manifest has no fsLayers/history")
    if len(fs_layers) != len(history):
        _fail(what, f"schema1 manifest has {len(fs_layers)} fsLayers but {len(history)} history entries")
    compat = []
    for entry in history:
        raw = entry.get("v1Compatibility") if isinstance(entry, dict) else None
        if not isinstance(raw, str):
            _fail(what, "schema1 history entry has no v1Compatibility")
        compat.append((raw, _decode_json(raw.encode(), f"{what} v1Compatibility")))
    layers = []
    # Both lists run top layer first; the plan runs bottom first.
    for fs_layer, (_raw, v1) in reversed(list(zip(fs_layers, compat))):
        if v1.get("throwaway"):
            continue
        blob = fs_layer.get("blobSum") if isinstance(fs_layer, dict) else None
        try:
            Digest(blob)
        except UsageError as exc:
            _fail(what, f"schema1 blobSum: {exc}")
        layers.append({"mediaType": DOCKER_LAYER_GZIP, "digest": blob})
    top = dict(compat[0][1])
    for key in ("id", "parent", "throwaway", "parent_id", "layer_id"):
        top.pop(key, None)
    top.setdefault("architecture", body.get("architecture"))
    top.setdefault("os", "linux")
    config_bytes = json.dumps(top, sort_keys=True, separators=(",", ":")).encode()
    config = {"mediaType": DOCKER_CONFIG, "digest": digest_of(config_bytes), "size": len(config_bytes)}
    return ImageManifest(DOCKER_SCHEMA1_SIGNED if "signatures" in body else DOCKER_SCHEMA1,
                         config, layers, config_bytes=config_bytes)


def schema1_payload(data: bytes) -> bytes | None:
    """A signed schema1 manifest's bytes without signatures: what the registry's digest names.

    libtrust signs data[:formatLength] + base64url(formatTail); the registry keeps that.
    """
    try:
        body = json.loads(data)
        protected = body["signatures"][0]["protected"]
        header = json.loads(_b64url(protected))
        return data[:header["formatLength"]] + _b64url(header["formatTail"])
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None


def _b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def content_digests(data: bytes, algorithm: str = "sha256") -> set[Digest]:
    """Digests by `algorithm` that may name these manifest bytes (a signed schema1 manifest:
    with and without its signatures, as registries differ in which they name)."""
    digests = {digest_of(data, algorithm)}
    if b'"signatures"' in data:
        payload = schema1_payload(data)
        if payload is not None:
            digests.add(digest_of(payload, algorithm))
    return digests


def config_platform(config_body: Any) -> Platform | None:
    """Platform named by an image config object, or None."""
    return Platform.from_dict(config_body) if isinstance(config_body, dict) else None


def parse_config(data: bytes, what: str = "image config") -> dict[str, Any]:
    """The config blob as a dict (checked to be a JSON object)."""
    return _decode_json(data, what)


def diff_ids(config_body: Any, layer_count: int, what: str = "image config") -> list[str] | None:
    """rootfs.diff_ids from the config, one per layer (checked), or None for schema1."""
    rootfs = config_body.get("rootfs")
    if rootfs is None:
        return None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        _fail(what, "rootfs has no diff_ids list")
    if len(ids) != layer_count:
        _fail(what, f"{len(ids)} diff_ids for {layer_count} layers")
    for d in ids:
        try:
            Digest(d)
        except UsageError as exc:
            _fail(what, f"diff_id: {exc}")
    return ids
