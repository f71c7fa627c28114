"""The resolve stage: from an image reference to the plan's image and layer records.

Resolution asks for the manifest with every Accept type at once, descends from an
index to the manifest of one platform, fetches and verifies the config, and
stores manifest, index and config bytes in the workdir, each atomically.

Warm runs are cheap: a digest reference whose manifest (and config) is cached
needs no request at all, and a tag that was resolved before costs one HEAD whose
Docker-Content-Digest names the cached bytes (a GET follows only when the
registry names no digest or the bytes are not cached).
"""

import json
import logging
import os
from collections.abc import Iterator
from typing import Any, Callable, Optional, Sequence

from .auth import Credentials, TokenCache
from .cache import Workdir, atomic_write, file_lock
from .digest import DIGEST_RETRIES, Digest, VerifyingHasher, digest_of, verify_file
from .errors import (
    DigestMismatch, ManifestError, NoMatchingPlatform, NotFound, Unauthorized, UsageError, counted, quoted,
)
from .keychain import Keychain
from .manifest import (
    ACCEPT, INDEX_TYPES, MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, SCHEMA1_TYPES, config_platform,
    content_digests, diff_ids, parse_config, parse_manifest,
)
from .plan import ImageRecord, LayerRecord, new_image_record, new_layer_record
from .imageplatform import Platform, host_platform
from .mirrors import FALL_THROUGH, MirrorFlag, PullSources, pull_sources
from .reference import Reference, SourceReference, parse_any_reference, parse_reference

log = logging.getLogger("tosi.resolve")

# VERIFIED_ON_READ: manifests and configs are checked against their digests whenever
# they are read from the cache (a bad one is fetched again), so they are stored
# without fsync: after a power loss one may be torn, never trusted.


