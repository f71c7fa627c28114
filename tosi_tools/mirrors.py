"""Mirrors: where a pull may get its bytes before the registry it names.

The sources of a pull are its mirrors, in order, then the origin (the registry
the reference names, or the `location` registries.conf rewrites it to). They
come from `--mirror` (`mirror_flag`) or, without that flag, from the
configuration (`registries.RegistryConfig.lookup`): `--mirror` replaces the
mirrors the configuration gives for the reference, it does not add to them;
blocked prefixes, location rewrites and short names still come from the
configuration.

A `MirrorSpec` is one mirror as the plan records it (image record "mirrors":
registry, endpoint, repository, insecure). Nothing from a mirror is trusted:
resolve accepts a manifest only if it hashes to the digest asked for (or the
tag's answer names), fetch a blob only if it matches the plan's digest. A
mirror gets the credentials the keychain has for the mirror's own host, never
the origin's (`registry.RegistryClient` binds them).

`MirrorChain` is the `registry.BlobSource` over the mirrors and the origin:
`open` tries each in order and falls through to the next on a connection
error, a temporary status (5xx, 429), an unknown blob, a refusal (401/403) or
any other error answer; a mirror whose connection failed, or that refused the
credentials, is passed over for the rest of the run. `mismatched(digest)` is
how the downloader says the bytes were wrong: every mirror that sent bytes of
that attempt is passed over for that blob, and the download starts again from
the next source without counting against the digest retry budget (which the
origin's own mismatches still use up).
"""

import logging
import threading
from typing import Any, Iterable, NamedTuple, Optional, Sequence
from urllib.parse import urlsplit

from .errors import RegistryError, TLSFailure, TosiError, Unauthorized, Unreachable, UsageError, quoted
from .reference import Reference, is_registry_host

log = logging.getLogger("tosi.mirrors")

# What makes a source "fail" so that the next one is asked (RangeRefused, a
# RegistryError, is the downloader's business and is raised before these are looked at).
FALL_THROUGH = (Unreachable, RegistryError, TLSFailure)


class MirrorFlag(NamedTuple):
    """A --mirror value: [http(s)://]HOST[:PORT][/NAMESPACE]."""

    host: str
    scheme: Optional[str]  # None: as for a registry (https, or probed on loopback/--insecure)
    namespace: str  # "" or a repository prefix the mirror keeps the origin's repositories under
    text: str

    def for_repository(self, repository: str) -> str:
        return f"{self.namespace}/{repository}" if self.namespace else repository


def mirror_flag(text: str, flag: str = "--mirror") -> MirrorFlag:
    """Parse a --mirror value; UsageError (exit 2) when it is no registry URL."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{flag}: empty value")
    shown = text
    if "@" in text:  # a password in it is not repeated on stderr
        scheme_part, separator, rest_part = text.rpartition("://")
        shown = scheme_part + separator + "***@" + rest_part.rpartition("@")[2]
        raise UsageError(f"{flag} {quoted(shown)}: a mirror URL names no user or password "
                         "(credentials come from auth.json or the docker config)")
    scheme: Optional[str] = None
    rest = text.strip()
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme not in ("http", "https"):
            raise UsageError(f"{flag} {quoted(text)}: the scheme must be http or https")
    try:
        parts = urlsplit(f"//{rest}")
    except ValueError:
        parts = None
    if parts is None or parts.query or parts.fragment or "@" in parts.netloc or "?" in rest or "#" in rest:
        raise UsageError(f"{flag} {quoted(text)}: expected [http(s)://]HOST[:PORT][/NAMESPACE]")
    host = parts.netloc
    if not is_registry_host(host):
        raise UsageError(f"{flag} {quoted(text)}: {quoted(host)} is not a registry HOST[:PORT]")
    namespace = parts.path.strip("/")
    if namespace == "v2":  # a registry's API root, as some write mirror URLs
        namespace = ""
    if namespace:
        from .reference import _PATH_COMPONENT

        if not all(_PATH_COMPONENT.fullmatch(part) for part in namespace.split("/")):
            raise UsageError(f"{flag} {quoted(text)}: {quoted(namespace)} is not a repository namespace")
    return MirrorFlag(host, scheme, namespace, text)


class MirrorSpec(NamedTuple):
    """One mirror of a pull, as the plan's image record lists it in "mirrors"."""

    registry: str  # HOST[:PORT]: whose credentials it gets
    repository: str  # the repository asked there
    endpoint: Optional[str] = None  # the base URL; None until known (resolve finds it)
    insecure: bool = False  # plain http or unverified TLS may be spoken to it
    origin: str = ""  # what named it: "--mirror", a configuration file, "the plan"

    def to_record(self) -> dict[str, Any]:
        return {"registry": self.registry, "endpoint": self.endpoint, "repository": self.repository,
                "insecure": self.insecure}

    @classmethod
    def from_record(cls, fields: Any, origin: str = "the plan") -> "MirrorSpec":
        return cls(fields["registry"], fields["repository"], fields["endpoint"],
                   bool(fields.get("insecure")), origin)


