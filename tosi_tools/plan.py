"""The plan: the JSON-lines stream that flows between the stages (see tosi-plan(5)).

A plan is one image record followed by one record per layer, bottom layer first.
Every record is a JSON object on its own line with a "type" field. Stages read
the records they understand, add their own fields and pass every other field on
untouched, so a later version can add fields without breaking earlier readers.
Records are written and flushed one at a time so stages overlap across a pipe.

A record read is an `ImageRecord` or a `LayerRecord`: every known field checked
once, when it is made (types, digests, cache paths shaped as a workdir keeps
them), then read through typed attributes. A record is a read-only Mapping of its
JSON fields (unknown ones kept, in their order); a stage adds what it owns with
the `with_*` methods, which return a changed copy, so the record another stage
holds never changes under it, and one a stage did not touch is written back as
it was read.
"""

import collections
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, ClassVar, Self

from .cache import Workdir
from .digest import Digest
from .errors import PlanError, UsageError, quoted

PLAN_VERSION = 1
IMAGE = "image"
LAYER = "layer"

Checker = Callable[[str, str, Any], None]


BOM = "\ufeff"  # U+FEFF, the byte order mark: EF BB BF in UTF-8


def plan_line(line: str | bytes, lineno: int, source: str = "stdin") -> str:
    """Line `lineno` (1: the first of the stream) of a plan or digest list as text:
    the one rule for the bytes of what a stage reads on stdin (tosi-plan(5)).

    UTF-8, and nothing else: a line that is not (bytes that do not decode; text with
    a lone surrogate, which is how Python's surrogateescape reads such bytes) is a
    PlanError naming the line and the byte. A UTF-8 byte order mark at the very start
    of the stream is skipped (RFC 8259 lets a parser ignore it; some editors write
    one); anywhere else it is refused, as it is no JSON whitespace."""
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{source}: line {lineno} is not UTF-8 (byte 0x{line[exc.start]:02x} "
                            f"at column {exc.start + 1})") from None
    else:
        text = line
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = text[exc.start]
            shown = f"byte 0x{ord(bad) - 0xdc00:02x}" if "\udc80" <= bad <= "\udcff" \
                else f"lone surrogate U+{ord(bad):04X}"
            column = len(text[:exc.start].encode("utf-8", "surrogateescape")) + 1
            raise PlanError(f"{source}: line {lineno} is not UTF-8 ({shown} at column {column})") from None
    if lineno == 1 and text.startswith(BOM):
        text = text[len(BOM):]
    if text.lstrip().startswith(BOM):
        raise PlanError(f"{source}: line {lineno} starts with a byte order mark (U+FEFF), which "
                        "only the start of the input may have")
    return text