class Resolver:
    """Resolves references against one workdir; `.client` is the RegistryClient it used.

    Credentials and TLS come from `keychain` (keychain.Keychain), else from
    `credentials`, `ca_file` and `insecure`. `client_factory(endpoint)` makes the
    client (default: a RegistryClient with those settings, the transport's retry
    policy); it is called only when a request is really needed, so a fully
    cached digest reference never opens a connection.

    With `workdir=None` nothing is read from or written to any cache (tosi-resolve
    --no-cache): every manifest and the config come from the registry, and the
    plan's cache paths (manifestPath, index.path, config.path and savedConfig,
    workdir) are null.
    """

    def __init__(self, workdir: Workdir | str | None, platform: Optional[Platform] = None,
                 credentials: Optional[Credentials] = None, insecure: bool = False,
                 ca_file: Optional[str] = None, client_factory: Optional[Callable[[str], Any]] = None,
                 token_cache: Optional[TokenCache] = None, keychain: Optional[Keychain] = None) -> None:
        self.workdir: Optional[Workdir] = (workdir if isinstance(workdir, Workdir) or workdir is None
                                           else Workdir(workdir))
        self.platform = platform
        if keychain is None:
            keychain = Keychain.of(credentials, os.path.abspath(ca_file) if ca_file else None, insecure)
        self.keychain = keychain
        self.tls = keychain.tls  # the registry's own once resolve() knows it
        self.token_cache = token_cache
        self._quick_heads = client_factory is None  # a caller's factory decides all transport
        self._client_factory = client_factory or self._default_client
        self.client = None
        self._endpoint: Optional[str] = None
        self._endpoint_guessed = False  # remembered, not probed: dropped before a client uses it
        self._probed: Optional[str] = None  # the endpoint a probe found, not yet remembered
        self._registry_host: Optional[str] = None
        self._repository: Optional[str] = None
        self._mirror = False
        self._digest_retries = DIGEST_RETRIES
        self._manifest_served: Optional[str] = None
        self._config_served: Optional[str] = None

    @property
    def insecure(self) -> bool:
        return self.tls.insecure

    @property
    def ca_file(self) -> Optional[str]:
        return self.tls.ca_file

    def _default_client(self, endpoint):
        from .registry import RegistryClient, mirror_keychain

        # A mirror gets the credentials stored for its own host, not those given for the origin.
        keychain = mirror_keychain(self.keychain) if self._mirror else self.keychain
        return RegistryClient(endpoint, keychain=keychain, registry=self._registry_host,
                              repository=self._repository, tls=self.tls, token_cache=self.token_cache)

    def _detect_endpoint(self, probe=True):
        from .transport import detect_endpoint

        scheme_file = self.workdir.scheme_path(self._registry_host) if self.workdir else None
        endpoint = detect_endpoint(self._registry_host, self.insecure, probe=probe, remember=False,
                                   scheme_file=scheme_file)
        if probe:
            self._probed = endpoint  # remembered once the registry answered (resolve)
        return endpoint

    def _remember_probed_scheme(self):
        """Keep the scheme a probe found in the workdir (transport.remember_scheme), now
        that the registry answered on it: a failed lookup leaves nothing behind."""
        if self.workdir and self._probed is not None and self._probed.rstrip("/") == self._endpoint:
            from .transport import remember_scheme

            remember_scheme(self.workdir.scheme_path(self._registry_host), self._registry_host,
                            self._probed, self.insecure)
        self._probed = None

    def _registry(self):
        if self._endpoint is None or self._endpoint_guessed:
            self._endpoint, self._endpoint_guessed = self._detect_endpoint().rstrip("/"), False
        if self.client is not None and self.client.endpoint != self._endpoint:
            self.client.close()  # a Resolver used for another registry
            self.client = None
        if self.client is None:
            self.client = self._client_factory(self._endpoint)
        return self.client

    # ------------------------------------------------------------ manifests

    def _cached_manifest(self, ref, digest):
        if self.workdir is None:
            return None
        path = self.workdir.manifest_path(ref.registry, ref.repository, digest)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            return None
        if len(data) > MAX_MANIFEST_SIZE or not _names(digest, data):
            log.warning("cached manifest %s is corrupt; fetching it again", path)
            return None
        return data

    def _store_manifest(self, ref, digest, data):
        if self.workdir is None:
            return None
        path = self.workdir.manifest_path(ref.registry, ref.repository, digest)
        atomic_write(path, data, durable=False)  # see VERIFIED_ON_READ
        return path

    def _send(self, method, ref, path, headers=None, stream=False):
        """One request under the transport's retry policy (RegistryClient.request)."""
        resp = self._registry().request(method, path, repository=self._repository, headers=headers,
                                        stream=stream)
        self._remember_probed_scheme()  # the registry answered on it
        return resp

    def _get(self, ref, path, what, headers=None):
        """A streamed 200 response for `path`, or the typed error for what the registry said."""
        client = self._registry()
        resp = self._send("GET", ref, path, headers=headers, stream=True)
        if resp.status_code != 200:
            with resp:
                client.check(resp, what)
                raise ManifestError(f"{what}: unexpected HTTP status {resp.status_code}")
        return resp

    def _get_manifest(self, ref, reference, what):
        """(bytes, Content-Type, Docker-Content-Digest) of a manifest by tag or digest."""
        client = self._registry()
        resp = self._get(ref, client.manifest_url(self._repository, reference), what,
                         headers={"Accept": ACCEPT})
        self._manifest_served = client.endpoint
        content_type = resp.headers.get("Content-Type")
        header_digest = resp.headers.get("Docker-Content-Digest")
        return client.read_limited(resp, MAX_MANIFEST_SIZE, what), content_type, header_digest

    def _manifest_by_digest(self, ref, digest, what, media_type=None):
        """(bytes, parsed) of a manifest, from the cache or fetched, verified, parsed and stored;
        `media_type` is the kind to assume when neither the bytes nor the answer name one."""
        data = self._cached_manifest(ref, digest)
        if data is not None:
            log.info("%s: cached", what)
            return data, parse_manifest(data, media_type, what=what)
        def fetch():
            data, content_type, _ = self._get_manifest(ref, digest, what)
            if not _names(digest, data):
                raise DigestMismatch(f"{what}: content hashes to {digest_of(data, digest.algorithm)}")
            return data, content_type

        data, content_type = _again_if_corrupt(fetch, self._digest_retries)
        manifest = parse_manifest(data, content_type or media_type, what=what)
        self._store_manifest(ref, digest, data)
        return data, manifest

    def _quick_head_digest(self, ref):
        """(answered, digest) from one HEAD of the tag without requests
        (transport.quick_head): answered is False when the client must ask instead,
        as if this had not been tried; digest is None when a 200 named none."""
        from .registry import manifest_url
        from .transport import quick_head

        challenged = self.workdir.challenged_path(self._registry_host) if self.workdir else None
        if not self._quick_heads or challenged is None or os.path.exists(challenged):
            return False, None
        if self._endpoint is None:
            remembered = self._detect_endpoint(probe=False)
            self._endpoint = (remembered or self._detect_endpoint()).rstrip("/")
            self._endpoint_guessed = remembered is not None
        answer = quick_head(self._endpoint, manifest_url(self._repository, ref.tag),
                            {"Accept": ACCEPT}, tls=self.tls)
        status, headers = answer or (None, None)
        if answer is not None:
            self._remember_probed_scheme()
        if status == 401:  # later runs go straight to the client, which has the token flow
            atomic_write(challenged, b"")
        if status != 200:
            return False, None
        self._endpoint_guessed = False  # it answered: the remembered scheme is right
        try:
            return True, Digest(headers.get("docker-content-digest", ""))
        except UsageError:
            return True, None

    def _head_digest(self, ref):
        answered, digest = self._quick_head_digest(ref)
        if answered:
            return digest
        client = self._registry()
        resp = self._send("HEAD", ref, client.manifest_url(self._repository, ref.tag),
                          headers={"Accept": ACCEPT})
        resp.close()
        if resp.status_code != 200:
            return None
        try:
            return Digest(resp.headers.get("Docker-Content-Digest", ""))
        except UsageError:
            return None

    def _top_manifest(self, ref):
        """(bytes, parsed, digest) of what the reference names, index or image."""
        what = f"manifest {ref}"
        if ref.digest:
            data, manifest = self._manifest_by_digest(ref, ref.digest, what)
            return data, manifest, ref.digest
        tag_file = self.workdir.tag_path(ref.registry, ref.repository, ref.tag) if self.workdir else None
        if tag_file and os.path.isdir(self.workdir.manifest_dir(ref.registry, ref.repository)):
            digest = self._head_digest(ref)
            data = self._cached_manifest(ref, digest) if digest else None
            if data is not None:
                log.info("%s: registry names %s, which is cached", ref, digest)
                self._manifest_served = self._endpoint
                _write_if_changed(tag_file, f"{digest}\n".encode())
                return data, parse_manifest(data, what=what), digest
        def fetch():
            data, content_type, header_digest = self._get_manifest(ref, ref.tag, what)
            if not header_digest:
                return data, content_type, digest_of(data)
            try:
                digest = Digest(header_digest)
            except UsageError:
                raise ManifestError(
                    f"{what}: registry sent a malformed Docker-Content-Digest {quoted(header_digest)}"
                ) from None
            if not _names(digest, data):
                raise DigestMismatch(
                    f"{what}: registry says {digest}, content hashes to {digest_of(data, digest.algorithm)}"
                )
            return data, content_type, digest

        data, content_type, digest = _again_if_corrupt(fetch, self._digest_retries)
        # Parsed before it is stored: a captive portal's page is no manifest to keep.
        manifest = parse_manifest(data, content_type, what=what)
        self._store_manifest(ref, digest, data)
        if tag_file:
            _write_if_changed(tag_file, f"{digest}\n".encode())
        return data, manifest, digest

    def _child_manifest(self, ref, entry):
        """(bytes, parsed) of the manifest an index entry names, checked against the entry."""
        digest = Digest(entry["digest"])
        what = f"manifest {ref.name}@{digest} (from the index)"
        if entry["size"] > MAX_MANIFEST_SIZE:
            raise ManifestError(f"manifest {ref.name}@{digest}: the index says {entry['size']} bytes, "
                                f"more than {MAX_MANIFEST_SIZE >> 20} MiB; refused")
        data, manifest = self._manifest_by_digest(ref, digest, what, media_type=entry["mediaType"])
        if entry["mediaType"] not in SCHEMA1_TYPES and len(data) != entry["size"]:
            raise DigestMismatch(
                f"manifest {ref.name}@{digest}: {len(data)} bytes, the index says {entry['size']}"
            )
        if manifest.is_index != (entry["mediaType"] in INDEX_TYPES):
            raise ManifestError(f"{what}: the index names a {entry['mediaType']}, it is a "
                                f"{manifest.media_type}")
        return data, manifest

    # ------------------------------------------------------------ config

    def _config(self, ref, descriptor):
        digest = Digest(descriptor["digest"])
        size = descriptor["size"]
        if size > MAX_CONFIG_SIZE:
            raise ManifestError(f"image config {digest}: {size} bytes, more than {MAX_CONFIG_SIZE >> 20} MiB")
        path = self.workdir.config_path(digest) if self.workdir else None
        data = _cached_config(path, digest, size) if path else None
        if data is not None:
            return data
        what = f"image config {ref.name}@{digest}"
        client = self._registry()

        def fetch():
            resp = self._get(ref, client.blob_url(self._repository, digest), what)
            data = client.read_limited(resp, MAX_CONFIG_SIZE, what)
            hasher = VerifyingHasher(digest, size, what="image config")
            hasher.update(data)
            hasher.check()
            return data

        if path is None:
            data = _again_if_corrupt(fetch, self._digest_retries)
            self._config_served = client.endpoint
            return data
        # Processes resolving the same image at once fetch its config once.
        with file_lock(Workdir.lock_of(path)):
            data = _cached_config(path, digest, size)
            if data is None:
                data = _again_if_corrupt(fetch, self._digest_retries)
                atomic_write(path, data, durable=False)  # see VERIFIED_ON_READ
                self._config_served = client.endpoint
        return data

    def _store_saved_config(self, digest, config_body):
        if self.workdir is None:
            return None
        path = self.workdir.saved_config_path(digest)
        _write_if_changed(path, json.dumps(config_body.get("config") or {}).encode())
        return path

    def _blob_sizes(self, ref, descriptors):
        """Fill in the sizes schema1 does not name, from the registry's HEAD of each blob."""
        client = self._registry()
        sizes = {}
        for descriptor in descriptors:
            digest = descriptor["digest"]
            if digest not in sizes:
                path = client.blob_url(self._repository, digest)
                resp = self._send("HEAD", ref, path)
                resp.close()
                if resp.status_code != 200:  # some registries refuse HEAD (404, 405) where GET works
                    resp = self._send("GET", ref, path, stream=True)
                    with resp:  # the headers only: the body is fetch's job
                        client.check(resp, f"layer {ref.name}@{digest}")
                length = resp.headers.get("Content-Length", "")
                sizes[digest] = int(length) if length.isdigit() else None
            if sizes[digest] is not None:
                descriptor["size"] = sizes[digest]

    def _start(self, ref, endpoint):
        """Speak to the registry of `ref` from now on (at `endpoint` if given)."""
        self._use(ref.registry, ref.repository, endpoint, False, mirror=False)

    def _use(self, registry: str, repository: str, endpoint: Optional[str], insecure: bool,
             mirror: bool) -> None:
        """Ask `registry` (a mirror, or the origin) for `repository` from now on."""
        if (registry, repository, mirror) != (self._registry_host, self._repository, self._mirror) \
                and self.client is not None:
            self.client.close()  # its credentials and TLS were another registry's
            self.client = None
        self._registry_host = registry
        self._repository = repository
        tls = self.keychain.tls_for(registry)
        self.tls = tls._replace(insecure=True) if insecure and not tls.insecure else tls
        # Without a given endpoint it is found when first needed: a cached digest
        # reference needs none, a warm tag takes the remembered scheme for its HEAD.
        self._endpoint = endpoint.rstrip("/") if endpoint else None
        self._endpoint_guessed = False
        self._probed = None
        # A mirror's wrong bytes are not asked for again: the next source is.
        self._mirror = mirror
        self._digest_retries = 0 if mirror else DIGEST_RETRIES
        self._manifest_served = None
        self._config_served = None

    def _endpoint_now(self) -> str:
        """The endpoint of the registry in use, probed if nothing said it yet."""
        if self._endpoint is None:
            self._endpoint = (self._detect_endpoint(probe=False) or self._detect_endpoint()).rstrip("/")
        return self._endpoint

    def list_tags(self, reference: Reference | str, page_size: Optional[int] = None,
                  endpoint: Optional[str] = None) -> Iterator[str]:
        """Yield the tags of the reference's repository, as the registry lists them
        (RegistryClient.list_tags, `page_size` a page); its tag or digest is ignored."""
        ref = reference if isinstance(reference, Reference) else parse_reference(reference)
        self._start(ref, endpoint)
        yield from self._registry().list_tags(ref.repository, page_size)
        self._remember_probed_scheme()

    def _cache_path(self, kind, *args):
        """Workdir.<kind>(*args), or None without a cache."""
        return None if self.workdir is None else getattr(self.workdir, kind)(*args)

    # ------------------------------------------------------------ the stage

    def resolve(self, reference: Reference | SourceReference | str, endpoint: Optional[str] = None,
                sources: Optional[PullSources] = None) -> tuple[ImageRecord, list[LayerRecord]]:
        """(image record, [layer records]) for a reference (text, a Reference, or a
        SourceReference: an image in an OCI layout or a docker-save archive).

        `sources` (mirrors.pull_sources) names the mirrors to ask first, in order,
        and the origin (the reference as registries.conf rewrites it); `endpoint`
        is the origin's. A mirror that fails (mirrors.FALL_THROUGH, or a manifest
        or config that is not what it should be) is passed over for the next."""
        ref = parse_any_reference(reference) if isinstance(reference, str) else reference
        if isinstance(ref, SourceReference):
            if self.workdir is None:
                raise UsageError("--no-cache reads images from a registry only")
            return self._resolve_source(ref)
        if self.workdir is not None:
            self.workdir.ensure()  # private and ours, before anything in it is read or written
        if sources is None:
            sources = PullSources(ref, ref, False, ())
        origin = sources.origin  # what the cache and the plan name: the registry pulled from
        failures = []
        found = None
        served: tuple = (None, None)
        mirrors = []
        for spec in sources.mirrors:
            self._use(spec.registry, spec.repository, spec.endpoint, spec.insecure, mirror=True)
            try:
                if found is None:
                    found = self._resolve_from(origin)
            except (*FALL_THROUGH, DigestMismatch, ManifestError) as exc:
                failures.append((self._endpoint or spec.registry, exc))
                log.warning("%s: mirror %s failed (%s); trying the next source", ref,
                            self._endpoint or spec.registry, exc)
            else:
                served = (self._manifest_served, self._config_served)
            mirrors.append(spec._replace(endpoint=self._endpoint_now(), insecure=self.insecure))
        self._use(origin.registry, origin.repository, endpoint, sources.insecure, mirror=False)
        if found is None:
            try:
                found = self._resolve_from(origin)
            except FALL_THROUGH as exc:
                if failures:
                    from .transport import rewrap

                    said = "; ".join(f"mirror {where}: {error}" for where, error in failures)
                    raise rewrap(exc, f"{exc} (after {said})") from None
                raise
            served = (self._manifest_served, self._config_served)
        return self._records(ref, origin, found, mirrors, served)

    def _resolve_from(self, ref: Reference) -> tuple:
        """What the registry in use (see _use) says `ref` (the origin's name, for the
        cache) is: (manifest, digest, manifest bytes, index record, platform, saved
        config path, diffIDs)."""
        wanted = self.platform or host_platform()

        top_data, top, top_digest = self._top_manifest(ref)
        index_record = None
        platform = None
        if top.is_index:
            entry, platform = top.select(wanted,
                                         open_nested=lambda nested: self._child_manifest(ref, nested)[1])
            index_record = {
                "mediaType": top.media_type, "digest": top_digest, "size": len(top_data),
                "path": self._cache_path("manifest_path", ref.registry, ref.repository, top_digest),
            }
            manifest_data, manifest = self._child_manifest(ref, entry)
            digest = Digest(entry["digest"])
            log.info("%s: index entry for %s is %s", ref, platform, digest)
        else:
            manifest, digest, manifest_data = top, top_digest, top_data

        if manifest.config_bytes is not None:
            self._blob_sizes(ref, manifest.layers)
            config_bytes = manifest.config_bytes
            if self.workdir is not None:
                atomic_write(self.workdir.config_path(manifest.config["digest"]), config_bytes,
                             durable=False)  # see VERIFIED_ON_READ
        else:
            config_bytes = self._config(ref, manifest.config)
        platform, saved, ids = self._config_facts(ref, manifest, platform, config_bytes, wanted)
        return manifest, digest, manifest_data, index_record, platform, saved, ids

    def _records(self, named: Reference, ref: Reference, found: tuple, mirrors: list,
                 served: tuple) -> tuple[ImageRecord, list[LayerRecord]]:
        """The plan of what _resolve_from found: `named` is the reference as named,
        `ref` the origin's (the registry in use), `mirrors` the MirrorSpecs asked first."""
        manifest, digest, manifest_data, index_record, platform, saved, ids = found
        manifest_served, config_served = served
        record = new_image_record(
            reference=named.normalized(),
            registry=ref.registry,
            endpoint=self._endpoint_now(),
            repository=ref.repository,
            tag=ref.tag,
            digest=digest,
            mediaType=manifest.media_type,
            size=len(manifest_data),
            manifestPath=self._cache_path("manifest_path", ref.registry, ref.repository, digest),
            index=index_record,
            platform=platform.to_dict() if platform else None,
            config={
                "mediaType": manifest.config["mediaType"],
                "digest": manifest.config["digest"],
                "size": manifest.config["size"],
                "path": self._cache_path("config_path", manifest.config["digest"]),
                "savedConfig": saved,
            },
            workdir=self.workdir.root if self.workdir else None,
            layerCount=len(manifest.layers),
            insecure=bool(self.insecure),
            caFile=self.ca_file,
        )
        if mirrors:  # a plan without mirrors stays as it was: its origin served everything
            record["mirrors"] = [spec.to_record() for spec in mirrors]
            if manifest_served:
                record["servedBy"] = manifest_served
            if config_served:
                record["config"]["servedBy"] = config_served
        image = ImageRecord(record)
        layers = [
            LayerRecord(new_layer_record(i, descriptor, diffID=ids[i] if ids else None))
            for i, descriptor in enumerate(manifest.layers)
        ]
        self._note_use(ref, digest, platform)
        log.info("%s: %s for %s, %s", ref, digest, platform or "an unnamed platform",
                 counted(len(layers), "layer"))
        return image, layers

    def _note_use(self, ref, digest, platform):
        """Touch the image's use record (tosi-gc lists images and removes the least recently
        used first), written when what it says changed. Never synced: a use time lost in a
        power loss only makes the image look older."""
        if self.workdir is None:
            return  # --no-cache: nothing is written
        path = self.workdir.image_record_path(ref.registry, ref.repository, digest)
        data = json.dumps({"reference": ref.normalized(),
                           "platform": platform.to_dict() if platform else None}).encode() + b"\n"
        try:
            with open(path, "rb") as f:
                same = f.read(len(data) + 1) == data
        except OSError:
            same = False
        if same:
            os.utime(path)
        else:
            atomic_write(path, data, durable=False)


    def _config_facts(self, ref, manifest, platform, config_bytes, wanted):
        """(platform, saved config path, diffIDs or None) from the config's bytes: a
        single image's platform comes from its config and must run what was asked."""
        config_body = parse_config(config_bytes, what=f"image config {manifest.config['digest']}")
        if platform is None:
            platform = config_platform(config_body)
            if self.platform is not None and (platform is None or not _runs(self.platform, platform)):
                raise NoMatchingPlatform(
                    f"{ref} is a single image for {platform or 'an unnamed platform'}, "
                    f"not for {self.platform}"
                )
            if platform is not None and not _runs(wanted, platform):
                log.warning("%s is an image for %s, not for this machine (%s)", ref, platform, wanted)
        saved = self._store_saved_config(manifest.config["digest"], config_body)
        ids = None if manifest.media_type in SCHEMA1_TYPES else diff_ids(
            config_body, len(manifest.layers), what=f"image config {manifest.config['digest']}")
        return platform, saved, ids

    # ------------------------------------------------------------ local sources

    def _resolve_source(self, ref: SourceReference) -> tuple[ImageRecord, list[LayerRecord]]:
        """The plan of an image in an OCI layout or a docker-save archive: no registry,
        no endpoint and no manifest in the cache (the source keeps it); the config is
        cached as for a registry's image and the record's "source" tells fetch where
        the blobs are (offline.blob_source)."""
        from .offline import open_store

        assert self.workdir is not None  # resolve() refuses a source without a cache
        self.workdir.ensure()
        wanted = self.platform or host_platform()
        found = open_store(ref).find(ref, wanted)
        manifest = found.manifest
        descriptor = manifest.config
        config_digest = Digest(descriptor["digest"])
        path = self.workdir.config_path(config_digest)
        what = f"image config {config_digest}"
        config_bytes = _cached_config(path, config_digest, descriptor["size"])
        if config_bytes is None:
            with file_lock(Workdir.lock_of(path)):
                config_bytes = _cached_config(path, config_digest, descriptor["size"])
                if config_bytes is None:
                    log.info("%s: %s from %s", ref, what, ref.path)
                    config_bytes = found.config()  # checked against its digest
                    atomic_write(path, config_bytes, durable=False)  # see VERIFIED_ON_READ
        platform, saved, ids = self._config_facts(ref, manifest, found.platform, config_bytes, wanted)
        image = ImageRecord(new_image_record(
            reference=ref.normalized(),
            registry=None,
            endpoint=None,
            repository=None,
            tag=ref.tag if ref.name is None else ref.name.tag,
            digest=found.digest,
            mediaType=manifest.media_type,
            size=len(found.data),
            manifestPath=None,
            index=found.index_record,
            platform=platform.to_dict() if platform else None,
            config={
                "mediaType": descriptor["mediaType"],
                "digest": descriptor["digest"],
                "size": descriptor["size"],
                "path": path,
                "savedConfig": saved,
            },
            workdir=self.workdir.root,
            layerCount=len(manifest.layers),
            insecure=False,
            caFile=None,
            source=found.source,
        ))
        layers = [
            LayerRecord(new_layer_record(i, layer, diffID=ids[i] if ids else None))
            for i, layer in enumerate(manifest.layers)
        ]
        log.info("%s: %s for %s, %d layers", ref, found.digest, platform or "an unnamed platform", len(layers))
        return image, layers


