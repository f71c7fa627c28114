"""Image references, parsed and normalized the way Docker does it.

The grammar is the distribution project's (reference/regexp.go):

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path-component ( "/" path-component )*
    domain     := domain-component ( "." domain-component )* [ ":" port ]  |  "[" ipv6 "]" [ ":" port ]
    path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}

Docker's normalization on top: the first component is a registry only if it
contains "." or ":" or is "localhost" (or has upper case, which then fails as a
registry-less repository would not); otherwise the registry is docker.io, and a
single-component docker.io repository lives under "library/". "index.docker.io"
is docker.io. Without tag or digest the tag is "latest"; with both, the digest
decides what is pulled.
"""

import os
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from .digest import Digest
from .errors import InvalidReference, UsageError, quoted

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
DEFAULT_TAG = "latest"
NAME_MAX = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
)
MAX_PORT = 65535
# ASCII: distribution's grammar is Go's \w, which takes no other letters or digits.
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_HEX64 = re.compile(r"[a-f0-9]{64}")


class Reference:
    """A parsed reference: registry (as named, e.g. docker.io), repository, tag, digest."""

    __slots__ = ("registry", "repository", "tag", "digest")

    def __init__(self, registry: str, repository: str, tag: str | None = None,
                 digest: str | None = None) -> None:
        self.registry = registry
        self.repository = repository
        self.tag = tag
        self.digest = Digest(digest) if digest else None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def normalized(self) -> str:
        """Fully qualified text, e.g. docker.io/library/alpine:latest."""
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def manifest_reference(self) -> str | None:
        """What goes after /manifests/ in the URL: the digest if there is one, else the tag."""
        return self.digest or self.tag

    def __str__(self) -> str:
        return self.normalized()

    def __repr__(self) -> str:
        return f"Reference({self.normalized()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and self.normalized() == other.normalized()

    def __hash__(self) -> int:
        return hash(self.normalized())


def _split_tag_and_digest(text: str, original: str) -> tuple[str, str | None, Digest | None]:
    name, at, digest_text = text.partition("@")
    digest = None
    if at:
        if not digest_text:
            raise InvalidReference(f"invalid reference {quoted(original)}: empty digest after '@'")
        try:
            digest = Digest(digest_text)
        except UsageError as exc:
            raise InvalidReference(f"invalid reference {quoted(original)}: {exc}") from None
    # A tag follows the last ":" that comes after the last "/" (a ":" before it is a port).
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not tag:
            raise InvalidReference(f"invalid reference {quoted(original)}: empty tag after ':'")
        if not _TAG.fullmatch(tag):
            raise InvalidReference(
                f"invalid reference {quoted(original)}: invalid tag {quoted(tag)} "
                "(letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')"
            )
    return name, tag, digest


def _check_path(path: str, original: str) -> None:
    if not path:
        raise InvalidReference(f"invalid reference {quoted(original)}: empty repository name")
    for component in path.split("/"):
        if not component:
            raise InvalidReference(f"invalid reference {quoted(original)}: empty path component in {quoted(path)}")
        if not _PATH_COMPONENT.fullmatch(component):
            if component.lower() != component and _PATH_COMPONENT.fullmatch(component.lower()):
                raise InvalidReference(
                    f"invalid reference {quoted(original)}: repository name must be lower case ({quoted(component)})"
                )
            raise InvalidReference(
                f"invalid reference {quoted(original)}: invalid repository path component {quoted(component)}"
            )


def _check_port(host: str, what: str, error: Callable[[str], Exception]) -> None:
    """Refuse a HOST:PORT whose port is no TCP port (1 to 65535)."""
    _, colon, port = host.rpartition("]")[2].rpartition(":")
    if not colon:
        return
    digits = port.lstrip("0")
    if not (port.isascii() and port.isdigit() and 0 < len(digits) <= 5 and int(digits) <= MAX_PORT):
        raise error(f"{what}: port {quoted(port)} is not between 1 and {MAX_PORT}")


