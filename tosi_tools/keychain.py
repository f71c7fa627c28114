"""Where credentials and TLS settings for a registry come from: one Keychain per run.

A Keychain holds an ordered list of credential *sources*. A source is any object
with a `name` (said in logs, e.g. "--username" or "docker config ~/.docker/config.json")
and `lookup(registry, repository) -> auth.Credentials | None`; the first source
that answers wins, and the keychain remembers which one it was (`answered`).
Credentials are bound to the registry they were looked up for
(`auth.Credentials.registry`): registry.RegistryClient sends them to that
registry's own endpoint only, whatever source gave them.

`tls_for(registry)` is the one place the TLS settings of a host come from (a CA
bundle or directory, CAs added to the default store, a client certificate and
key, or no verification at all): --insecure and --ca-file, else the host's
directory in the certs.d roots docker and podman read (`certs_dirs`: *.crt CAs,
*.cert/*.key client pairs), used only if its owner can be trusted.

Secrets are never logged: only the registry and the source's name are.
"""

import logging
import os
import stat
from typing import Mapping, NamedTuple, Optional, Protocol, Sequence

from .auth import Credentials
from .errors import UnsafePath, UsageError, flag
from .ownership import require_safe_ancestors

log = logging.getLogger("tosi.keychain")


class TLSConfig(NamedTuple):
    """How to speak TLS to one registry host. `ca_file`: a CA bundle (file) or a
    directory of hashed certificates, None for the default store (the bundle the
    environment names, else certifi's); `client_cert`: (certificate file, key file)
    or None; `insecure`: plain http and unverified TLS may be spoken;
    `added_cas`: CA files trusted besides that store (a certs.d directory's *.crt)."""

    ca_file: Optional[str] = None
    client_cert: Optional[tuple[str, str]] = None
    insecure: bool = False
    added_cas: tuple[str, ...] = ()


DEFAULT_TLS = TLSConfig()  # system CAs, verified, no client certificate

# Where docker and podman keep a registry's CAs and client certificates, one
# directory per host[:port]; the first root holding one for the host is used (podman).
SYSTEM_CERTS_DIRS = ("/etc/containers/certs.d", "/etc/docker/certs.d")
CERTS_DIRS_VARIABLE = "TOSI_CERTS_DIRS"  # colon-separated roots replacing those; "" for none


def certs_dirs(environ: Mapping[str, str] = os.environ, euid: Optional[int] = None) -> list[str]:
    """The certs.d roots to read, in order: $TOSI_CERTS_DIRS if set, else (for a user
    other than root, as rootless podman) ~/.config/containers/certs.d, then
    SYSTEM_CERTS_DIRS."""
    if CERTS_DIRS_VARIABLE in environ:
        return [root for root in environ[CERTS_DIRS_VARIABLE].split(":") if root]
    roots = list(SYSTEM_CERTS_DIRS)
    if (os.geteuid() if euid is None else euid) != 0 and environ.get("HOME"):
        roots.insert(0, os.path.join(environ["HOME"], ".config", "containers", "certs.d"))
    return roots


