"""Where a reference is pulled from: containers' registries.conf and Docker's daemon.json.

A foundation: it reads configuration files and answers questions about
references; it opens no connection. `RegistryConfig.load()` reads

- containers-registries.conf(5), version 2 (version 1's [registries.*] lists
  are converted, as containers/image does): the main file
  (`/etc/containers/registries.conf`, or `$HOME/.config/containers/registries.conf`
  when that exists, or `$CONTAINERS_REGISTRIES_CONF`), then the drop-ins
  `registries.conf.d/*.conf` beside it (and the user's), in name order, each
  replacing what earlier files said: a `[[registry]]` per `prefix`, the
  `unqualified-search-registries` list and `short-name-mode` when it sets them,
  `[aliases]` per name ("" erases one); then containers' machine-written
  `short-name-aliases.conf`, whose aliases win over all of them.
  `$TOSI_REGISTRIES_CONF` names one file to read instead of all of that ("":
  none).
- Docker's `/etc/docker/daemon.json` (`$TOSI_DOCKER_DAEMON_JSON`; "": none):
  `registry-mirrors` (URLs) serve docker.io references that no `[[registry]]`
  prefix matches; `insecure-registries` (HOST[:PORT] or a CIDR matched against
  literal IP addresses, no DNS) mark any source on those hosts insecure.

`config.lookup(reference)` gives a `Pull`: the sources to try in order, mirrors
first, the origin last, each naming the registry and repository to ask; a
mirror that does not serve this kind of reference (mirror-by-digest-only,
pull-from-mirror) is listed with `used` False and why. The [[registry]] chosen is
the one with the longest `prefix` that the reference's fully qualified text
starts with, the match ending at the end of the text or before "/", "@", or a
":" after the host (a tag: containers/image also lets "example.com" match
"example.com:5000/...", which it calls unintended). A prefix "*.example.com"
matches any host below example.com (not example.com itself), any port. The
repository pulled is the text with the matched prefix replaced by `location`
(a mirror's by its own `location`).

`config.resolve_short_name(text)` turns a name without a registry host into the
fully qualified references to try: its alias, else one per
unqualified-search-registry, else (nothing configured) docker.io, as Docker and
`parse_reference` do. A fully qualified name is returned as it is.

Files are read whole, at most MAX_CONFIG_BYTES; anything malformed raises one
`errors.ConfigError` naming the file. tomllib is imported only when a TOML file
exists (it costs a warm run about 5 ms).
"""

import json
import logging
import os
import stat
from typing import Mapping, NamedTuple, NoReturn, Optional
from urllib.parse import urlsplit

from .errors import AmbiguousShortName, BlockedReference, ConfigError, InvalidReference, quoted
from .reference import (
    DOCKER_HUB,
    Reference,
    is_registry_host,
    names_registry,
    parse_reference,
)

log = logging.getLogger("tosi.registries")

REGISTRIES_CONF = "etc/containers/registries.conf"
REGISTRIES_CONF_D = "etc/containers/registries.conf.d"
USER_REGISTRIES_CONF = ".config/containers/registries.conf"
USER_REGISTRIES_CONF_D = ".config/containers/registries.conf.d"
# root's machine-written aliases; other users': $XDG_CACHE_HOME (~/.cache)/containers/...
SHORT_NAME_ALIASES = "var/cache/containers/short-name-aliases.conf"
USER_SHORT_NAME_ALIASES = "containers/short-name-aliases.conf"
DOCKER_DAEMON_JSON = "etc/docker/daemon.json"

MAX_CONFIG_BYTES = 1 << 20

MIRROR_ALL = "all"
MIRROR_DIGEST_ONLY = "digest-only"
MIRROR_TAG_ONLY = "tag-only"
PULL_FROM_MIRROR = (MIRROR_ALL, MIRROR_DIGEST_ONLY, MIRROR_TAG_ONLY)
SHORT_NAME_MODES = ("enforcing", "permissive", "disabled")
DEFAULT_SHORT_NAME_MODE = "permissive"


class Mirror(NamedTuple):
    """A [[registry.mirror]] table, or a daemon.json registry-mirrors URL."""

    location: str
    insecure: bool = False
    pull_from_mirror: str = MIRROR_ALL
    scheme: Optional[str] = None  # named by a daemon.json URL; registries.conf names none


