"""Challenges, token lifetimes and credential hygiene, at unit level."""

from tosi_tools.auth import Credentials, TokenCache, parse_challenge


def test_bearer_challenge_parameters_are_parsed():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/alpine:pull"}


def test_challenge_with_escaped_quote_and_bare_value_is_parsed():
    assert parse_challenge('Basic realm="a \\"b\\"", charset=UTF-8') == (
        "basic", {"realm": 'a "b"', "charset": "UTF-8"})


def test_one_header_with_several_challenges_gives_the_bearer_one():
    assert parse_challenge('Negotiate abc==, Basic realm="r", Bearer\trealm="https://a/t",service="s, t"') == (
        "bearer", {"realm": "https://a/t", "service": "s, t"})


def test_token_is_kept_for_its_lifetime_and_then_dropped():
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("key", "tok", expires_in=300)
    now[0] += 290
    assert cache.get("key") == "tok"
    now[0] += 10
    assert cache.get("key") is None


def test_token_without_lifetime_lasts_the_spec_default_of_60_seconds():
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put("key", "tok")
    now[0] = 50
    assert cache.get("key") == "tok"
    now[0] = 60
    assert cache.get("key") is None


def test_credentials_repr_hides_the_password():
    assert "s3cret" not in repr(Credentials("me", "s3cret"))