def _cached_config(path, digest, size):
    """The cached config's bytes if they match `digest`, else None (a bad one is fetched again)."""
    if not os.path.exists(path):
        return None
    try:
        verify_file(path, digest, size, what="cached image config")
        with open(path, "rb") as f:
            return f.read()
    except (DigestMismatch, OSError) as exc:
        log.warning("%s; fetching it again", exc)
        return None


def _again_if_corrupt(fetch, retries=DIGEST_RETRIES):
    """fetch(), again after a DigestMismatch (bytes corrupted on their way), at most
    `retries` more times (a mirror gets none: the next source is asked instead);
    the last mismatch says how many downloads there were."""
    for attempt in range(retries + 1):
        try:
            return fetch()
        except DigestMismatch as exc:
            if attempt == retries:
                if retries == 0:
                    raise
                raise DigestMismatch(f"{exc} (giving up after {attempt + 1} downloads)") from None
            log.info("%s; downloading it again", exc)


def _write_if_changed(path, data):
    # Warm runs leave files (and their mtimes) alone when nothing changed.
    try:
        with open(path, "rb") as f:
            if f.read(len(data) + 1) == data:
                return
    except OSError:
        pass
    atomic_write(path, data)


def _names(digest, data):
    return digest in content_digests(data, digest.algorithm)