def _decode(line: str, lineno: int, source: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise PlanError(f"{source}: line {lineno} is not JSON ({getattr(exc, 'msg', exc)})") from None
    except RecursionError:
        raise PlanError(f"{source}: line {lineno} is not a plan record (nested too deeply)") from None
    if not isinstance(record, dict) or "type" not in record:
        raise PlanError(f"{source}: line {lineno} is not a plan record (no \"type\")")
    return record


# ---------------------------------------------------------------- the fields of a record
#
# Every field tosi-plan(5) names is checked here, once, when a record is read: its
# JSON type, and for digests their algorithm, length and hex. A known field may be
# absent or null unless said otherwise; unknown fields are kept as they are.

def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong(where: str, name: str, value: object, wanted: str) -> PlanError:
    return PlanError(f"{where}: {name} is {_json_type(value)}, not {wanted}")


def _string(where: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _wrong(where, name, value, "a string")
    if "\0" in value:
        raise PlanError(f"{where}: {name} {quoted(value)} holds a NUL character")


def _boolean(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise _wrong(where, name, value, "true or false")


def _count(where: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong(where, name, value, "an integer")
    if value < 0:
        raise PlanError(f"{where}: {name} is negative ({value})")


def _digest(where: str, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise PlanError(f"{where}: {name}: invalid digest: {_json_type(value)}, not a string")
    try:
        Digest(value)
    except UsageError as exc:
        raise PlanError(f"{where}: {name}: {exc}") from None


def _absolute(where: str, name: str, value: Any) -> None:
    _string(where, name, value)
    if not os.path.isabs(value):
        raise PlanError(f"{where}: {name} {quoted(value)} is not an absolute path")


def _registry(where: str, name: str, value: Any) -> None:
    from .reference import _DOMAIN

    _string(where, name, value)
    if not _DOMAIN.fullmatch(value) or not _port_ok(value.rpartition("]")[2]):
        raise PlanError(f"{where}: {name} {quoted(value)} is not a registry host[:port]")


def _port_ok(host_tail: str) -> bool:
    _, colon, port = host_tail.rpartition(":")
    return not colon or (port.isdigit() and 0 < int(port) <= 65535)


def _endpoint(where: str, name: str, value: Any) -> None:
    from urllib.parse import urlsplit

    _string(where, name, value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
        good = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query \
            and not parts.fragment and "@" not in parts.netloc and parts.path.strip("/") == ""
    except ValueError:
        good = False
    if not good:
        raise PlanError(f"{where}: {name} {quoted(value)} is not an http(s)://HOST[:PORT] URL")


def _url(where: str, name: str, value: Any) -> None:
    _string(where, name, value)
    if not value.startswith(("http://", "https://")):
        raise PlanError(f"{where}: {name} {quoted(value)} is not an http(s) URL")


def _repository(where: str, name: str, value: Any) -> None:
    from .reference import _PATH_COMPONENT

    _string(where, name, value)
    if not value or not all(_PATH_COMPONENT.fullmatch(part) for part in value.split("/")):
        raise PlanError(f"{where}: {name} {quoted(value)} is not a repository name")


def _link(where: str, name: str, value: Any) -> None:
    _string(where, name, value)
    if not value or "/" in value or value in (".", ".."):
        raise PlanError(f"{where}: {name} {quoted(value)} is not a plain name inside the overlay dir")


def _strings(where: str, name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise _wrong(where, name, value, "an array of strings")
    for item in value:
        _string(where, f"{name} entry", item)


def _string_map(where: str, name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _wrong(where, name, value, "an object")
    for key, item in value.items():
        _string(where, f"{name} {quoted(key)}", item)


# The kinds of local source an image record's "source" names (offline.SOURCE_TYPES).
SOURCE_TYPES = ("oci-layout", "docker-archive")


def _source_type(where: str, name: str, value: Any) -> None:
    _string(where, name, value)
    if value not in SOURCE_TYPES:
        raise PlanError(f"{where}: {name} {quoted(value)} is not one of {', '.join(SOURCE_TYPES)}")


def _digest_map(where: str, name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _wrong(where, name, value, "an object")
    for key, item in value.items():
        _digest(where, f"{name} key", key)
        _string(where, f"{name} {quoted(key)}", item)


def _array_of(check: Checker) -> Checker:
    def check_all(where: str, name: str, value: Any) -> None:
        if not isinstance(value, list):
            raise _wrong(where, name, value, "an array")
        for number, item in enumerate(value):
            check(where, f"{name}[{number}]", item)
    return check_all


def _object(fields: Mapping[str, Checker], required: tuple[str, ...] = ()) -> Checker:
    def check(where: str, name: str, value: Any) -> None:
        if not isinstance(value, dict):
            raise _wrong(where, name, value, "an object")
        _check_fields(f"{where}: {name}", value, fields, required)
    return check


def _check_fields(where: str, record: Mapping[str, Any], fields: Mapping[str, Checker],
                  required: Iterable[str] = ()) -> None:
    for name in required:
        if record.get(name) is None:
            raise PlanError(f"{where}: no {name}")
    for name, check in fields.items():
        value = record.get(name)
        if value is not None:
            check(where, name, value)


_DESCRIPTOR: dict[str, Checker] = {"mediaType": _string, "digest": _digest, "size": _count}
_INDEX_FIELDS = dict(_DESCRIPTOR, path=_absolute)
_CONFIG_FIELDS = dict(_DESCRIPTOR, path=_absolute, savedConfig=_absolute, servedBy=_url)
_MIRROR_FIELDS: dict[str, Checker] = {"registry": _registry, "endpoint": _endpoint,
                                      "repository": _repository, "insecure": _boolean}
_PLATFORM_FIELDS: dict[str, Checker] = {"os": _string, "architecture": _string, "variant": _string}
_SOURCE_FIELDS: dict[str, Checker] = {"type": _source_type, "path": _absolute, "members": _digest_map}
_MOUNT_FIELDS: dict[str, Checker] = {"target": _absolute, "upper": _absolute, "work": _absolute,
                                     "readOnly": _boolean, "overlaydir": _absolute,
                                     "rootless": _string, "holder": _count, "view": _absolute}

IMAGE_FIELDS: dict[str, Checker] = {
    "planVersion": _count, "reference": _string, "registry": _registry, "endpoint": _endpoint,
    "repository": _repository, "tag": _string, "digest": _digest, "mediaType": _string,
    "size": _count, "manifestPath": _absolute, "index": _object(_INDEX_FIELDS, ("digest",)),
    "platform": _object(_PLATFORM_FIELDS), "config": _object(_CONFIG_FIELDS, ("digest",)),
    "workdir": _absolute, "layerCount": _count, "insecure": _boolean, "caFile": _string,
    "rootfs": _absolute, "mount": _object(_MOUNT_FIELDS),
    "source": _object(_SOURCE_FIELDS, ("type", "path")),
    "mirrors": _array_of(_object(_MIRROR_FIELDS, ("registry", "endpoint", "repository"))),
    "servedBy": _url,
}

LAYER_FIELDS: dict[str, Checker] = {
    "index": _count, "mediaType": _string, "digest": _digest, "size": _count, "urls": _strings,
    "annotations": _string_map, "diffID": _digest, "path": _absolute, "overlay": _absolute,
    "link": _link, "applied": _boolean, "servedBy": _url,
}


def check_image_record(record: Mapping[str, Any], where: str = "image record") -> None:
    """PlanError unless every known field of an image record has its type (digests
    their form, cache paths the shape of one); the record is not changed."""
    _check_fields(where, record, IMAGE_FIELDS, ("planVersion", "layerCount"))
    check_cache_path_shapes(record, where, kind=IMAGE)


def check_layer_record(record: Mapping[str, Any], where: str = "layer record") -> None:
    """PlanError unless every known field of a layer record has its type (digests
    their form, cache paths the shape of one); the record is not changed."""
    _check_fields(where, record, LAYER_FIELDS, ("index", "digest"))
    check_cache_path_shapes(record, where, kind=LAYER)


# ---------------------------------------------------------------- the records

class _Record(Mapping[str, Any]):
    """A plan record's JSON object, checked when made, read-only: a Mapping of its
    fields (unknown ones included, in their order). `with_fields` gives a copy with
    some fields set (in place when there already, else at the end), as dict(record,
    **fields) would, so an untouched record is written back byte for byte."""

    __slots__ = ("_fields",)
    KIND: ClassVar[str]
    FIELDS: ClassVar[Mapping[str, Checker]]
    _fields: dict[str, Any]

    def __init__(self, fields: Mapping[str, Any], where: str | None = None) -> None:
        """Check every known field of `fields` (a record's JSON object; kept as a copy).
        PlanError names `where` (default: the kind of record)."""
        kind = fields.get("type", self.KIND)
        if kind != self.KIND:
            raise PlanError(f"{where or f'{self.KIND} record'}: a {quoted(kind)} record, "
                            f"not a{'n' if self.KIND == IMAGE else ''} {self.KIND} record")
        self._check(fields, where)
        self._fields = dict(fields)

    def _check(self, fields: Mapping[str, Any], where: str | None) -> None:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError

    @classmethod
    def of(cls, record: Mapping[str, Any], where: str | None = None) -> Self:
        """`record` itself if it is one of these, else the record its fields make
        (checked): what a library function given a plain dict works on."""
        return record if isinstance(record, cls) else cls(record, where)

    def __getitem__(self, name: str) -> Any:
        return self._fields[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._fields!r})"

    def as_json(self) -> dict[str, Any]:
        """The record's JSON object (a copy), as PlanWriter writes it."""
        return dict(self._fields)

    def with_fields(self, **fields: Any) -> Self:
        """A copy with `fields` set, each checked (a field another stage owns is set
        through that stage's with_* method)."""
        where = self._where()
        for name, value in fields.items():
            check = self.FIELDS.get(name)
            if check is not None and value is not None:
                check(where, name, value)
        changed = dict(self._fields, **fields)
        check_cache_path_shapes(changed, where, kind=self.KIND)
        copy = object.__new__(type(self))
        copy._fields = changed
        return copy

    def _text(self, name: str) -> str | None:
        value: str | None = self._fields.get(name)
        return value

    def _object(self, name: str) -> Mapping[str, Any] | None:
        value: Mapping[str, Any] | None = self._fields.get(name)
        return value


class ImageRecord(_Record):
    """The image record of a plan (tosi-plan(5)); planVersion and layerCount required.

    Typed attributes for the known fields (None where absent or null); nested
    objects (index, platform, config, mount) as read-only Mappings of theirs."""

    __slots__ = ()
    KIND = IMAGE
    FIELDS = IMAGE_FIELDS

    def _check(self, fields: Mapping[str, Any], where: str | None) -> None:
        check_image_record(fields, where or "image record")

    def _where(self) -> str:
        return "image record"

    @property
    def plan_version(self) -> int:
        value: int = self._fields["planVersion"]
        return value

    @property
    def layer_count(self) -> int:
        value: int = self._fields["layerCount"]
        return value

    @property
    def reference(self) -> str | None:
        return self._text("reference")

    @property
    def registry(self) -> str | None:
        return self._text("registry")

    @property
    def endpoint(self) -> str | None:
        return self._text("endpoint")

    @property
    def repository(self) -> str | None:
        return self._text("repository")

    @property
    def tag(self) -> str | None:
        return self._text("tag")

    @property
    def digest(self) -> Digest | None:
        value = self._text("digest")
        return None if value is None else Digest(value)

    @property
    def media_type(self) -> str | None:
        return self._text("mediaType")

    @property
    def size(self) -> int | None:
        value: int | None = self._fields.get("size")
        return value

    @property
    def manifest_path(self) -> str | None:
        return self._text("manifestPath")

    @property
    def index(self) -> Mapping[str, Any] | None:
        return self._object("index")

    @property
    def platform(self) -> Mapping[str, Any] | None:
        return self._object("platform")

    @property
    def config(self) -> Mapping[str, Any] | None:
        return self._object("config")

    @property
    def config_digest(self) -> Digest | None:
        config = self.config
        return None if config is None else Digest(config["digest"])

    @property
    def config_size(self) -> int | None:
        config = self.config
        value: int | None = None if config is None else config.get("size")
        return value

    @property
    def config_path(self) -> str | None:
        config = self.config
        value: str | None = None if config is None else config.get("path")
        return value

    @property
    def saved_config(self) -> str | None:
        config = self.config
        value: str | None = None if config is None else config.get("savedConfig")
        return value

    @property
    def workdir(self) -> str | None:
        return self._text("workdir")

    @property
    def insecure(self) -> bool:
        return bool(self._fields.get("insecure"))

    @property
    def ca_file(self) -> str | None:
        return self._text("caFile")

    @property
    def source(self) -> Mapping[str, Any] | None:
        """Where the blobs are read from instead of a registry: {"type": "oci-layout" or
        "docker-archive", "path": absolute, "members"?: {digest: archive member}}."""
        return self._object("source")

    @property
    def rootfs(self) -> str | None:
        return self._text("rootfs")

    @property
    def mirrors(self) -> tuple[Mapping[str, Any], ...]:
        """The mirrors resolve used, in order (objects: registry, endpoint,
        repository, insecure); () when none."""
        return tuple(self._fields.get("mirrors") or ())

    @property
    def served_by(self) -> str | None:
        """The endpoint that answered for the manifest (None: the cache did)."""
        return self._text("servedBy")

    @property
    def mount(self) -> Mapping[str, Any] | None:
        return self._object("mount")

    # What the stages add.

    def with_workdir(self, root: str) -> Self:
        """fetch: the workdir the blobs are cached in."""
        return self.with_fields(workdir=root)

    def with_config_path(self, path: str, served_by: str | None = None) -> Self:
        """fetch: the cache path of the config blob (the record names a config) and,
        when it was downloaded, the endpoint that served it ("servedBy")."""
        if self.config is None:
            raise PlanError("image record: no config to give a path")
        config = dict(self.config, path=path)
        if served_by is not None:
            config["servedBy"] = served_by
        return self.with_fields(config=config)

    def with_mirrors(self, mirrors: Iterable[Mapping[str, Any]]) -> Self:
        """resolve (or fetch --mirror): the mirrors to try, in order, before the origin."""
        return self.with_fields(mirrors=[dict(mirror) for mirror in mirrors])

    def with_rootfs(self, target: str) -> Self:
        """unpack --into: the directory the layers were applied into."""
        return self.with_fields(rootfs=target)

    def with_mount(self, mount: Mapping[str, Any]) -> Self:
        """mount: the "mount" object (target, upper, work, readOnly, overlaydir, ...)."""
        return self.with_fields(mount=dict(mount))


class LayerRecord(_Record):
    """A layer record of a plan (tosi-plan(5)); index and digest required.

    Typed attributes for the known fields (None where absent or null)."""

    __slots__ = ()
    KIND = LAYER
    FIELDS = LAYER_FIELDS

    def _check(self, fields: Mapping[str, Any], where: str | None) -> None:
        check_layer_record(fields, where or f"layer record {quoted(fields.get('index'))}")

    def _where(self) -> str:
        return f"layer record {self.index}"

    @property
    def index(self) -> int:
        value: int = self._fields["index"]
        return value

    @property
    def digest(self) -> Digest:
        return Digest(self._fields["digest"])

    @property
    def media_type(self) -> str | None:
        return self._text("mediaType")

    @property
    def size(self) -> int | None:
        value: int | None = self._fields.get("size")
        return value

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._fields.get("urls") or ())

    @property
    def annotations(self) -> Mapping[str, str] | None:
        return self._object("annotations")

    @property
    def diff_id(self) -> Digest | None:
        """The digest of the uncompressed layer; None when the plan names none (schema1)."""
        value = self._text("diffID")
        return None if value is None else Digest(value)

    @property
    def path(self) -> str | None:
        return self._text("path")

    @property
    def overlay(self) -> str | None:
        return self._text("overlay")

    @property
    def link(self) -> str | None:
        return self._text("link")

    @property
    def applied(self) -> bool:
        return bool(self._fields.get("applied"))

    @property
    def served_by(self) -> str | None:
        """The endpoint (or foreign URL) fetch downloaded the blob from (None: cached)."""
        return self._text("servedBy")

    @property
    def name(self) -> str:
        """How messages name the layer: "<index> (<digest>)"."""
        return f"{self.index} ({self.digest})"

    # What the stages add.

    def with_path(self, path: str, served_by: str | None = None) -> Self:
        """fetch: the blob's cache path and, when it was downloaded, the endpoint (or
        foreign URL) that served it ("servedBy")."""
        if served_by is not None:
            return self.with_fields(path=path, servedBy=served_by)
        return self.with_fields(path=path)

    def with_overlay(self, overlay: str, link: str) -> Self:
        """unpack (per layer): the layer's overlay dir and its short name there."""
        return self.with_fields(overlay=overlay, link=link)

    def with_applied(self) -> Self:
        """unpack --into: the layer is in the target."""
        return self.with_fields(applied=True)


# ---------------------------------------------------------------- cache paths
#
# A stage never opens a file because a plan names it: it derives the path from the
# digest and its own workdir. A plan naming another path is refused, so that a plan
# cannot point a stage at a host file (or at another layer's cache entry).

CachePath = tuple[str, str, str, str]  # (field name, value, digest, derived path)


def _same_path(named: str, derived: str) -> bool:
    return os.path.normpath(named) == os.path.normpath(derived)


def _outside(where: str, name: str, value: str, digest: str, place: str) -> PlanError:
    return PlanError(f"{where}: {name} {quoted(value)} is not where {place} keeps {digest}; "
                     "plans name cache paths only inside their workdir")


def image_cache_paths(image: Mapping[str, Any], workdir: Workdir) -> list[CachePath]:
    """[(field name, value, digest, derived path)] for the cache paths an image record names."""
    found: list[CachePath] = []
    registry, repository = image.get("registry"), image.get("repository")

    def manifest(name: str, value: str, digest: str | None) -> None:
        if registry is None or repository is None or digest is None:
            raise PlanError(f"image record: {name} {quoted(value)} without the registry, repository "
                            "and digest that place it in the cache")
        found.append((name, value, digest, workdir.manifest_path(registry, repository, digest)))

    if image.get("manifestPath") is not None:
        manifest("manifestPath", image["manifestPath"], image.get("digest"))
    index = image.get("index")
    if isinstance(index, dict) and index.get("path") is not None:
        manifest("index path", index["path"], index["digest"])
    config = image.get("config")
    if isinstance(config, dict):
        digest = config["digest"]
        if config.get("path") is not None:
            found.append(("config path", config["path"], digest, workdir.config_path(digest)))
        if config.get("savedConfig") is not None:
            found.append(("config savedConfig", config["savedConfig"], digest,
                          workdir.saved_config_path(digest)))
    return found


def layer_cache_paths(layer: Mapping[str, Any], workdir: Workdir) -> list[CachePath]:
    """[(field name, value, digest, derived path)] for the cache paths a layer record names."""
    digest = layer["digest"]
    found: list[CachePath] = []
    if layer.get("path") is not None:
        found.append(("path", layer["path"], digest, workdir.layer_path(digest)))
    if layer.get("overlay") is not None:
        found.append(("overlay", layer["overlay"], digest, workdir.overlay_path(digest)))
    return found


# Field names as the functions above give them.
IMAGE_CACHE_PATHS = ("manifestPath", "index path", "config path", "config savedConfig")
LAYER_CACHE_PATHS = ("path", "overlay")


def _cache_paths(record: Mapping[str, Any], workdir: Workdir, where: str | None,
                 kind: str | None) -> tuple[list[CachePath], str]:
    kind = kind or (IMAGE if isinstance(record, ImageRecord) else
                    LAYER if isinstance(record, LayerRecord) else record.get("type"))
    if kind == IMAGE:
        return image_cache_paths(record, workdir), where or "image record"
    return layer_cache_paths(record, workdir), where or f"layer {record.get('index')}"


def check_cache_paths(record: Mapping[str, Any], workdir: Workdir, where: str | None = None,
                      fields: Iterable[str] | None = None) -> None:
    """PlanError if a (checked) record names, in `fields` (default: all of them), a
    cache path other than the one `workdir` (a cache.Workdir, with its overlay dir)
    derives from the digest: the fields a stage takes from its own workdir."""
    paths, where = _cache_paths(record, workdir, where, None)
    wanted = None if fields is None else set(fields)
    for name, value, digest, derived in paths:
        if (wanted is None or name in wanted) and not _same_path(value, derived):
            place = f"the overlay dir {workdir.overlays}" if name == "overlay" else \
                f"the workdir {workdir.root}"
            raise _outside(where, name, value, digest, place)


def check_cache_path_shapes(record: Mapping[str, Any], where: str | None = None,
                            kind: str | None = None) -> None:
    """PlanError unless every cache path a (checked) record names is where some workdir
    keeps that digest (<workdir>/layers/<hex>, <overlaydir>/<hex>, ...): what a stage
    passes on unused must still be a cache path, though maybe another workdir's (a plan
    resolved into one workdir and fetched into another names both). `kind`: IMAGE or
    LAYER (default: the record's own "type")."""
    # A workdir (and overlay dir) at "/": its paths are the suffixes to find.
    paths, where = _cache_paths(record, Workdir("/", "/"), where, kind)
    for name, value, digest, suffix in paths:
        if not os.path.normpath(value).endswith(suffix):
            raise _outside(where, name, value, digest, "a workdir")


class FdLines:
    """The lines (bytes) of a file descriptor, read without a buffer that would hide
    from `ready()` which lines have arrived: a PlanReader over a pipe checks every
    record already written before it gives the first layer, and the rest as they come."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._scanned = 0  # no newline before this offset of the buffer
        self._eof = False

    def _fill(self) -> None:
        data = os.read(self._fd, 1 << 16)
        if data:
            self._buffer += data
        else:
            self._eof = True

    def _has_line(self) -> bool:
        found = self._buffer.find(b"\n", self._scanned)
        self._scanned = len(self._buffer) if found < 0 else found
        return found >= 0

    def ready(self) -> bool:
        """True if the next line (or the end) is there already: reading it will not wait."""
        import select

        while not self._eof and not self._has_line():
            try:
                readable, _, _ = select.select([self._fd], [], [], 0)
            except (OSError, ValueError):
                return False
            if not readable:
                return False
            self._fill()
        return True

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        while not self._has_line():
            if self._eof:
                if not self._buffer:
                    raise StopIteration
                line = bytes(self._buffer)
                self._buffer.clear()
                self._scanned = 0
                return line
            self._fill()
        end = self._scanned + 1
        line = bytes(self._buffer[:end])
        del self._buffer[:end]
        self._scanned = 0
        return line


class PlanReader:
    """Reads a plan from a stream of lines: `.image` at once, then the layers by iteration.

    Every record is checked as it is read (check_image_record, check_layer_record:
    types, digests, cache paths shaped as a workdir keeps them); with `workdir` (a
    cache.Workdir, or a function of the image record giving one, then kept as
    `.workdir`) the cache paths named in `uses` (IMAGE_CACHE_PATHS,
    LAYER_CACHE_PATHS; default: all), the ones the stage takes from its workdir,
    must be that workdir's own (check_cache_paths). Iterating stops with PlanError if the stream
    ends before the number of layers the image record announces, which is how a
    stage notices that the stage before it failed half way. A second image record
    or a layer beyond that number is refused: before the first layer is given when
    it was there already (a stream with `ready()`, FdLines; a stage that reads the
    whole plan first), and in any case before the last layer is given, which waits
    for the end of the plan.
    """

    def __init__(self, stream: Iterable[str | bytes], source: str = "stdin",
                 workdir: Workdir | Callable[[ImageRecord], Workdir] | None = None,
                 uses: Iterable[str] | None = None) -> None:
        self._stream = stream
        self._lines = iter(stream)
        self._source = source
        self._lineno = 0
        self._ended = False
        self._pending: collections.deque[LayerRecord] = collections.deque()
        first = self._next_record()
        if first is None:
            raise PlanError(f"{source}: empty plan (did the stage before this one fail?)")
        if first.get("type") != IMAGE:
            raise PlanError(f"{source}: a plan starts with an image record, not {quoted(first.get('type'))}")
        version = first.get("planVersion")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PlanError(f"{source}: image record has no valid planVersion")
        if version > PLAN_VERSION:
            raise PlanError(
                f"{source}: plan version {version} is newer than this tool's {PLAN_VERSION}"
            )
        if not isinstance(first.get("layerCount"), int) or isinstance(first.get("layerCount"), bool):
            raise PlanError(f"{source}: image record has no layerCount")
        self.image = ImageRecord(first, f"{source}: image record")
        self.workdir = workdir(self.image) if callable(workdir) else workdir
        self._uses = None if uses is None else tuple(uses)
        if self.workdir is not None:
            check_cache_paths(self.image, self.workdir, f"{source}: image record", self._uses)
        self._expected = self.image.layer_count
        self._seen = 0

    def _next_record(self) -> dict[str, Any] | None:
        for line in self._lines:
            self._lineno += 1
            text = plan_line(line, self._lineno, self._source)
            if text.strip():
                return _decode(text, self._lineno, self._source)
        self._ended = True
        return None

    def _take(self, record: dict[str, Any]) -> LayerRecord | None:
        """The layer record `record` is, checked; None for a record of another kind."""
        kind = record.get("type")
        if kind == IMAGE:
            raise PlanError(f"{self._source}: line {self._lineno} is a second image record; "
                            "a plan describes one image")
        if kind != LAYER:
            # Unknown record kinds from newer stages are passed over, not fatal.
            return None
        if self._seen >= self._expected:
            raise PlanError(f"{self._source}: line {self._lineno} is a layer beyond the "
                            f"{self._expected} the image record announces (layerCount)")
        where = f"{self._source}: layer record {self._seen}"
        if record.get("index") != self._seen:
            raise PlanError(f"{where} has index {quoted(record.get('index'))}")
        if not isinstance(record.get("digest"), str):
            raise PlanError(f"{where} has no digest")
        layer = LayerRecord(record, where)
        if self.workdir is not None:
            check_cache_paths(layer, self.workdir, where, self._uses)
        self._seen += 1
        return layer

    def _next_layer(self) -> LayerRecord | None:
        """The next layer record, checked, waiting for it; None at the end of the plan."""
        while not self._ended:
            record = self._next_record()
            if record is not None and (layer := self._take(record)) is not None:
                return layer
        return None

    def _read_ready(self) -> None:
        """Check (and keep) the records that have arrived already, without waiting."""
        ready = getattr(self._stream, "ready", None)
        while ready is not None and not self._ended and ready():
            record = self._next_record()
            if record is not None and (layer := self._take(record)) is not None:
                self._pending.append(layer)

    def __iter__(self) -> Iterator[LayerRecord]:
        while True:
            record = self._pending.popleft() if self._pending else self._next_layer()
            if record is None:
                break
            self._read_ready()
            if record.index == self._expected - 1:
                # The last one: see the end of the plan first (a layer more is refused).
                while self._next_layer() is not None:
                    pass
            yield record
        if self._seen != self._expected:
            raise PlanError(
                f"{self._source}: plan ended after {self._seen} of {self._expected} layers "
                "(did the stage before this one fail?)"
            )

    def layers(self) -> list[LayerRecord]:
        return list(self)


class PlanWriter:
    """Writes plan records to a text stream, one flushed line each."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, record: Mapping[str, Any]) -> None:
        """One record (an ImageRecord, a LayerRecord or a plain dict) as one line."""
        fields = record.as_json() if isinstance(record, _Record) else record
        self._stream.write(json.dumps(fields, separators=(",", ":")) + "\n")
        self._stream.flush()

    def write_plan(self, image: Mapping[str, Any], layers: Iterable[Mapping[str, Any]]) -> None:
        """The image record, then each layer record as the iterable yields it."""
        self.write(image)
        for layer in layers:
            self.write(layer)


def new_image_record(**fields: Any) -> dict[str, Any]:
    """An image record's JSON object with the version and type set; callers add the
    rest, then make it an ImageRecord."""
    record: dict[str, Any] = {"type": IMAGE, "planVersion": PLAN_VERSION}
    record.update(fields)
    return record


def new_layer_record(index: int, descriptor: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A layer record's JSON object: the OCI descriptor's fields verbatim plus tosi's own
    (make it a LayerRecord to use it)."""
    record: dict[str, Any] = {"type": LAYER, "index": index}
    for key in ("mediaType", "digest", "size", "urls", "annotations"):
        if key in descriptor:
            record[key] = descriptor[key]
    record.update(fields)
    return record


def read_digest_list(lines: Iterable[str | bytes], source: str = "stdin") -> list[Digest]:
    """Digests from a plain list, one per line; blank lines and #comments are skipped.
    Its bytes follow the plan's rule (plan_line: UTF-8, a byte order mark only first)."""
    digests = []
    for lineno, line in enumerate(lines, 1):
        text = plan_line(line, lineno, source).strip()
        if not text or text.startswith("#"):
            continue
        try:
            digests.append(Digest(text))
        except UsageError as exc:
            raise PlanError(f"{source}: line {lineno}: {exc}") from None
    return digests
