"""Platform names and matching follow Go's names and containerd's preferences."""

import pytest

from tosi_tools.errors import UsageError
from tosi_tools.imageplatform import Platform, best_match, host_platform, parse_platform


@pytest.mark.parametrize("given, normalized", [
    (("linux", "amd64"), "linux/amd64"),
    (("linux", "x86_64"), "linux/amd64"),
    (("linux", "amd64", "v1"), "linux/amd64"),
    (("linux", "aarch64"), "linux/arm64"),
    (("linux", "arm64", "v8"), "linux/arm64"),
    (("linux", "arm"), "linux/arm/v7"),
    (("linux", "arm", "7"), "linux/arm/v7"),
    (("linux", "armv6l"), "linux/arm/v6"),
    (("Linux", "AMD64"), "linux/amd64"),
])
def test_platform_names_normalize_as_go_names_them(given, normalized):
    assert str(Platform(*given).normalized()) == normalized


def test_host_platform_uses_go_architecture_names(monkeypatch):
    import platform as host

    monkeypatch.setattr(host, "machine", lambda: "aarch64")
    assert str(host_platform()) == "linux/arm64"
    monkeypatch.setattr(host, "machine", lambda: "armv7l")
    assert str(host_platform()) == "linux/arm/v7"
    monkeypatch.setattr(host, "machine", lambda: "x86_64")
    assert str(host_platform()) == "linux/amd64"


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", "linux/ amd64", ""])
def test_malformed_platform_flag_is_usage_error(text):
    with pytest.raises(UsageError, match="OS/ARCH"):
        parse_platform(text)


def _platforms(*texts):
    return [parse_platform(t) if t else None for t in texts]


def test_exact_variant_is_preferred_over_an_older_one():
    candidates = _platforms("linux/arm/v6", "linux/arm/v7", "linux/arm64")
    assert best_match(parse_platform("linux/arm/v7"), candidates) == 1


def test_arm_v7_falls_back_to_v6():
    candidates = _platforms("linux/amd64", "linux/arm/v6")
    assert best_match(parse_platform("linux/arm/v7"), candidates) == 1


def test_arm_v6_does_not_run_v7():
    assert best_match(parse_platform("linux/arm/v6"), _platforms("linux/arm/v7")) is None


def test_arm64_matches_an_entry_spelled_arm64_v8():
    assert best_match(parse_platform("linux/arm64"), _platforms(None, "linux/arm64/v8")) == 1


def test_os_must_match():
    assert best_match(parse_platform("linux/amd64"), _platforms("windows/amd64")) is None