class PullSources(NamedTuple):
    """Where one reference is pulled from: `mirrors` in order, then `origin` (the
    reference to ask the origin for: location rewrites applied) with `insecure`."""

    reference: Reference  # as named (after short-name resolution)
    origin: Reference
    insecure: bool  # the configuration marks the origin insecure
    mirrors: tuple  # of MirrorSpec (endpoint None: to be found)


def pull_sources(reference: Reference, config: Any = None,
                 flags: Sequence[MirrorFlag] = ()) -> PullSources:
    """The sources of `reference`: the configuration's (a registries.RegistryConfig;
    None: none), with the --mirror `flags` instead of its mirrors when given.
    Raises BlockedReference (exit 2) for a blocked prefix."""
    configured: tuple[Any, ...] = ()  # registries.Source, mirrors first
    if config is None:
        origin, insecure = reference, False
    else:
        pull = config.lookup(reference)
        origin, insecure = pull.origin.reference, pull.origin.insecure
        configured = tuple(pull.sources[:-1])
    mirrors: list[MirrorSpec] = []
    if flags:
        if any(source.used for source in configured):
            log.info("%s: --mirror replaces the mirrors of %s", reference,
                     ", ".join(sorted({source.path for source in configured if source.path})))
        for flag in flags:
            endpoint = f"{flag.scheme}://{flag.host}" if flag.scheme else None
            mirrors.append(MirrorSpec(flag.host, flag.for_repository(origin.repository), endpoint,
                                      flag.scheme == "http", "--mirror"))
    else:
        for source in configured:
            if not source.used:
                log.info("%s: mirror %s not used: %s", reference, source.registry, source.skip_reason)
                continue
            endpoint = f"{source.scheme}://{source.registry}" if source.scheme else None
            mirrors.append(MirrorSpec(source.registry, source.repository, endpoint, source.insecure,
                                      source.path))
    return PullSources(reference, origin, insecure, tuple(mirrors))


def flag_specs(flags: Sequence[MirrorFlag], repository: str, insecure: bool = False,
               workdir: Any = None) -> list[MirrorSpec]:
    """--mirror values as a plan's mirrors of `repository` (tosi-fetch --mirror): each
    with its endpoint (the flag's scheme, else found as a registry's is; `workdir`, a
    cache.Workdir, remembers a probe's answer)."""
    from .transport import detect_endpoint

    specs = []
    for flag in flags:
        if flag.scheme:
            endpoint = f"{flag.scheme}://{flag.host}"
        else:
            scheme_file = workdir.scheme_path(flag.host) if workdir is not None else None
            endpoint = detect_endpoint(flag.host, insecure, scheme_file=scheme_file) or ""
        specs.append(MirrorSpec(flag.host, flag.for_repository(repository), endpoint.rstrip("/"),
                                insecure or flag.scheme == "http", "--mirror"))
    return specs


def described(mirrors: Iterable[MirrorSpec]) -> str:
    return ", ".join(spec.endpoint or spec.registry for spec in mirrors)


# ---------------------------------------------------------------- blobs


class _Source(NamedTuple):
    blobs: Any  # a registry.BlobSource
    endpoint: str
    mirror: bool