def _untrusted(path: str, want_dir: bool) -> Optional[str]:
    """Why `path` (followed to its real path) may not be trusted, or None: it and every
    directory above it must be root's or ours, and only they may write it (else another
    user could plant a CA and read or change the image on its way)."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        require_safe_ancestors(real, "certificate directory")
    except UnsafePath as exc:
        return str(exc)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    euid = os.geteuid()
    if want_dir != stat.S_ISDIR(st.st_mode) or not (want_dir or stat.S_ISREG(st.st_mode)):
        return f"{path} is not a {'directory' if want_dir else 'regular file'}"
    if st.st_uid not in (0, euid):
        return f"{path} is owned by uid {st.st_uid}, not by root" + ("" if euid == 0 else " or you")
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def certs_dir_tls(registry: str, roots: Sequence[str]) -> tuple[Optional[str], tuple[str, ...],
                                                                 Optional[tuple[str, str]], list[str]]:
    """(the directory used, its CA files, its client (certificate, key) pair, warnings)
    for `registry` (host[:port]) in the first of `roots` that has a directory for it, as
    docker and podman read it: every *.crt a CA, a *.cert with the *.key of its name a
    client pair (the first by name). What cannot be trusted (`_untrusted`) is left out,
    with a warning."""
    warnings: list[str] = []
    for root in roots:
        directory = os.path.join(root, registry)
        if not os.path.isdir(directory):
            continue
        why = _untrusted(directory, want_dir=True)
        if why:
            return None, (), None, [f"certificates for {registry} in {directory} not used: {why}"]
        real = os.path.realpath(directory)
        try:
            names = sorted(os.listdir(real))
        except OSError as exc:
            return None, (), None, [f"certificates for {registry}: cannot list {directory}: {exc.strerror}"]
        cas, pairs = [], []
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext == ".crt":
                cas.append(name)
            elif ext == ".cert":
                if f"{stem}.key" in names:
                    pairs.append((name, f"{stem}.key"))
                else:
                    warnings.append(f"client certificate {os.path.join(directory, name)} has no "
                                    f"{stem}.key beside it; not used (a CA's name ends in .crt)")
            elif ext == ".key" and f"{stem}.cert" not in names:
                warnings.append(f"client key {os.path.join(directory, name)} has no {stem}.cert "
                                "beside it; not used")
        usable = []
        for name in cas + [n for pair in pairs for n in pair]:
            why = _untrusted(os.path.join(real, name), want_dir=False)
            if why:
                warnings.append(f"certificate file not used: {why}")
            else:
                usable.append(name)
        ca_files = tuple(os.path.join(real, name) for name in cas if name in usable)
        client = next(((os.path.join(real, cert), os.path.join(real, key)) for cert, key in pairs
                       if cert in usable and key in usable), None)
        return directory, ca_files, client, warnings
    return None, (), None, warnings


class CredentialSource(Protocol):
    """What a Keychain asks for credentials."""

    name: str

    def lookup(self, registry: Optional[str], repository: Optional[str]) -> Optional[Credentials]:
        ...


class FixedSource:
    """Credentials given by a library caller: answered for every registry, as given
    (they keep the registry they are bound to, None: any)."""

    def __init__(self, credentials: Credentials, name: str = "the caller") -> None:
        self.credentials = credentials
        self.name = name

    def lookup(self, registry: Optional[str], repository: Optional[str]) -> Optional[Credentials]:
        return self.credentials


class FlagSource:
    """--username with --password or --password-stdin: for the registry being asked
    about (the one the reference or the plan names)."""

    def __init__(self, username: str, password: str) -> None:
        self.name = flag("username")
        self._username = username
        self._password = password

    def lookup(self, registry: Optional[str], repository: Optional[str]) -> Optional[Credentials]:
        return Credentials(self._username, self._password, registry)


class EnvironmentSource:
    """TOSI_USERNAME and TOSI_PASSWORD (both set; the password may be empty)."""

    name = "TOSI_USERNAME"

    def lookup(self, registry: Optional[str], repository: Optional[str]) -> Optional[Credentials]:
        user, password = os.environ.get("TOSI_USERNAME"), os.environ.get("TOSI_PASSWORD")
        if user and password is not None:
            return Credentials(user, password, registry)
        return None


class StoredSources:
    """The credentials people keep in files (credstore: containers' auth.json, Docker's
    config.json with its credential helpers), read when first asked, in credstore's
    precedence. Its `name` is the name of the file (or helper) that answered last.
    Credentials holding an identity token are answered too: the registry client
    trades them at the token endpoint."""

    def __init__(self, authfile: Optional[str] = None) -> None:
        self.authfile = authfile
        self.name = "stored credentials"
        self._sources: Optional[list] = None
        self._warned: set[str] = set()

    @property
    def warnings(self) -> list[str]:
        """What failed so far (a missing or failing helper, a malformed file)."""
        from .credstore import source_warnings

        return source_warnings(self._sources or [])

    def lookup(self, registry: Optional[str], repository: Optional[str]) -> Optional[Credentials]:
        from .credstore import default_sources, find_credentials

        if not registry:
            return None
        if self._sources is None:
            self._sources = default_sources(authfile=self.authfile)
        found, source = find_credentials(self._sources, registry, repository)
        for text in self.warnings:
            if text not in self._warned:
                self._warned.add(text)
                log.warning("%s", text)
        if source is not None:
            self.name = source.name
        return found


class Keychain:
    """Credentials and TLS settings per registry host, from an ordered list of sources."""

    def __init__(self, sources: Sequence[CredentialSource] = (), tls: TLSConfig = DEFAULT_TLS,
                 certs_dirs: Sequence[str] = ()) -> None:
        """`tls`: the settings of the flags, for every host; `certs_dirs`: the certs.d
        roots (`certs_dirs()`) a host's own CAs and client certificate come from."""
        self.sources = list(sources)
        self.tls = tls
        self.certs_dirs = list(certs_dirs)
        self._answered: dict[tuple[Optional[str], Optional[str]], Optional[str]] = {}
        self._host_tls: dict[str, TLSConfig] = {}

    @classmethod
    def of(cls, credentials: Optional[Credentials], ca_file: Optional[str] = None,
           insecure: bool = False) -> "Keychain":
        """A keychain answering `credentials` (if any) for every registry, with these TLS settings."""
        return cls([FixedSource(credentials)] if credentials is not None else [],
                   TLSConfig(ca_file, None, bool(insecure)))

    def credentials(self, registry: Optional[str], repository: Optional[str] = None) -> Optional[Credentials]:
        """The first source's credentials for `registry` (host[:port] as a reference
        names it) and `repository`, or None; which source answered is remembered."""
        for source in self.sources:
            found = source.lookup(registry, repository)
            if found is not None:
                if self._answered.get((registry, repository)) != source.name:
                    log.info("credentials for %s from %s", registry or "any registry", source.name)
                self._answered[(registry, repository)] = source.name
                return found
        self._answered[(registry, repository)] = None
        return None

    def answered(self, registry: Optional[str], repository: Optional[str] = None) -> Optional[str]:
        """The name of the source that gave the last credentials for (registry,
        repository), None if none did (or none was asked)."""
        return self._answered.get((registry, repository))

    @property
    def warnings(self) -> list[str]:
        """What went wrong looking for credentials so far (a credential helper missing
        or failing, a malformed file), one line each, for a "registry refused" error."""
        return [text for source in self.sources for text in getattr(source, "warnings", ())]

    def tls_for(self, registry: Optional[str]) -> TLSConfig:
        """How to speak TLS to `registry` (host[:port]): the flags' settings, with the
        CAs (unless --ca-file or --insecure is given: they win) and the client
        certificate of its certs.d directory, if any."""
        if not registry or not self.certs_dirs:
            return self.tls
        if registry not in self._host_tls:
            directory, ca_files, client, warnings = certs_dir_tls(registry, self.certs_dirs)
            for text in warnings:
                log.warning("%s", text)
            if directory:
                log.info("TLS for %s from %s: %d CA file(s)%s", registry, directory, len(ca_files),
                         ", a client certificate" if client else "")
            self._host_tls[registry] = self.tls._replace(
                client_cert=self.tls.client_cert or client,
                added_cas=() if self.tls.ca_file or self.tls.insecure else ca_files)
        return self._host_tls[registry]


def from_flags(username: Optional[str] = None, password: Optional[str] = None,
               password_stdin: Optional[str] = None, ca_file: Optional[str] = None,
               insecure: bool = False, authfile: Optional[str] = None) -> Keychain:
    """The keychain of a stage's flags: --username with --password (or the password
    read from stdin), else TOSI_USERNAME/TOSI_PASSWORD, else the files people keep
    credentials in (StoredSources, --authfile first among them); TLS
    from --ca-file and --insecure, and per host from the certs.d directories
    (`certs_dirs`, TOSI_CERTS_DIRS). A password without a user (or the reverse) is a
    usage error, raised here, before any request."""
    if password_stdin is not None:
        password = password_stdin
    if password and not username:
        raise UsageError(f"a password needs {flag('username')}")
    if username:
        if password is None:
            raise UsageError(f"{flag('username')} needs {flag('password')} or {flag('password-stdin')}")
        # Given on the command line: nothing else is asked.
        sources: list[CredentialSource] = [FlagSource(username, password)]
    else:
        sources = [EnvironmentSource(), StoredSources(authfile)]
    return Keychain(sources, TLSConfig(ca_file, None, bool(insecure)), certs_dirs())