class RegistryEntry(NamedTuple):
    """A [[registry]] table. `location` is "" only under a wildcard prefix: the
    reference's own host."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple = ()
    path: str = ""  # the file that said it


class Source(NamedTuple):
    """One place to pull a reference from."""

    reference: Reference  # what to ask this source for: its registry, repository, tag, digest
    insecure: bool  # the configuration allows plain http and unverified TLS here
    mirror: bool
    used: bool  # False: a mirror that does not serve this kind of reference (see skip_reason)
    skip_reason: Optional[str] = None
    scheme: Optional[str] = None  # "http"/"https" when the configuration names one, else None
    path: str = ""  # the file that configured it; "" for a reference's own registry unconfigured

    @property
    def registry(self) -> str:
        """HOST[:PORT] as references name it (docker.io for Docker Hub)."""
        return self.reference.registry

    @property
    def repository(self) -> str:
        return self.reference.repository


class Pull(NamedTuple):
    """How to pull one reference: every configured source, in the order to try them."""

    reference: Reference  # the reference as named (its logical name)
    sources: tuple  # of Source: mirrors in order, then the origin (always used)
    prefix: Optional[str] = None  # the [[registry]] prefix that matched, if any
    path: Optional[str] = None  # the file of that [[registry]]

    @property
    def to_try(self) -> tuple:
        """The sources used for this reference, in order."""
        return tuple(source for source in self.sources if source.used)

    @property
    def origin(self) -> Source:
        return self.sources[-1]


class RegistryConfig:
    """The merged configuration. An instance made with no arguments configures
    nothing: each reference is pulled from its own registry, short names from
    docker.io."""

    def __init__(self, registries=(), search_registries=(), search_path=None,
                 short_name_mode=DEFAULT_SHORT_NAME_MODE, aliases=None,
                 docker_mirrors=(), docker_insecure=(), docker_path=None, files=()):
        self.registries = tuple(sorted(registries, key=lambda entry: entry.prefix))
        self.search_registries = tuple(search_registries)
        self.search_path = search_path
        self.short_name_mode = short_name_mode
        # short name -> (fully qualified name or None when erased, file)
        self.aliases = dict(aliases or {})
        self.docker_mirrors = tuple(docker_mirrors)
        self.docker_insecure = tuple(docker_insecure)
        self.docker_path = docker_path
        self.files = tuple(files)  # every file read, in order

    def __repr__(self):
        return f"RegistryConfig(files={list(self.files)!r})"

    @classmethod
    def load(cls, root: str = "/", environ: Optional[Mapping[str, str]] = None,
             euid: Optional[int] = None) -> "RegistryConfig":
        """Read the configuration. `root` prefixes every system path (tests give a
        temporary directory); `environ` (default os.environ) gives HOME,
        XDG_CACHE_HOME, CONTAINERS_REGISTRIES_CONF, TOSI_REGISTRIES_CONF and
        TOSI_DOCKER_DAEMON_JSON; `euid` (default ours) picks root's or the user's
        short-name-aliases.conf."""
        environ = os.environ if environ is None else environ
        euid = os.geteuid() if euid is None else euid
        state = _Merged()
        for path, required, drop_in in _containers_files(root, environ):
            state.read_registries_conf(path, required, drop_in)
        aliases_file = _short_name_aliases_file(root, environ, euid)
        if aliases_file:
            state.read_aliases_file(aliases_file)
        daemon_json = environ.get("TOSI_DOCKER_DAEMON_JSON")
        if daemon_json is None:
            daemon_json = os.path.join(root, DOCKER_DAEMON_JSON)
        mirrors, insecure = (), ()
        if daemon_json:
            docker = _read_daemon_json(daemon_json, required="TOSI_DOCKER_DAEMON_JSON" in environ)
            if docker is not None:
                mirrors, insecure = docker
                state.files.append(daemon_json)
        if state.files:
            log.debug("registries configuration read from %s", ", ".join(state.files))
        return cls(
            registries=state.registries.values(),
            search_registries=state.search_registries,
            search_path=state.search_path,
            short_name_mode=state.short_name_mode or DEFAULT_SHORT_NAME_MODE,
            aliases=state.aliases,
            docker_mirrors=mirrors,
            docker_insecure=insecure,
            docker_path=daemon_json if mirrors or insecure else None,
            files=state.files,
        )

    def find(self, reference: Reference) -> Optional[RegistryEntry]:
        """The [[registry]] with the longest prefix matching `reference`, or None."""
        text = reference.normalized()
        best = None
        for entry in self.registries:
            if _match_end(text, entry.prefix) is not None and (best is None or len(entry.prefix) > len(best.prefix)):
                best = entry
        return best

    def lookup(self, reference: Reference) -> Pull:
        """The sources to pull `reference` from. Raises BlockedReference when its
        [[registry]] is blocked, ConfigError when a location turns it into no valid
        reference."""
        entry = self.find(reference)
        if entry is None:
            sources = []
            if reference.registry == DOCKER_HUB:
                sources = [self._docker_mirror_source(reference, mirror) for mirror in self.docker_mirrors]
            sources.append(Source(reference, self._insecure(reference.registry), mirror=False, used=True))
            return Pull(reference, tuple(sources))
        if entry.blocked:
            raise BlockedReference(
                f"pulling {reference} is blocked by [[registry]] prefix {quoted(entry.prefix)} "
                f"in {entry.path}", prefix=entry.prefix, path=entry.path)
        text = reference.normalized()
        end = _match_end(text, entry.prefix)
        assert end is not None  # the entry was found because its prefix matches
        digested = reference.digest is not None
        sources = []
        for mirror in entry.mirrors:
            skip = _mirror_skip_reason(entry, mirror, digested)
            rewritten = _rewrite(text, end, mirror.location, entry)
            sources.append(Source(rewritten, mirror.insecure or self._insecure(rewritten.registry),
                                  mirror=True, used=skip is None, skip_reason=skip, path=entry.path))
        rewritten = _rewrite(text, end, entry.location, entry) if entry.location else reference
        sources.append(Source(rewritten, entry.insecure or self._insecure(rewritten.registry),
                              mirror=False, used=True, path=entry.path))
        return Pull(reference, tuple(sources), prefix=entry.prefix, path=entry.path)

    def resolve_short_name(self, text: str) -> list:
        """The fully qualified references to try for `text`, in order: `text` itself
        when it names a registry; else its alias (with text's tag or digest);
        else one per unqualified-search-registry; else docker.io's. Raises
        InvalidReference for a malformed reference, AmbiguousShortName when
        short-name-mode "enforcing" meets several search registries."""
        reference = parse_reference(text)
        if names_registry(text):
            return [reference]
        name, suffix = _split_suffix(text)
        value, path = self.aliases.get(name, (None, None))
        if value is not None:
            log.debug("short name %s: alias %s from %s", name, value, path)
            return [_with_suffix(value + suffix, text, path)]
        if not self.search_registries:
            return [reference]
        if self.short_name_mode == "enforcing" and len(self.search_registries) > 1:
            raise AmbiguousShortName(
                f"short name {quoted(name)} is ambiguous: short-name-mode is \"enforcing\" and "
                f"{self.search_path} lists {len(self.search_registries)} unqualified-search-registries "
                f"({', '.join(self.search_registries)}); name the registry "
                f"(e.g. {self.search_registries[0]}/{name}) or define an alias")
        return [_with_suffix(f"{registry}/{name}{suffix}", text, self.search_path)
                for registry in self.search_registries]

    def _insecure(self, registry: str) -> bool:
        return bool(self.docker_insecure) and _listed_insecure(registry, self.docker_insecure)

    def _docker_mirror_source(self, reference: Reference, mirror: Mirror) -> Source:
        at_mirror = Reference(mirror.location, reference.repository, reference.tag, reference.digest)
        insecure = mirror.scheme == "http" or self._insecure(mirror.location)
        return Source(at_mirror, insecure, mirror=True, used=True, scheme=mirror.scheme,
                      path=self.docker_path or "")


# --- Matching and rewriting -------------------------------------------------------------


def _match_end(text: str, prefix: str) -> Optional[int]:
    """Where the part of the fully qualified reference `text` that `prefix`
    matches ends, or None when it does not match."""
    if prefix.startswith("*."):
        host = text.partition("/")[0]
        hostname = host.partition(":")[0]  # wildcard prefixes name DNS hosts: no IPv6 brackets
        suffix = prefix[1:]
        if len(hostname) > len(suffix) and hostname.endswith(suffix):
            return len(hostname)
        return None
    if not text.startswith(prefix):
        return None
    end = len(prefix)
    if end == len(text):
        return end
    after = text[end]
    if after in "/@" or (after == ":" and "/" in prefix):
        return end
    return None


def _rewrite(text: str, end: int, location: str, entry: RegistryEntry) -> Reference:
    """`text` with its first `end` characters (the matched prefix) replaced by `location`."""
    if not location:
        return parse_reference(text)
    rewritten = location + text[end:]
    try:
        return parse_reference(rewritten)
    except InvalidReference as exc:
        raise ConfigError(
            f"{entry.path}: [[registry]] prefix {quoted(entry.prefix)} with location "
            f"{quoted(location)} turns {text} into {quoted(rewritten)}, no valid reference ({exc})",
            path=entry.path) from None


def _mirror_skip_reason(entry: RegistryEntry, mirror: Mirror, digested: bool) -> Optional[str]:
    if entry.mirror_by_digest_only:
        return None if digested else "mirror-by-digest-only, and the reference names no digest"
    if mirror.pull_from_mirror == MIRROR_DIGEST_ONLY and not digested:
        return "pull-from-mirror is digest-only, and the reference names no digest"
    if mirror.pull_from_mirror == MIRROR_TAG_ONLY and digested:
        return "pull-from-mirror is tag-only, and the reference names a digest"
    return None


def _listed_insecure(registry: str, entries) -> bool:
    """Whether daemon.json's insecure-registries names `registry` (HOST[:PORT])."""
    for entry in entries:
        if entry == registry:
            return True
        if "/" in entry and _address_in(_host_of(registry), entry):
            return True
    return False


def _host_of(registry: str) -> str:
    """HOST of HOST[:PORT], an IPv6 literal without its brackets."""
    if registry.startswith("["):
        return registry[1:registry.find("]")]
    return registry.partition(":")[0]


def _address_in(host: str, network: str) -> bool:
    import ipaddress  # only for CIDR entries
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(network, strict=False)
    except ValueError:  # a name, not an address: Docker would resolve it; a pure module does not
        return False


def _split_suffix(text: str):
    """A short name's repository as written and its ":tag"/"@digest" suffix."""
    name, at, digest = text.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    suffix = ""
    if colon > slash:
        name, suffix = name[:colon], name[colon:]
    return name, suffix + (at + digest if at else "")


def _with_suffix(candidate: str, text: str, path) -> Reference:
    try:
        return parse_reference(candidate)
    except InvalidReference as exc:
        raise ConfigError(f"{path}: short name {quoted(text)} resolves to {quoted(candidate)}, "
                          f"no valid reference ({exc})", path=path) from None


# --- Reading files ----------------------------------------------------------------------


def _containers_files(root: str, environ: Mapping[str, str]):
    """(path, required, drop_in) for each containers registries file to read, in order."""
    only = environ.get("TOSI_REGISTRIES_CONF")
    if only is not None:
        return [(only, True, False)] if only else []
    home = environ.get("HOME")
    user_file = os.path.join(home, USER_REGISTRIES_CONF) if home else None
    user_dir = os.path.join(home, USER_REGISTRIES_CONF_D) if home else None
    system_dir = os.path.join(root, REGISTRIES_CONF_D)
    named = environ.get("CONTAINERS_REGISTRIES_CONF")
    if named:
        files, dirs = [(named, True, False)], [system_dir, user_dir]
    elif user_file and os.path.lexists(user_file):
        files, dirs = [(user_file, False, False)], [user_dir]
    else:
        files, dirs = [(os.path.join(root, REGISTRIES_CONF), False, False)], [system_dir, user_dir]
    for directory in dirs:
        if directory:
            files.extend((path, False, True) for path in _drop_ins(directory))
    return files


def _drop_ins(directory: str):
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise ConfigError(f"cannot list {directory}: {exc.strerror}", path=directory) from None
    paths = []
    for name in names:
        path = os.path.join(directory, name)
        if name.endswith(".conf") and not os.path.isdir(path):
            paths.append(path)
    return paths


def _short_name_aliases_file(root: str, environ: Mapping[str, str], euid: int) -> Optional[str]:
    if "TOSI_REGISTRIES_CONF" in environ:
        return None
    if euid == 0:
        return os.path.join(root, SHORT_NAME_ALIASES)
    cache = environ.get("XDG_CACHE_HOME") or (
        os.path.join(environ["HOME"], ".cache") if environ.get("HOME") else None)
    return os.path.join(cache, USER_SHORT_NAME_ALIASES) if cache else None


def _read_text(path: str, required: bool) -> Optional[str]:
    """The file's text, None if it is missing and not required."""
    try:
        # O_NONBLOCK: a FIFO put where a file belongs must not hang the pull.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        if required:
            raise ConfigError(f"configuration file {path} does not exist", path=path) from None
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}", path=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"configuration file {path} is not a regular file", path=path)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(MAX_CONFIG_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}", path=path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration file {path} is larger than {MAX_CONFIG_BYTES} bytes", path=path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not UTF-8 text (byte {exc.start})", path=path) from None