def _canonical_registry(domain: str) -> str:
    return DOCKER_HUB if domain in (DOCKER_HUB, *DOCKER_HUB_ALIASES) else domain


def _split_domain(name: str) -> tuple[str | None, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        return first, rest
    return None, name


def _repository_for(registry: str, path: str) -> str:
    if registry == DOCKER_HUB and "/" not in path:
        return f"library/{path}"
    return path


def parse_reference(text: str, default_registry: str = DOCKER_HUB) -> Reference:
    """Parse `text` into a Reference; raise InvalidReference naming what is wrong.

    `default_registry` is the registry of a reference without one (docker.io
    unless the caller knows better, e.g. the deprecated -url flag).
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidReference("invalid reference: empty image reference")
    original = text
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"invalid reference {quoted(original)}: contains white space")
    if "://" in text:
        raise InvalidReference(
            f"invalid reference {quoted(original)}: a reference names no scheme (drop the '...://')"
        )
    name, tag, digest = _split_tag_and_digest(text, original)
    domain, path = _split_domain(name)
    if domain is not None:
        if not _DOMAIN.fullmatch(domain):
            raise InvalidReference(f"invalid reference {quoted(original)}: invalid registry host {quoted(domain)}")
        _check_port(domain, f"invalid reference {quoted(original)}", InvalidReference)
        registry = _canonical_registry(domain)
    else:
        registry = _canonical_registry(default_registry)
    _check_path(path, original)
    if domain is None and _HEX64.fullmatch(path):
        raise InvalidReference(
            f"invalid reference {quoted(original)}: a 64-hex-digit repository name looks like an image ID; "
            "use NAME@sha256:<hex> for a digest"
        )
    repository = _repository_for(registry, path)
    if len(f"{registry}/{repository}") > NAME_MAX:
        raise InvalidReference(f"invalid reference {quoted(original)}: name longer than {NAME_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def reference_with_base_url(image: str, url: str) -> tuple[Reference, str]:
    """For the original tool's deprecated `-url URL -image REPO[:TAG]`: (Reference, endpoint).

    The URL names the registry's scheme, host and port; the image names the
    repository on it (a registry host in the image itself must agree with the URL).
    """
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"invalid registry URL {quoted(url)}: expected http(s)://HOST[:PORT]")
    if parts.path.strip("/") not in ("", "v2") or parts.query or parts.fragment:
        raise UsageError(f"invalid registry URL {quoted(url)}: expected no path after the host")
    host = parts.netloc.rpartition("@")[2]
    _check_port(host, f"invalid registry URL {quoted(url)}", UsageError)
    registry = _canonical_registry(host)
    ref = parse_reference(image, default_registry=registry)
    if ref.registry != registry:
        raise UsageError(
            f"image {quoted(image)} names registry {ref.registry}, but the URL names {host}"
        )
    endpoint = f"{parts.scheme}://{host}"
    return ref, endpoint


def is_registry_host(text: str) -> bool:
    """Whether `text` is a HOST[:PORT] the reference grammar takes as a registry
    (any host, e.g. "mirror:5000" or "cache": for where a URL names it)."""
    if not isinstance(text, str) or not _DOMAIN.fullmatch(text):
        return False
    try:
        _check_port(text, "", InvalidReference)
    except InvalidReference:
        return False
    return True


def names_registry(text: str) -> bool:
    """Whether the reference `text` starts with a registry host by Docker's rule
    (its first component has a "." or ":" or is "localhost"); else it is a short
    name, which Docker pulls from docker.io."""
    domain, _ = _split_domain(text.partition("@")[0])
    return domain is not None


# ---------------------------------------------------------------- images without a registry

OCI_LAYOUT = "oci"
DOCKER_ARCHIVE = "docker-archive"
SOURCE_TRANSPORTS = (OCI_LAYOUT, DOCKER_ARCHIVE)
# org.opencontainers.image.ref.name (image-spec annotations.md): components of alphanumerics
# joined by one of "-._:@+" or "--", separated by "/".
_REF_NAME_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_REF_NAME_COMPONENT}(?:/{_REF_NAME_COMPONENT})*")
_TRAILING_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


class SourceReference:
    """An image in a local source instead of a registry: `transport` OCI_LAYOUT (an OCI
    image layout directory: `tag` is an org.opencontainers.image.ref.name, or `digest`
    a manifest's) or DOCKER_ARCHIVE (a `docker save` tar: `name` the Reference its
    RepoTags or image-name annotations must match). `path` is absolute."""

    __slots__ = ("transport", "path", "tag", "digest", "name")

    def __init__(self, transport: str, path: str, tag: str | None = None,
                 digest: str | None = None, name: Reference | None = None) -> None:
        self.transport = transport
        self.path = path
        self.tag = tag
        self.digest = Digest(digest) if digest else None
        self.name = name

    def normalized(self) -> str:
        """oci:/abs/dir[:tag|@digest] or docker-archive:/abs/file[:registry/repository:tag]."""
        text = f"{self.transport}:{self.path}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        if self.name is not None:
            text += f":{self.name.normalized()}"
        return text

    def __str__(self) -> str:
        return self.normalized()

    def __repr__(self) -> str:
        return f"SourceReference({self.normalized()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SourceReference) and self.normalized() == other.normalized()

    def __hash__(self) -> int:
        return hash(self.normalized())


def is_source_reference(text: str) -> bool:
    """Whether `text` names a local source (oci:..., docker-archive:...), not a registry image."""
    return isinstance(text, str) and text.startswith(tuple(f"{t}:" for t in SOURCE_TRANSPORTS))


def parse_source_reference(text: str) -> SourceReference:
    """Parse oci:PATH[:TAG|@DIGEST] or docker-archive:PATH[:REF] as containers/image
    (skopeo, podman) does: PATH ends at the first ":" after the transport, so a path
    holding ":" cannot be named (name it through a symlink or a relative path without
    one); the rest is the tag (an OCI ref name, which may itself hold ":") or REF.
    oci:PATH@DIGEST names a manifest by digest (PATH then has no ":"). A relative
    PATH is taken from the current directory."""
    transport, _, rest = text.partition(":")
    original = text
    if transport not in SOURCE_TRANSPORTS:
        raise InvalidReference(f"invalid reference {quoted(original)}: not an oci: or docker-archive: reference")
    if "\0" in rest:
        raise InvalidReference(f"invalid reference {quoted(original)}: holds a NUL character")
    digest = None
    if transport == OCI_LAYOUT:
        found = _TRAILING_DIGEST.search(rest)
        if found and found.end() == len(rest) and ":" not in rest[:found.start()]:
            rest, digest = rest[:found.start()], found.group(1)
    path, colon, image = rest.partition(":")
    if not path:
        raise InvalidReference(f"invalid reference {quoted(original)}: no path after {transport}:")
    if colon and not image:
        what = "tag" if transport == OCI_LAYOUT else "image name"
        raise InvalidReference(f"invalid reference {quoted(original)}: empty {what} after the path's ':'")
    path = os.path.abspath(path)
    if transport == OCI_LAYOUT:
        if image and not _REF_NAME.fullmatch(image):
            raise InvalidReference(
                f"invalid reference {quoted(original)}: invalid tag {quoted(image)} (an OCI ref name: "
                "letters and digits joined by one of '-._:@+' or '--', components separated by '/')")
        return SourceReference(OCI_LAYOUT, path, tag=image or None, digest=digest)
    name = None
    if image:
        name = parse_reference(image)
        if name.digest is not None:
            raise InvalidReference(f"invalid reference {quoted(original)}: an archive's images are named "
                                   "by NAME:TAG, not by digest")
    return SourceReference(DOCKER_ARCHIVE, path, name=name)


def parse_any_reference(text: str) -> Reference | SourceReference:
    """A registry reference (parse_reference) or, for oci:... and docker-archive:...,
    an image of a local source (parse_source_reference)."""
    if is_source_reference(text):
        return parse_source_reference(text)
    return parse_reference(text)
