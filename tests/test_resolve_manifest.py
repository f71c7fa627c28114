"""Manifest parsing at unit level: kinds by mediaType or shape, schema1 conversion, index entries."""

import json

import pytest

from tosi_tools.errors import ManifestError
from tosi_tools.manifest import (
    DOCKER_LAYER_GZIP, DOCKER_SCHEMA1, OCI_INDEX, OCI_MANIFEST, parse_config, parse_manifest,
)
from tosi_tools.imageplatform import parse_platform

D = ["sha256:" + c * 64 for c in "0123456789abcdef"]


def _descriptor(i, media_type=OCI_MANIFEST, **extra):
    return {"mediaType": media_type, "digest": D[i], "size": 10 + i, **extra}


def test_manifest_without_media_type_is_recognized_by_its_shape():
    body = {"schemaVersion": 2, "config": _descriptor(0, "application/vnd.oci.image.config.v1+json"),
            "layers": [_descriptor(1, "application/vnd.oci.image.layer.v1.tar")]}
    manifest = parse_manifest(json.dumps(body).encode())
    assert (manifest.media_type, [d["digest"] for d in manifest.layers]) == (OCI_MANIFEST, [D[1]])


def test_unsigned_schema1_is_converted_bottom_first_dropping_throwaway_entries():
    history = [
        {"v1Compatibility": json.dumps({"id": "c", "parent": "b", "os": "linux", "architecture": "arm64",
                                        "config": {"Cmd": ["run"]}})},
        {"v1Compatibility": json.dumps({"id": "b", "parent": "a", "throwaway": True})},
        {"v1Compatibility": json.dumps({"id": "a"})},
    ]
    body = {"schemaVersion": 1, "name": "x", "tag": "t", "architecture": "arm64",
            "fsLayers": [{"blobSum": D[3]}, {"blobSum": D[2]}, {"blobSum": D[1]}], "history": history}
    manifest = parse_manifest(json.dumps(body).encode())
    assert manifest.media_type == DOCKER_SCHEMA1
    assert manifest.layers == [{"mediaType": DOCKER_LAYER_GZIP, "digest": D[1]},
                               {"mediaType": DOCKER_LAYER_GZIP, "digest": D[3]}]
    config = json.loads(manifest.config_bytes)
    assert config == {"os": "linux", "architecture": "arm64", "config": {"Cmd": ["run"]}}


def test_schema1_with_mismatched_history_is_malformed():
    body = {"schemaVersion": 1, "fsLayers": [{"blobSum": D[1]}], "history": []}
    with pytest.raises(ManifestError, match="1 fsLayers but 0 history"):
        parse_manifest(json.dumps(body).encode())


@pytest.mark.parametrize("descriptor, complaint", [
    ({"digest": D[1], "size": 1}, "no mediaType"),
    ({"mediaType": "x", "digest": "sha256:zz", "size": 1}, "descriptor digest"),
    ({"mediaType": "x", "digest": D[1], "size": -1}, "no valid size"),
    ({"mediaType": "x", "digest": D[1], "size": "1"}, "no valid size"),
    ({"mediaType": "x", "digest": D[1], "size": 1, "urls": "http://x"}, "malformed urls"),
])
def test_malformed_layer_descriptor_is_refused(descriptor, complaint):
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": _descriptor(0), "layers": [descriptor]}
    with pytest.raises(ManifestError, match=complaint):
        parse_manifest(json.dumps(body).encode())


def test_index_entries_of_other_kinds_and_attestations_are_skipped():
    entries = [
        _descriptor(1, "application/vnd.example.sbom+json", platform={"os": "linux", "architecture": "amd64"}),
        _descriptor(2, platform={"os": "unknown", "architecture": "unknown"}),
        _descriptor(3, platform={"os": "linux", "architecture": "amd64"},
                    annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        _descriptor(4, platform={"os": "linux", "architecture": "amd64"}),
    ]
    index = parse_manifest(json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode())
    entry, platform = index.select(parse_platform("linux/amd64"))
    assert entry["digest"] == D[4]
    assert str(platform) == "linux/amd64"


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("parse", [parse_manifest, parse_config])
def test_json_nested_beyond_the_parser_is_a_manifest_error(parse):
    with pytest.raises(ManifestError, match="nested too deeply"):
        parse(b'{"schemaVersion": 2, "x": ' + DEEP + b"}")