def _read_toml(path: str, required: bool) -> Optional[dict]:
    text = _read_text(path, required)
    if text is None:
        return None
    import tomllib  # only when there is a file: 5 ms of a warm run otherwise
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML in {path}: {exc}", path=path) from None
    except RecursionError:
        raise ConfigError(f"malformed TOML in {path}: nested too deeply", path=path) from None


class _Fields:
    """Typed access to one TOML table of one file; wrong types raise ConfigError."""

    def __init__(self, table, path, where):
        self.table, self.path, self.where = table, path, where

    def fail(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.path}: {self.where}{message}", path=self.path)

    def get(self, key, kind, default=None):
        if key not in self.table:
            return default
        value = self.table[key]
        if not isinstance(value, kind):
            self.fail(f"{key} must be {_KIND_NAMES[kind]}, not {quoted(value)}")
        return value

    def strings(self, key):
        value = self.get(key, list)
        if value is not None and not all(isinstance(item, str) for item in value):
            self.fail(f"{key} must be an array of strings")
        return value

    def tables(self, key):
        value = self.table.get(key, [])
        if not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
            self.fail(f"{key} must be an array of tables ([[{key}]])")
        return value


_KIND_NAMES = {str: "a string", bool: "true or false", list: "an array", dict: "a table"}