class MirrorChain:
    """A BlobSource over mirrors (each a registry.RegistryBlobSource) and the origin,
    tried in that order for every blob (see the module's docstring)."""

    def __init__(self, mirrors: Sequence[Any], origin: Any, clients: Sequence[Any] = ()) -> None:
        self._sources = [_Source(source, _endpoint_of(source), True) for source in mirrors]
        self._sources.append(_Source(origin, _endpoint_of(origin), False))
        self._clients = list(clients)  # the mirrors' clients: closed with the chain
        self.name = " then ".join(source.blobs.name for source in self._sources)
        self._lock = threading.Lock()
        self._down: dict[str, str] = {}  # endpoint -> why it is passed over for the run
        self._rejected: dict[str, set] = {}  # digest -> endpoints whose bytes were wrong
        self._contributed: dict[str, list] = {}  # digest -> sources that sent bytes since the last verdict
        self._served: dict[str, str] = {}  # digest -> endpoint of the last source opened

    def open(self, digest: str, offset: int = 0, what: Optional[str] = None, timeout: Any = None) -> Any:
        from .registry import RangeRefused

        failures: list[tuple[str, TosiError]] = []
        for source in self._sources:
            skip = self._skip_reason(source, digest)
            if skip is not None:
                continue
            try:
                stream = source.blobs.open(digest, offset, what=what, timeout=timeout)
            except RangeRefused:
                raise
            except FALL_THROUGH as exc:
                if not source.mirror:
                    if failures:
                        raise _with_mirror_failures(exc, failures) from None
                    raise
                failures.append((source.endpoint, exc))
                self._note_failure(source, exc, what or f"blob {digest}")
                continue
            with self._lock:
                self._contributed.setdefault(str(digest), []).append(source)
                self._served[str(digest)] = source.endpoint
            if source.mirror:
                log.debug("%s: from mirror %s", what or digest, source.endpoint)
            elif failures:
                log.info("%s: from the origin %s", what or digest, source.endpoint)
            return stream
        raise AssertionError("the origin is never passed over")

    def _skip_reason(self, source: _Source, digest: str) -> Optional[str]:
        if not source.mirror:
            return None
        with self._lock:
            if source.endpoint in self._down:
                return self._down[source.endpoint]
            if source.endpoint in self._rejected.get(str(digest), ()):
                return "sent wrong bytes"
        return None

    def _note_failure(self, source: _Source, error: TosiError, what: str) -> None:
        lasting = isinstance(error, (Unauthorized, TLSFailure)) or (
            isinstance(error, Unreachable) and not isinstance(error, RegistryError))
        if lasting:
            with self._lock:
                first = source.endpoint not in self._down
                self._down[source.endpoint] = str(error)
            if first:
                log.warning("mirror %s failed (%s); using the next source for the rest of this run",
                            source.endpoint, error)
        else:
            log.info("%s: mirror %s failed (%s); trying the next source", what, source.endpoint, error)

    def mismatched(self, digest: str) -> bool:
        """The bytes of `digest` opened since the last verdict were wrong: the mirrors
        that sent them are passed over for this blob. True if one was (the download
        starts again from the next source), False if only the origin sent them."""
        key = str(digest)
        with self._lock:
            contributed = self._contributed.pop(key, [])
            mirrors = {source.endpoint for source in contributed if source.mirror}
            self._rejected.setdefault(key, set()).update(mirrors)
        for endpoint in sorted(mirrors):
            log.warning("blob %s from mirror %s did not match its digest; trying the next source",
                        digest, endpoint)
        return bool(mirrors)

    def served_by(self, digest: str) -> Optional[str]:
        """The endpoint that sent the last bytes of `digest`."""
        with self._lock:
            return self._served.get(str(digest))

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients = []


def _endpoint_of(source: Any) -> str:
    client = getattr(source, "client", None)
    return getattr(client, "endpoint", None) or source.name


def _with_mirror_failures(error: TosiError, failures: list) -> TosiError:
    from .transport import rewrap

    said = "; ".join(f"mirror {endpoint}: {exc}" for endpoint, exc in failures)
    return rewrap(error, f"{error} (after {said})")


def blob_source(image: Any, client: Any, repository: Optional[str] = None) -> Any:
    """The BlobSource of a plan's image record: its "mirrors" then `client`'s
    registry (the origin), or the origin alone when it names none. The mirrors'
    clients copy the origin client's settings (keychain, timeouts, retries, who may
    get Basic credentials over plain http) with each mirror's own registry (for
    credentials), endpoint and insecure; its CA bundle is the plan's caFile."""
    from .registry import RegistryBlobSource

    origin = RegistryBlobSource(client, repository if repository is not None else image.repository)
    specs = [MirrorSpec.from_record(fields) for fields in (image.get("mirrors") or ())]
    if not specs:
        return origin
    clients = [client.for_mirror(spec.endpoint, spec.registry, spec.repository, spec.insecure,
                                 ca_file=image.ca_file) for spec in specs]
    sources = [RegistryBlobSource(mirror_client, spec.repository) for mirror_client, spec in zip(clients, specs)]
    log.info("%s: blobs from %s, then %s", image.reference or image.repository, described(specs),
             client.endpoint)
    return MirrorChain(sources, origin, clients)
