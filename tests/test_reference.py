"""Reference parsing follows the distribution grammar with Docker's normalization."""

import pytest

from tosi_tools.errors import InvalidReference, UsageError
from tosi_tools.reference import parse_reference, reference_with_base_url
from tosi_tools.transport import endpoint_for

HEX = "a" * 64
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize("text, registry, repository, tag, digest", [
    ("alpine", "docker.io", "library/alpine", "latest", None),
    ("alpine:3.19", "docker.io", "library/alpine", "3.19", None),
    ("user/img", "docker.io", "user/img", "latest", None),
    ("user/img:v1", "docker.io", "user/img", "v1", None),
    ("docker.io/img", "docker.io", "library/img", "latest", None),
    ("docker.io/user/img", "docker.io", "user/img", "latest", None),
    ("index.docker.io/library/img:1", "docker.io", "library/img", "1", None),
    ("index.docker.io/img", "docker.io", "library/img", "latest", None),
    ("registry-1.docker.io/user/img", "docker.io", "user/img", "latest", None),
    ("host:5000/img", "host:5000", "img", "latest", None),
    ("host.example.com/a/b/c:t", "host.example.com", "a/b/c", "t", None),
    ("localhost/img", "localhost", "img", "latest", None),
    ("localhost:5000/img:tag", "localhost:5000", "img", "tag", None),
    ("127.0.0.1:5000/img", "127.0.0.1:5000", "img", "latest", None),
    ("[::1]:5000/img", "[::1]:5000", "img", "latest", None),
    (f"img@{DIGEST}", "docker.io", "library/img", None, DIGEST),
    (f"img:tag@{DIGEST}", "docker.io", "library/img", "tag", DIGEST),
    (f"localhost:5000/a/img:tag@{DIGEST}", "localhost:5000", "a/img", "tag", DIGEST),
    ("my_repo/with.dots__and--dashes", "docker.io", "my_repo/with.dots__and--dashes", "latest", None),
])
def test_reference_forms_parse_with_docker_defaults(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_normalized_reference_is_fully_qualified():
    assert parse_reference("alpine").normalized() == "docker.io/library/alpine:latest"


def test_normalized_reference_keeps_tag_and_digest():
    assert parse_reference(f"img:tag@{DIGEST}").normalized() == f"docker.io/library/img:tag@{DIGEST}"


def test_digest_wins_over_tag_for_the_manifest_request():
    assert parse_reference(f"img:tag@{DIGEST}").manifest_reference == DIGEST


def test_docker_hub_endpoint_is_registry_1():
    assert endpoint_for(parse_reference("alpine").registry) == "https://registry-1.docker.io"


@pytest.mark.parametrize("text, complaint", [
    ("Alpine", "must be lower case"),
    ("user/Img", "must be lower case"),
    ("img:", "empty tag"),
    ("img@", "empty digest"),
    ("img@sha256:abc", "64 lower-case hex"),
    (f"img@sha256:{'A' * 64}", "64 lower-case hex"),
    (f"img@md5:{HEX}", "unsupported algorithm"),
    ("img:-bad", "invalid tag"),
    ("img:" + "t" * 129, "invalid tag"),
    ("", "empty image reference"),
    ("img name", "white space"),
    ("host:5000/", "empty repository"),
    ("a//b", "empty path component"),
    ("-img", "invalid repository path component"),
    ("https://host/img", "no scheme"),
    (HEX, "image ID"),
    ("host/" + "a" * 260, "longer than 255"),
    ("localhost:65536/img", "not between 1 and 65535"),
    ("[::1]:99999999999999999999/img", "not between 1 and 65535"),
    ("host:0/img", "not between 1 and 65535"),
])
def test_invalid_reference_is_usage_error_naming_the_problem(text, complaint):
    with pytest.raises(InvalidReference) as info:
        parse_reference(text)
    assert complaint in str(info.value)
    assert info.value.exit_code == 2


def test_base_url_names_registry_and_endpoint():
    ref, endpoint = reference_with_base_url("test/img:v1", "http://127.0.0.1:5000")
    assert (ref.registry, ref.repository, ref.tag) == ("127.0.0.1:5000", "test/img", "v1")
    assert endpoint == "http://127.0.0.1:5000"


def test_base_url_of_docker_hub_adds_library():
    ref, endpoint = reference_with_base_url("alpine", "https://registry-1.docker.io/")
    assert (ref.registry, ref.repository) == ("docker.io", "library/alpine")
    assert endpoint == "https://registry-1.docker.io"


def test_base_url_conflicting_with_image_registry_is_usage_error():
    with pytest.raises(UsageError, match="names registry other:5000"):
        reference_with_base_url("other:5000/img", "http://127.0.0.1:5000")


def test_base_url_with_path_is_usage_error():
    with pytest.raises(UsageError, match="no path"):
        reference_with_base_url("img", "http://127.0.0.1:5000/some/path")


def test_the_highest_port_is_a_port():
    assert parse_reference("localhost:65535/img").registry == "localhost:65535"


def test_base_url_with_a_port_above_65535_is_usage_error():
    with pytest.raises(UsageError, match="port '70000' is not between 1 and 65535"):
        reference_with_base_url("img", "http://127.0.0.1:70000")


def test_a_huge_reference_is_quoted_in_80_characters():
    with pytest.raises(InvalidReference) as info:
        parse_reference("a" * 100_000 + "/Bad")
    assert len(str(info.value)) < 400 and "(100004 characters)" in str(info.value)