class _Merged:
    """What the files read so far say, later files replacing earlier ones."""

    def __init__(self):
        self.registries = {}  # prefix -> RegistryEntry
        self.search_registries = ()
        self.search_path = None
        self.short_name_mode = None
        self.aliases = {}
        self.files = []

    def read_registries_conf(self, path, required, drop_in):
        document = _read_toml(path, required)
        if document is None:
            return
        self.files.append(path)
        top = _Fields(document, path, "")
        v1 = top.get("registries", dict)
        v2_keys = [key for key in ("registry", "unqualified-search-registries", "aliases",
                                   "short-name-mode", "credential-helpers") if key in document]
        if v1 is not None:
            if drop_in:
                top.fail("a drop-in must use the version 2 format ([[registry]]), not [registries.*]")
            if v2_keys:
                top.fail(f"mixes the version 1 format ([registries.*]) with version 2 ({v2_keys[0]})")
            entries, search = _convert_v1(v1, path)
        else:
            entries = [_registry_entry(table, path, number)
                       for number, table in enumerate(top.tables("registry"), 1)]
            search = top.strings("unqualified-search-registries")
        _check_conflicts(entries, path)
        seen = set()
        for entry in entries:
            # Within one file the first table of a prefix wins, as in containers/image.
            if entry.prefix not in seen:
                seen.add(entry.prefix)
                self.registries[entry.prefix] = entry
        if search is not None:
            self.search_registries = tuple(_search_registry(item, path) for item in search)
            self.search_path = path
        mode = top.get("short-name-mode", str)
        if mode:
            if mode not in SHORT_NAME_MODES:
                top.fail(f"short-name-mode must be one of {', '.join(SHORT_NAME_MODES)}, not {quoted(mode)}")
            self.short_name_mode = mode
        self.aliases.update(_aliases(top, path))

    def read_aliases_file(self, path):
        document = _read_toml(path, required=False)
        if document is None:
            return
        self.files.append(path)
        self.aliases.update(_aliases(_Fields(document, path, ""), path))


