"""Platforms (os, architecture, variant) named as Go and the OCI image-spec name them.

Matching follows containerd's rules, which Docker uses to pick from an index:
names are normalized first (aarch64 -> arm64, arm64/v8 -> arm64, arm -> arm/v7,
amd64/v1 -> amd64), and a platform also runs older variants of its architecture
(arm/v7 runs v6 and v5; amd64/v3 runs v2 and v1), preferring the newest.
"""

import platform as _host
import sys
from collections.abc import Sequence
from typing import Any

from .errors import UsageError, quoted

# uname -m (and a few aliases) -> (GOARCH, variant)
_MACHINE = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None), "x86-64": ("amd64", None),
    "i386": ("386", None), "i486": ("386", None), "i586": ("386", None), "i686": ("386", None),
    "386": ("386", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None), "armv8": ("arm64", None),
    "armv8l": ("arm", "v8"), "armv7l": ("arm", "v7"), "armv7": ("arm", "v7"), "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"), "armv6": ("arm", "v6"), "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"), "armv5": ("arm", "v5"), "arm": ("arm", "v7"),
    "ppc64le": ("ppc64le", None), "ppc64": ("ppc64", None),
    "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    "mips64": ("mips64", None), "mips64el": ("mips64le", None), "mips64le": ("mips64le", None),
    "loongarch64": ("loong64", None), "loong64": ("loong64", None),
}
_OS = {"darwin": "darwin", "macos": "darwin", "linux": "linux", "windows": "windows",
       "win32": "windows", "freebsd": "freebsd"}
# Variants an architecture can run, newest first.
_COMPATIBLE: dict[str, list[str | None]] = {
    "arm": ["v8", "v7", "v6", "v5"],
    "amd64": ["v4", "v3", "v2", None],
}


class Platform:
    __slots__ = ("os", "architecture", "variant")

    def __init__(self, os: str, architecture: str, variant: str | None = None) -> None:
        self.os = os
        self.architecture = architecture
        self.variant = variant or None

    def normalized(self) -> "Platform":
        """The same platform under its canonical names (see module docstring)."""
        os_name = _OS.get(self.os.lower(), self.os.lower())
        arch = self.architecture.lower()
        variant = self.variant.lower() if self.variant else None
        mapped = _MACHINE.get(arch)
        if mapped and arch not in ("arm",):
            arch, implied = mapped
            variant = variant or implied
        if arch == "arm64" and variant in ("v8", "8"):
            variant = None
        elif arch == "arm":
            variant = variant or "v7"
            if variant.isdigit():
                variant = f"v{variant}"
        elif arch == "amd64" and variant == "v1":
            variant = None
        return Platform(os_name, arch, variant)

    def runs(self) -> list["Platform"]:
        """The normalized platforms this one can run, best first."""
        mine = self.normalized()
        variants = _COMPATIBLE.get(mine.architecture)
        if variants and mine.variant in variants:
            start = variants.index(mine.variant)
            return [Platform(mine.os, mine.architecture, v) for v in variants[start:]]
        return [mine]

    def to_dict(self) -> dict[str, str]:
        d = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            d["variant"] = self.variant
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "Platform | None":
        if not isinstance(d, dict) or not isinstance(d.get("os"), str) \
                or not isinstance(d.get("architecture"), str):
            return None
        variant = d.get("variant")
        return cls(d["os"], d["architecture"], variant if isinstance(variant, str) else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def __repr__(self) -> str:
        return f"Platform({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Platform) and str(self.normalized()) == str(other.normalized())

    def __hash__(self) -> int:
        return hash(str(self.normalized()))


def host_platform() -> Platform:
    """The platform of this machine, e.g. linux/amd64 or linux/arm/v7."""
    os_name = _OS.get(sys.platform.rstrip("0123456789"), sys.platform)
    machine = _host.machine().lower()
    arch, variant = _MACHINE.get(machine, (machine, None))
    return Platform(os_name, arch, variant)


def parse_platform(text: str) -> Platform:
    """OS/ARCH[/VARIANT], as for docker --platform; raise UsageError if malformed."""
    parts = text.split("/") if isinstance(text, str) else []
    if len(parts) not in (2, 3) or not all(p and p.strip() == p for p in parts):
        raise UsageError(f"invalid platform {quoted(text)}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
    return Platform(*parts)


def best_match(wanted: Platform, candidates: Sequence[Platform | None]) -> int | None:
    """Index of the candidate platform `wanted` runs best, or None.

    `candidates` is a list of Platform or None (entries without a platform).
    """
    for rank in wanted.runs():
        for i, candidate in enumerate(candidates):
            if candidate is not None and candidate.normalized() == rank:
                return i
    return None