def _runs(wanted, have):
    return any(have.normalized() == candidate for candidate in wanted.runs())


def resolve_image(reference_text: Reference | SourceReference | str, workdir: Workdir | str | None,
                  platform: Optional[Platform] = None, credentials: Optional[Credentials] = None,
                  insecure: bool = False, ca_file: Optional[str] = None,
                  client_factory: Optional[Callable[[str], Any]] = None, endpoint: Optional[str] = None,
                  token_cache: Optional[TokenCache] = None,
                  keychain: Optional[Keychain] = None, registries: Any = None,
                  mirrors: Sequence[MirrorFlag] = ()) -> tuple[ImageRecord, list[LayerRecord]]:
    """Resolve one reference: (image record, [layer records]); see Resolver for the
    client and where credentials and TLS come from.

    `registries` (a registries.RegistryConfig; None: no configuration) gives short
    names (text only: a Reference is taken as it is), blocked prefixes, location
    rewrites and mirrors; `mirrors` (mirrors.mirror_flag values, --mirror) replace
    the configured mirrors. A short name with several candidates (permissive
    unqualified-search-registries) is tried at each in order until one has it.
    An image in an OCI layout or a docker-save archive has neither."""
    resolver = Resolver(workdir, platform=platform, credentials=credentials, insecure=insecure,
                        ca_file=ca_file, client_factory=client_factory, token_cache=token_cache,
                        keychain=keychain)
    try:
        if isinstance(reference_text, str):
            parsed = parse_any_reference(reference_text)
            if isinstance(parsed, SourceReference):
                reference_text = parsed
        if isinstance(reference_text, SourceReference) or (registries is None and not mirrors):
            return resolver.resolve(reference_text, endpoint=endpoint)
        if isinstance(reference_text, Reference):
            candidates = [reference_text]
        elif registries is not None:
            candidates = registries.resolve_short_name(reference_text)
        else:
            candidates = [parse_reference(reference_text)]
        failures = []
        for candidate in candidates:
            sources = pull_sources(candidate, registries, mirrors)
            try:
                return resolver.resolve(candidate, endpoint=endpoint, sources=sources)
            except (NotFound, Unauthorized) as exc:
                if len(candidates) == 1:
                    raise
                log.info("%s: %s", candidate, exc)
                failures.append((candidate, exc))
        last = failures[-1][1]
        raise type(last)(f"{quoted(str(reference_text))}: no search registry has it ("
                         + "; ".join(f"{candidate}: {exc}" for candidate, exc in failures) + ")")
    finally:
        if resolver.client is not None:
            resolver.client.close()