def _registry_entry(table, path, number) -> RegistryEntry:
    fields = _Fields(table, path, f"[[registry]] #{number}: ")
    location = _location(fields, fields.get("location", str, ""))
    prefix = fields.get("prefix", str, "")
    if prefix:
        prefix = _prefix(fields, prefix)
    elif location:
        prefix = location
    else:
        fields.fail("sets neither prefix nor location")
    if not location and not prefix.startswith("*."):
        fields.fail("has no location, which only a wildcard prefix (*.example.com) may omit")
    fields.where = f"[[registry]] prefix {quoted(prefix)}: "
    if "pull-from-mirror" in table:
        fields.fail("pull-from-mirror belongs in its [[registry.mirror]] tables")
    by_digest_only = fields.get("mirror-by-digest-only", bool, False)
    mirrors = []
    for mirror_table in fields.tables("mirror"):
        mirror_fields = _Fields(mirror_table, path, fields.where + "[[registry.mirror]]: ")
        mirror_location = _location(mirror_fields, mirror_fields.get("location", str, ""))
        if not mirror_location:
            mirror_fields.fail("has no location")
        mirror_fields.where = fields.where + f"mirror {quoted(mirror_location)}: "
        pull_from = mirror_fields.get("pull-from-mirror", str, "")
        if pull_from and pull_from not in PULL_FROM_MIRROR:
            mirror_fields.fail(f"pull-from-mirror must be one of {', '.join(PULL_FROM_MIRROR)}, "
                               f"not {quoted(pull_from)}")
        if pull_from and by_digest_only:
            mirror_fields.fail("pull-from-mirror cannot be set when the registry sets mirror-by-digest-only")
        mirrors.append(Mirror(mirror_location, mirror_fields.get("insecure", bool, False),
                              pull_from or MIRROR_ALL))
    return RegistryEntry(prefix, location, fields.get("insecure", bool, False),
                         fields.get("blocked", bool, False), by_digest_only, tuple(mirrors), path)


