"""Where credentials and TLS settings for a registry come from: one Keychain per run.

A Keychain holds an ordered list of credential *sources*. A source is any object
with a `name` (said in logs, e.g. "--username" or "docker config ~/.docker/config.json")
and `lookup(registry, repository) -> auth.Credentials | None`; the first source
that answers wins, and the keychain remembers which one it was (`answered`).
Credentials are bound to the registry they were looked up for
(`auth.Credentials.registry`): registry.RegistryClient sends them to that
registry's own endpoint only, whatever source gave them.

`tls_for(registry)` is the one place the TLS settings of a host come from (a CA
bundle or directory, a client certificate and key, or no verification at all);
today they come from --ca-file and --insecure, the same for every host.

Secrets are never logged: only the registry and the source's name are.
"""

import logging
import os
from typing import NamedTuple, Optional, Protocol, Sequence

from .auth import Credentials
from .errors import UsageError, flag

log = logging.getLogger("tosi.keychain")


class TLSConfig(NamedTuple):
    """How to speak TLS to one registry host. `ca_file`: a CA bundle (file) or a
    directory of hashed certificates, None for the default store (the bundle the
    environment names, else certifi's); `client_cert`: (certificate file, key file)
    or None; `insecure`: plain http and unverified TLS may be spoken."""

    ca_file: Optional[str] = None
    client_cert: Optional[tuple[str, str]] = None
    insecure: bool = False


DEFAULT_TLS = TLSConfig()  # system CAs, verified, no client certificate


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
    Identity tokens are passed over until the token endpoint trades them."""

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
        found, source = find_credentials(self._sources, registry, repository,
                                         accept=lambda credentials: credentials.identity_token is None)
        for text in self.warnings:
            if text not in self._warned:
                self._warned.add(text)
                log.warning("%s", text)
        if source is not None:
            self.name = source.name
        return found


class Keychain:
    """Credentials and TLS settings per registry host, from an ordered list of sources."""

    def __init__(self, sources: Sequence[CredentialSource] = (), tls: TLSConfig = DEFAULT_TLS) -> None:
        self.sources = list(sources)
        self.tls = tls
        self._answered: dict[tuple[Optional[str], Optional[str]], Optional[str]] = {}

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

    def tls_for(self, registry: Optional[str]) -> TLSConfig:
        """How to speak TLS to `registry`."""
        return self.tls


def from_flags(username: Optional[str] = None, password: Optional[str] = None,
               password_stdin: Optional[str] = None, ca_file: Optional[str] = None,
               insecure: bool = False, authfile: Optional[str] = None) -> Keychain:
    """The keychain of a stage's flags: --username with --password (or the password
    read from stdin), else TOSI_USERNAME/TOSI_PASSWORD, else the files people keep
    credentials in (StoredSources, --authfile first among them); TLS
    from --ca-file and --insecure. A password without a user (or the reverse) is a
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
    return Keychain(sources, TLSConfig(ca_file, None, bool(insecure)))