def _trimmed(fields, value, what):
    value = value.rstrip("/")
    if value.startswith(("http://", "https://")) or "://" in value:
        fields.fail(f"{what} {quoted(value)} names a scheme; write HOST[:PORT][/PATH] (use insecure = true for http)")
    return value


def _location(fields, value) -> str:
    """A location (or a non-wildcard prefix): HOST[:PORT][/NAMESPACE...][:TAG|@DIGEST]."""
    value = _trimmed(fields, value, "location")
    if value:
        _check_qualified(fields, value, "location")
    return value


def _prefix(fields, value) -> str:
    value = _trimmed(fields, value, "prefix")
    if value.startswith("*."):
        if any(c in value for c in "/@:") or not is_registry_host(value[2:]):
            fields.fail(f"wildcard prefix {quoted(value)} must have the form *.example.com "
                        "(no port, namespace, tag or digest)")
        return value
    if "*" in value:
        fields.fail(f"prefix {quoted(value)}: a wildcard may only start a prefix, as *.example.com")
    if not value:
        fields.fail("prefix is empty")
    _check_qualified(fields, value, "prefix")
    return value


def _check_qualified(fields, value, what):
    """`value` must start with a registry host and read as a (partial) reference."""
    host, slash, _ = value.partition("/")
    if not slash:
        if not (is_registry_host(host) and names_registry(f"{host}/x")):
            fields.fail(f"{what} {quoted(value)} is not a registry HOST[:PORT]")
        return
    if not names_registry(value):
        fields.fail(f"{what} {quoted(value)} does not start with a registry host "
                    "(a first component with '.' or ':', or localhost)")
    try:
        parse_reference(value)
    except InvalidReference as exc:
        fields.fail(f"{what} {quoted(value)} is no valid name ({exc})")


def _search_registry(value, path) -> str:
    fields = _Fields({}, path, "")
    value = value.rstrip("/")
    if not (is_registry_host(value) and names_registry(f"{value}/x")):
        fields.fail(f"unqualified-search-registries entry {quoted(value)} is not a registry HOST[:PORT] "
                    "(with a '.' or ':', or localhost)")
    return value


def _check_conflicts(entries, path):
    """Tables of one file naming the same registry must agree on insecure and blocked."""
    by_location = {}
    for entry in entries:
        key = entry.location or entry.prefix
        other = by_location.setdefault(key, entry)
        for setting, mine, theirs in (("insecure", entry.insecure, other.insecure),
                                      ("blocked", entry.blocked, other.blocked)):
            if mine != theirs:
                raise ConfigError(f"{path}: registry {quoted(key)} is defined more than once with "
                                  f"conflicting {setting} settings", path=path)


def _convert_v1(v1, path):
    """Version 1's [registries.search/insecure/block] lists as [[registry]] entries."""
    fields = _Fields(v1, path, "[registries] ")
    lists = {}
    for kind in ("search", "insecure", "block"):
        table = fields.get(kind, dict)
        lists[kind] = (_Fields(table, path, f"[registries.{kind}] ").strings("registries") or []) if table else []
    flags = {}
    for kind in ("insecure", "block"):
        for item in lists[kind]:
            location = _location(_Fields({}, path, f"[registries.{kind}] "), item)
            flags.setdefault(location, {"insecure": False, "block": False})[kind] = True
    entries = [RegistryEntry(location, location, insecure=flag["insecure"], blocked=flag["block"], path=path)
               for location, flag in flags.items()]
    return entries, lists["search"]


def _aliases(top, path) -> dict:
    table = top.get("aliases", dict)
    aliases = {}
    for name, value in (table or {}).items():
        fields = _Fields({}, path, f"[aliases] {quoted(name)}: ")
        if not isinstance(value, str):
            fields.fail(f"the value must be a string, not {quoted(value)}")
        _check_alias_name(fields, name)
        aliases[name] = (_alias_value(fields, value) if value else None, path)
    return aliases


def _check_alias_name(fields, name):
    if names_registry(name):
        fields.fail("an alias must be a short name, without a registry host")
    if ":" in name or "@" in name:
        fields.fail("an alias name takes no tag or digest")
    try:
        parse_reference(name)
    except InvalidReference as exc:
        fields.fail(f"not a valid short name ({exc})")


def _alias_value(fields: _Fields, value: str) -> str:
    if not names_registry(value):
        fields.fail(f"{quoted(value)} must be fully qualified (start with a registry host)")
    if "@" in value or ":" in value.rpartition("/")[2]:
        fields.fail(f"{quoted(value)} must name no tag or digest")
    try:
        return parse_reference(value).name
    except InvalidReference as exc:
        fields.fail(f"{quoted(value)} is no valid name ({exc})")


def _read_daemon_json(path: str, required: bool):
    """(mirrors, insecure registries) from Docker's daemon.json; None when it is missing."""
    text = _read_text(path, required)
    if text is None:
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"malformed JSON in {path}: {exc}", path=path) from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a JSON object", path=path)
    fields = _Fields(document, path, "")
    mirrors = tuple(_docker_mirror(fields, url) for url in fields.strings("registry-mirrors") or [])
    insecure = tuple(_docker_insecure(fields, item) for item in fields.strings("insecure-registries") or [])
    return mirrors, insecure


def _docker_mirror(fields, url) -> Mirror:
    shown = quoted(_without_userinfo(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        fields.fail(f"registry-mirrors entry {shown} is not an http(s):// URL")
    if "@" in parts.netloc or parts.query or parts.fragment:
        fields.fail(f"registry-mirrors entry {shown} may name no user, query or fragment")
    if parts.path.strip("/"):
        fields.fail(f"registry-mirrors entry {shown}: tosi does not support a mirror below a path")
    host = parts.netloc
    if not is_registry_host(host):
        fields.fail(f"registry-mirrors entry {shown} names no valid HOST[:PORT]")
    return Mirror(host, insecure=parts.scheme == "http", scheme=parts.scheme)


def _without_userinfo(url: str) -> str:
    """`url` for a message: a password in it is not repeated on stderr."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return scheme + separator + rest


def _docker_insecure(fields, item) -> str:
    for scheme in ("http://", "https://"):
        if item.startswith(scheme):
            item = item[len(scheme):]
    item = item.rstrip("/")
    if "/" in item:
        import ipaddress
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            fields.fail(f"insecure-registries entry {quoted(item)} is neither HOST[:PORT] nor a CIDR")
        return item
    if not is_registry_host(item):
        fields.fail(f"insecure-registries entry {quoted(item)} is neither HOST[:PORT] nor a CIDR")
    return item
