"""tosi-resolve against the real registry: every manifest kind, platforms, digests, cache, errors."""

import hashlib
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import requests

from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import (
    DOCKER_CONFIG, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, file_entry, make_config, make_layer, sha256,
)
from tests.support.registry import free_port
from tosi_tools.cache import Workdir
from tosi_tools.errors import DigestMismatch, Unreachable
from tosi_tools.manifest import MAX_INDEX_DEPTH, MAX_NESTED_INDEXES, schema1_payload
from tosi_tools.plan import PlanReader
from tosi_tools.imageplatform import host_platform, parse_platform
from tosi_tools.reference import reference_with_base_url
from tosi_tools.registry import RegistryClient
from tosi_tools.resolve import Resolver, resolve_image

SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1_UNSIGNED = "application/vnd.docker.distribution.manifest.v1+json"


def _layers(n=2, **kwargs):
    return [make_layer([file_entry(f"file{i}.txt", f"layer {i}\n".encode())], **kwargs) for i in range(n)]


def _plan(proc):
    reader = PlanReader(io.StringIO(proc.stdout))
    return reader.image, reader.layers()


def _resolve(tool, workdir, ref, *flags, check=0, **kwargs):
    return tool("tosi-resolve", "--workdir", workdir, *flags, ref, check=check, **kwargs)


def _other_platform():
    return "linux/arm64" if host_platform().normalized().architecture != "arm64" else "linux/amd64"


def _platform_images(pusher, repo, platforms, oci=True):
    images = []
    for text in platforms:
        p = parse_platform(text)
        images.append(pusher.push_image(repo, None, _layers(1), oci=oci, os_=p.os, arch=p.architecture,
                                        variant=p.variant))
    return images


# ------------------------------------------------------------ manifest kinds

def test_docker_schema2_image_gives_image_and_layer_records(tool, registry, pusher, repo_name, workdir):
    layers = _layers(2)
    image = pusher.push_image(repo_name, "v1", layers)
    image_record, layer_records = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:v1"))
    cache = Workdir(workdir)
    config_digest = sha256(image.config)
    assert image_record == {
        "type": "image", "planVersion": 1,
        "reference": f"{registry.host}/{repo_name}:v1",
        "registry": registry.host, "endpoint": registry.url, "repository": repo_name, "tag": "v1",
        "digest": image.digest, "mediaType": DOCKER_MANIFEST, "size": len(image.manifest),
        "manifestPath": cache.manifest_path(registry.host, repo_name, image.digest),
        "index": None, "platform": {"os": "linux", "architecture": "amd64"},
        "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(image.config),
                   "path": cache.config_path(config_digest),
                   "savedConfig": cache.saved_config_path(config_digest)},
        "workdir": cache.root, "layerCount": 2, "insecure": False, "caFile": None,
    }
    assert layer_records == [
        {"type": "layer", "index": i, **layer.descriptor(), "diffID": layer.diff_id}
        for i, layer in enumerate(layers)
    ]


def test_oci_manifest_layer_records_carry_media_type_and_annotations(tool, registry, pusher, repo_name,
                                                                      workdir):
    gz, zst, raw = (make_layer([file_entry("f", b"x")], compression=c, oci=True) for c in ("gzip", "zstd", None))
    zst.annotations = {"org.example.note": "zstd layer"}
    image = pusher.push_image(repo_name, "oci", [gz, zst, raw], oci=True)
    image_record, layer_records = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:oci"))
    assert (image_record["mediaType"], image_record["digest"]) == (OCI_MANIFEST, image.digest)
    assert [r["mediaType"] for r in layer_records] == [gz.media_type, zst.media_type, raw.media_type]
    assert layer_records[1]["annotations"] == {"org.example.note": "zstd layer"}
    assert [r["diffID"] for r in layer_records] == [gz.diff_id, zst.diff_id, raw.diff_id]


@pytest.mark.parametrize("oci", [True, False], ids=["oci-index", "docker-manifest-list"])
def test_index_resolves_to_the_host_platform_by_default(tool, registry, pusher, repo_name, workdir, oci):
    host = str(host_platform().normalized())
    images = _platform_images(pusher, repo_name, [_other_platform(), host], oci=oci)
    index_digest, index_body = pusher.push_index(repo_name, "multi", images, oci=oci)
    image_record, _layers_ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:multi"))
    assert image_record["digest"] == images[1].digest
    assert image_record["platform"] == images[1].platform
    cache = Workdir(workdir)
    assert image_record["index"] == {
        "mediaType": json.loads(index_body)["mediaType"], "digest": index_digest, "size": len(index_body),
        "path": cache.manifest_path(registry.host, repo_name, index_digest),
    }


def test_platform_flag_picks_that_index_entry(tool, registry, pusher, repo_name, workdir):
    images = _platform_images(pusher, repo_name, ["linux/amd64", "linux/arm64", "linux/s390x"])
    pusher.push_index(repo_name, "multi", images)
    image_record, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:multi",
                                     "--platform", "linux/s390x"))
    assert image_record["digest"] == images[2].digest
    assert image_record["platform"] == {"os": "linux", "architecture": "s390x"}


def test_platform_variant_picks_the_exact_variant(tool, registry, pusher, repo_name, workdir):
    images = _platform_images(pusher, repo_name, ["linux/arm/v6", "linux/arm/v7", "linux/arm64/v8"])
    pusher.push_index(repo_name, "multi", images)
    ref = f"{registry.host}/{repo_name}:multi"
    assert _plan(_resolve(tool, workdir, ref, "--platform", "linux/arm/v7"))[0]["digest"] == images[1].digest
    assert _plan(_resolve(tool, workdir, ref, "--platform", "linux/arm/v6"))[0]["digest"] == images[0].digest
    assert _plan(_resolve(tool, workdir, ref, "--platform", "linux/arm64"))[0]["digest"] == images[2].digest


def test_platform_without_variant_entry_falls_back_to_older_variant(tool, registry, pusher, repo_name,
                                                                    workdir):
    images = _platform_images(pusher, repo_name, ["linux/amd64", "linux/arm/v6"])
    pusher.push_index(repo_name, "multi", images)
    image_record, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:multi",
                                     "--platform", "linux/arm/v7"))
    assert image_record["digest"] == images[1].digest


def test_no_matching_platform_lists_the_index_platforms(tool, registry, pusher, repo_name, workdir):
    images = _platform_images(pusher, repo_name, ["linux/amd64", "linux/arm/v7"])
    pusher.push_index(repo_name, "multi", images)
    proc = _resolve(tool, workdir, f"{registry.host}/{repo_name}:multi", "--platform", "linux/ppc64le",
                    check=1)
    assert proc.stderr.strip() == (
        "tosi-resolve: error: no image for platform linux/ppc64le in the index "
        "(it has: linux/amd64, linux/arm/v7; choose one with --platform)"
    )
    assert proc.stdout == ""


def _nest_index(pusher, repo, digest, body, levels):
    """Push `levels` indexes (tags level1, level2, ...), each listing the one before it
    without a platform, the first listing the index `digest`; (digest, body) of the last."""
    for level in range(1, levels + 1):
        entry = {"mediaType": OCI_INDEX, "size": len(body), "digest": digest}
        digest, body = pusher.push_index(repo, f"level{level}", [], extra_manifests=[entry])
    return digest, body


def test_an_index_nested_in_an_index_is_resolved_through_to_the_platform_image(tool, registry, pusher,
                                                                             repo_name, workdir):
    images = _platform_images(pusher, repo_name, [_other_platform(), str(host_platform().normalized())])
    outer_digest, _ = _nest_index(pusher, repo_name, *pusher.push_index(repo_name, "inner", images), levels=1)
    image_record, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:level1"))
    assert (image_record["digest"], image_record["index"]["digest"]) == (images[1].digest, outer_digest)


def test_indexes_nested_deeper_than_the_cap_are_refused(tool, registry, pusher, repo_name, workdir):
    images = _platform_images(pusher, repo_name, [str(host_platform().normalized())])
    _nest_index(pusher, repo_name, *pusher.push_index(repo_name, "inner", images), levels=MAX_INDEX_DEPTH)
    proc = _resolve(tool, workdir, f"{registry.host}/{repo_name}:level{MAX_INDEX_DEPTH}", check=1)
    assert proc.stderr.count("\n") == 1
    assert f"more than {MAX_INDEX_DEPTH} levels or {MAX_NESTED_INDEXES} indexes nested; refused" in proc.stderr


def test_attestation_entries_are_not_candidates(tool, registry, pusher, repo_name, workdir):
    real, attestation = _platform_images(pusher, repo_name, ["linux/amd64", "unknown/unknown"])
    pusher.push_index(repo_name, "multi", [real], extra_manifests=[{
        "mediaType": attestation.media_type, "size": len(attestation.manifest),
        "digest": attestation.digest, "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                        "vnd.docker.reference.digest": real.digest},
    }])
    proc = _resolve(tool, workdir, f"{registry.host}/{repo_name}:multi", "--platform", "unknown/unknown",
                    check=1)
    assert "(it has: linux/amd64;" in proc.stderr


def test_single_image_for_another_platform_than_requested_is_refused(tool, registry, pusher, repo_name,
                                                                     workdir):
    pusher.push_image(repo_name, "v1", _layers(1), arch="amd64")
    proc = _resolve(tool, workdir, f"{registry.host}/{repo_name}:v1", "--platform", "linux/arm64", check=1)
    assert "single image for linux/amd64, not for linux/arm64" in proc.stderr


def _schema1_image(pusher, registry, repo):
    """A real schema1 manifest: the registry converts a schema2 image when asked for schema1 only."""
    layers = _layers(2)
    config = json.loads(make_config(layers))
    config["history"] = [{"created_by": "one"}, {"created_by": "ENV x=1", "empty_layer": True},
                         {"created_by": "two"}]
    config_bytes = json.dumps(config).encode()
    pusher.push_blob(repo, config_bytes)
    for layer in layers:
        pusher.push_blob(repo, layer.data)
    pusher.push_manifest(repo, "v2", {
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "size": len(config_bytes), "digest": sha256(config_bytes)},
        "layers": [layer.descriptor() for layer in layers],
    }, DOCKER_MANIFEST)
    r = requests.get(f"{registry.url}/v2/{repo}/manifests/v2", headers={"Accept": SCHEMA1_SIGNED}, timeout=10)
    assert r.headers["Content-Type"] == SCHEMA1_SIGNED
    return layers, r


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_schema1_is_converted_bottom_first_without_throwaway_layers(tool, registry, pusher, repo_name,
                                                                    workdir, signed):
    layers, schema1 = _schema1_image(pusher, registry, repo_name)
    # Without its signatures the manifest is the unsigned form, under the same digest.
    body, media_type = (schema1.content, SCHEMA1_SIGNED) if signed else (
        schema1_payload(schema1.content), SCHEMA1_UNSIGNED)
    # A registry that serves only schema1 (as old ones did): the proxy answers with the real bytes.
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=body, headers={
            "Content-Type": media_type, "Docker-Content-Digest": schema1.headers["Docker-Content-Digest"]}))
        host = proxy.url.split("://")[1]
        image_record, layer_records = _plan(_resolve(tool, workdir, f"{host}/{repo_name}:v2"))
    assert image_record["mediaType"] == media_type
    assert image_record["digest"] == schema1.headers["Docker-Content-Digest"]
    assert [(r["digest"], r["size"]) for r in layer_records] == [(x.digest, len(x.data)) for x in layers]
    assert [r["diffID"] for r in layer_records] == [None, None]
    with open(image_record["config"]["savedConfig"]) as f:
        assert json.load(f) == {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]}


def test_schema1_layer_sizes_come_from_a_get_where_the_registry_refuses_head(registry, pusher, repo_name,
                                                                            workdir):
    layers, schema1 = _schema1_image(pusher, registry, repo_name)
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=schema1.content, headers={
            "Content-Type": SCHEMA1_SIGNED, "Docker-Content-Digest": schema1.headers["Docker-Content-Digest"]}))
        proxy.add(Rule("status", method="HEAD", path="/blobs/", status=405, body=b""))
        _image, layer_records = resolve_image(f"{proxy.url.split('://')[1]}/{repo_name}:v2", workdir)
    assert [r["size"] for r in layer_records] == [len(x.data) for x in layers]


# ------------------------------------------------------------ digests

def test_digest_reference_resolves_that_manifest(tool, registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    image_record, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}@{image.digest}"))
    assert (image_record["digest"], image_record["tag"]) == (image.digest, None)
    assert image_record["reference"] == f"{registry.host}/{repo_name}@{image.digest}"


def test_tag_and_digest_reference_follows_the_digest(tool, registry, pusher, repo_name, workdir):
    old = pusher.push_image(repo_name, "v1", _layers(1))
    pusher.push_image(repo_name, "v1", _layers(2))  # the tag moves on
    image_record, layer_records = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:v1@{old.digest}"))
    assert image_record["digest"] == old.digest
    assert len(layer_records) == 1


def test_manifest_bytes_not_matching_the_reference_digest_are_refused(tool, registry, pusher, repo_name,
                                                                      workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("corrupt", path="/manifests/", at=40))
        host = proxy.url.split("://")[1]
        proc = _resolve(tool, workdir, f"{host}/{repo_name}@{image.digest}", check=1)
    assert f"manifest {host}/{repo_name}@{image.digest}: content hashes to sha256:" in proc.stderr
    assert not os.path.exists(Workdir(workdir).manifest_path(host, repo_name, image.digest))


def test_manifest_bytes_not_matching_docker_content_digest_are_refused(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("corrupt", path="/manifests/", at=40))
        with pytest.raises(DigestMismatch, match=f"registry says {image.digest}, content hashes to"):
            resolve_image(f"{proxy.url.split('://')[1]}/{repo_name}:v1", workdir)


def test_a_sha512_docker_content_digest_is_verified_with_sha512(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    sha512 = "sha512:" + hashlib.sha512(image.manifest).hexdigest()
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/v1", status=200, body=image.manifest, headers={
            "Content-Type": image.media_type, "Docker-Content-Digest": sha512}))
        record, _ = resolve_image(f"{proxy.url.split('://')[1]}/{repo_name}:v1", workdir)
    assert record["digest"] == sha512
    with open(record["manifestPath"], "rb") as f:
        assert f.read() == image.manifest


def test_config_not_matching_its_descriptor_is_refused(tool, registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("corrupt", path="/blobs/", at=5))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/{repo_name}:v1", check=1)
    assert f"image config {sha256(image.config)}: content hashes to" in proc.stderr
    assert not os.path.exists(Workdir(workdir).config_path(sha256(image.config)))


# ------------------------------------------------------------ cache

def test_manifest_and_config_are_cached_as_served(tool, registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1), config={"Env": ["A=1"], "Entrypoint": ["/x"]})
    image_record, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:v1"))
    with open(image_record["manifestPath"], "rb") as f:
        assert f.read() == image.manifest
    with open(image_record["config"]["path"], "rb") as f:
        assert f.read() == image.config
    with open(image_record["config"]["savedConfig"]) as f:
        assert json.load(f) == {"Env": ["A=1"], "Entrypoint": ["/x"]}
    with open(Workdir(workdir).tag_path(registry.host, repo_name, "v1")) as f:
        assert f.read().strip() == image.digest


def test_same_repository_on_two_registries_is_cached_apart(tool, registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        other = proxy.url.split("://")[1]
        first, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}:v1"))
        second, _ = _plan(_resolve(tool, workdir, f"{other}/{repo_name}:v1"))
    assert first["manifestPath"] != second["manifestPath"]
    assert os.path.dirname(first["manifestPath"]) == Workdir(workdir).manifest_dir(registry.host, repo_name)
    assert first["digest"] == second["digest"] == image.digest


def test_warm_tag_resolution_makes_one_manifest_request_and_no_blob_request(registry, pusher, repo_name,
                                                                           workdir):
    images = _platform_images(pusher, repo_name, ["linux/amd64", "linux/arm64"])
    pusher.push_index(repo_name, "multi", images)
    with FaultProxy(registry.url) as proxy:
        ref = f"{proxy.url.split('://')[1]}/{repo_name}:multi"
        cold = resolve_image(ref, workdir, platform=parse_platform("linux/arm64"))
        before = len(proxy.seen())
        warm = resolve_image(ref, workdir, platform=parse_platform("linux/arm64"))
        warm_requests = proxy.seen()[before:]
    assert warm == cold
    assert [(r.method, "/manifests/multi" in r.path) for r in warm_requests] == [("HEAD", True)]


def test_warm_digest_resolution_makes_no_request(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        ref = f"{proxy.url.split('://')[1]}/{repo_name}@{image.digest}"
        resolve_image(ref, workdir)
        before = len(proxy.seen())
        resolver = Resolver(workdir)
        resolver.resolve(ref)
        assert len(proxy.seen()) == before
    assert resolver.client is None


def test_warm_resolution_notices_a_moved_tag(registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(1))
    resolve_image(f"{registry.host}/{repo_name}:v1", workdir)
    moved = pusher.push_image(repo_name, "v1", _layers(2))
    image_record, layer_records = resolve_image(f"{registry.host}/{repo_name}:v1", workdir)
    assert image_record["digest"] == moved.digest
    assert len(layer_records) == 2


def test_corrupt_cached_manifest_is_fetched_again(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    ref = f"{registry.host}/{repo_name}@{image.digest}"
    first, _ = resolve_image(ref, workdir)
    with open(first["manifestPath"], "wb") as f:
        f.write(b"{}")
    again, _ = resolve_image(ref, workdir)
    with open(again["manifestPath"], "rb") as f:
        assert f.read() == image.manifest


def test_a_torn_cached_config_is_fetched_again(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    ref = f"{registry.host}/{repo_name}@{image.digest}"
    first, _ = resolve_image(ref, workdir)
    path = first["config"]["path"]
    with open(path, "r+b") as f:  # what a power loss before writeback may leave
        f.truncate(len(image.config) // 2)
    resolve_image(ref, workdir)
    with open(path, "rb") as f:
        assert f.read() == image.config


def test_resolver_exposes_the_client_it_used(registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(1))
    resolver = Resolver(workdir)
    resolver.resolve(f"{registry.host}/{repo_name}:v1")
    try:
        assert isinstance(resolver.client, RegistryClient)
        assert resolver.client.endpoint == registry.url
    finally:
        resolver.client.close()


# ------------------------------------------------------------ errors

def test_unknown_tag_reports_the_registry_error(tool, registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(1))
    proc = _resolve(tool, workdir, f"{registry.host}/{repo_name}:nope", check=1)
    assert proc.stderr == (f"tosi-resolve: error: manifest {registry.host}/{repo_name}:nope: "
                           "404 MANIFEST_UNKNOWN: manifest unknown\n")


def test_unknown_repository_reports_the_registry_error(tool, registry, workdir):
    proc = _resolve(tool, workdir, f"{registry.host}/no/such/repo", check=1)
    assert proc.stderr.startswith(f"tosi-resolve: error: manifest {registry.host}/no/such/repo:latest: 404 ")
    assert "UNKNOWN" in proc.stderr


def test_unreachable_registry_is_one_line_exit_1(tool, workdir):
    proc = _resolve(tool, workdir, f"127.0.0.1:{free_port()}/img", check=1)
    assert proc.stderr.startswith("tosi-resolve: error: 127.0.0.1:")
    assert "unreachable" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_malformed_manifest_is_refused(tool, registry, workdir):
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=b"{not json",
                       headers={"Content-Type": OCI_MANIFEST}))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
    assert "error: malformed manifest" in proc.stderr and "not JSON" in proc.stderr


def test_manifest_without_layers_is_refused(tool, registry, workdir):
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "x", "digest": sha256(b""), "size": 0}}).encode()
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=body, headers={"Content-Type": OCI_MANIFEST}))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
    assert "manifest has no layers list" in proc.stderr


def test_manifest_larger_than_4_mib_is_refused(tool, registry, workdir):
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=b" " * ((4 << 20) + 1),
                       headers={"Content-Type": OCI_MANIFEST}))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
    assert "more than the 4 MiB allowed; refused" in proc.stderr


def test_unsupported_manifest_kind_is_refused(tool, registry, workdir):
    body = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.example.thing+json"}).encode()
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=body))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
    assert "unsupported manifest type 'application/vnd.example.thing+json'" in proc.stderr


@pytest.mark.parametrize("ref, complaint", [
    ("Upper/Case", "must be lower case"),
    ("img:", "empty tag"),
    ("img@sha256:1234", "64 lower-case hex"),
])
def test_invalid_reference_is_usage_error(tool, workdir, ref, complaint):
    proc = _resolve(tool, workdir, ref, check=2)
    assert proc.stderr.startswith("tosi-resolve: error: invalid reference") and complaint in proc.stderr
    assert len(proc.stderr.splitlines()) == 1


def test_malformed_platform_flag_is_usage_error(tool, workdir):
    proc = _resolve(tool, workdir, "127.0.0.1:1/img", "--platform", "linux", check=2)
    assert "invalid platform 'linux'" in proc.stderr


def test_version_does_not_import_requests():
    code = ("import sys\nfrom tosi_tools.cli.resolve import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('requests' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("False")


def test_warm_tag_resolution_falls_back_to_get_when_head_names_no_digest(registry, pusher, repo_name,
                                                                        workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        ref = f"{proxy.url.split('://')[1]}/{repo_name}:v1"
        resolve_image(ref, workdir)
        proxy.add(Rule("status", method="HEAD", path="/manifests/", status=200, body=b""))
        before = len(proxy.seen())
        record, _ = resolve_image(ref, workdir)
        methods = [r.method for r in proxy.seen()[before:]]
    assert record["digest"] == image.digest
    assert methods == ["HEAD", "GET"]


def test_stalled_manifest_response_times_out_as_unreachable(registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("stall", path="/manifests/", after=10, seconds=10))
        resolver = Resolver(workdir, client_factory=lambda endpoint: RegistryClient(endpoint, read_timeout=0.5))
        with pytest.raises(Unreachable, match="connection lost reading manifest"):
            resolver.resolve(f"{proxy.url.split('://')[1]}/{repo_name}:v1")
        resolver.client.close()


def test_config_behind_a_redirect_is_fetched(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as storage, FaultProxy(registry.url) as front:
        front.add(Rule("redirect", path="/blobs/", to=storage.url))
        record, _ = resolve_image(f"{front.url.split('://')[1]}/{repo_name}:v1", workdir)
        assert storage.count("GET", f"/blobs/{sha256(image.config)}") == 1
    with open(record["config"]["path"], "rb") as f:
        assert f.read() == image.config


def test_index_entry_larger_than_4_mib_is_refused_unfetched(tool, registry, workdir):
    host = str(host_platform().normalized()).split("/")
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"big"), "size": 5 << 20,
                                       "platform": {"os": host[0], "architecture": host[1]}}]}).encode()
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/v1", status=200, body=index))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
        assert proxy.count("GET", f"/manifests/{sha256(b'big')}") == 0
    assert "the index says 5242880 bytes, more than 4 MiB; refused" in proc.stderr


def test_plan_records_are_one_json_object_per_line(tool, registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(3))
    proc = _resolve(tool, workdir, f"{registry.host}/{repo_name}:v1")
    lines = proc.stdout.splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["image", "layer", "layer", "layer"]
    assert proc.stdout.endswith("\n")


def test_manifest_is_asked_for_with_every_accept_type_in_one_request(registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        resolve_image(f"{proxy.url.split('://')[1]}/{repo_name}:v1", workdir)
        [request] = proxy.seen("GET", "/manifests/")
    accepted = {part.split(";")[0].strip() for part in request.headers["Accept"].split(",")}
    assert accepted == {
        "application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json", DOCKER_MANIFEST,
        SCHEMA1_UNSIGNED, SCHEMA1_SIGNED,
    }


def test_digest_reference_to_an_index_descends_to_the_platform(tool, registry, pusher, repo_name, workdir):
    images = _platform_images(pusher, repo_name, ["linux/amd64", "linux/arm64"])
    index_digest, _ = pusher.push_index(repo_name, "multi", images)
    image_record, _ = _plan(_resolve(tool, workdir, f"{registry.host}/{repo_name}@{index_digest}",
                                     "--platform", "linux/arm64"))
    assert (image_record["digest"], image_record["index"]["digest"]) == (images[1].digest, index_digest)


def test_index_entry_whose_bytes_do_not_match_is_refused(registry, pusher, repo_name, workdir):
    images = _platform_images(pusher, repo_name, ["linux/amd64", "linux/arm64"])
    pusher.push_index(repo_name, "multi", images)
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("corrupt", path=f"/manifests/{images[1].digest}", at=30))
        with pytest.raises(DigestMismatch, match=r"\(from the index\): content hashes to"):
            resolve_image(f"{proxy.url.split('://')[1]}/{repo_name}:multi", workdir,
                          platform=parse_platform("linux/arm64"))


@pytest.mark.parametrize("form", ["{host}/{repo}", "{host}/{repo}:v1", "{host}/{repo}@{digest}",
                                  "{host}/{repo}:v1@{digest}"])
def test_reference_forms_resolve_end_to_end_on_localhost(tool, registry, pusher, repo_name, workdir, form):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    pusher.push_manifest(repo_name, "latest", image.manifest, image.media_type)
    host = f"localhost:{registry.port}"
    image_record, _ = _plan(_resolve(tool, workdir, form.format(host=host, repo=repo_name, digest=image.digest)))
    assert (image_record["registry"], image_record["digest"]) == (host, image.digest)
    assert image_record["endpoint"] == f"http://{host}"


def test_base_url_reference_is_resolved_through_that_endpoint(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    ref, endpoint = reference_with_base_url(f"{repo_name}:v1", registry.url)
    image_record, _ = resolve_image(ref, workdir, endpoint=endpoint)
    assert (image_record["endpoint"], image_record["registry"]) == (registry.url, registry.host)
    assert image_record["digest"] == image.digest


def test_transient_registry_failure_is_tried_again(registry, pusher, repo_name, workdir):
    image = pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=503, times=1))
        proxy.add(Rule("status", path="/blobs/", status=429, times=1))
        record, _ = resolve_image(f"{proxy.url.split('://')[1]}/{repo_name}:v1", workdir)
        assert (proxy.count("GET", "/manifests/"), proxy.count("GET", "/blobs/")) == (2, 2)
    assert record["digest"] == image.digest


def test_persistent_registry_failure_reports_the_status(tool, registry, pusher, repo_name, workdir):
    pusher.push_image(repo_name, "v1", _layers(1))
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=503, body=b"down for maintenance"))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/{repo_name}:v1", check=1)
        assert proxy.count("GET", "/manifests/") == 3
    assert proc.stderr.rstrip().endswith(f"{repo_name}:v1: 503 Service Unavailable")


def test_manifest_nested_beyond_the_parser_is_refused_in_one_line(tool, registry, workdir):
    body = b'{"schemaVersion": 2, "mediaType": "' + OCI_MANIFEST.encode() + b'", "x": ' \
        + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=body,
                       headers={"Content-Type": OCI_MANIFEST}))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "error: malformed manifest" in proc.stderr and "nested too deeply" in proc.stderr


def test_an_error_answer_that_never_ends_is_not_read_to_its_end(tool, registry, workdir):
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=404, body=itertools.repeat(b"[" * 65536),
                       headers={"Content-Type": "application/json"}))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1, timeout=20)
    assert proc.stderr.endswith("/img:v1: 404 Not Found\n")


@pytest.mark.parametrize("location", ["file:///etc/passwd", "http://[::1/x"])
def test_a_redirect_to_no_http_url_is_refused_in_one_line(tool, registry, workdir, location):
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=302, headers={"Location": location}))
        proc = _resolve(tool, workdir, f"{proxy.url.split('://')[1]}/img:v1", check=1)
    assert proc.stderr.count("\n") == 1 and "internal error" not in proc.stderr
    assert "/v2/img/manifests/v1" in proc.stderr


def test_a_manifest_answer_that_is_no_manifest_is_not_cached(tool, registry, workdir):
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("status", path="/manifests/", status=200, body=b"<html>Log in to the WiFi</html>",
                       headers={"Content-Type": "text/html"}))
        host = proxy.url.split("://")[1]
        proc = _resolve(tool, workdir, f"{host}/img:v1", check=1)
    assert "malformed manifest" in proc.stderr
    assert not os.path.exists(Workdir(workdir).manifest_dir(host, "img"))


def test_a_server_that_speaks_no_http_is_reported_as_such(tool, workdir):
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.1)

        def answer_with_a_banner():
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        banner = threading.Thread(target=answer_with_a_banner)
        banner.start()
        try:
            proc = _resolve(tool, workdir, f"127.0.0.1:{server.getsockname()[1]}/img:v1", check=1)
        finally:
            stop.set()
            banner.join()
    assert "unreachable: no HTTP answer (BadStatusLine: SSH-2.0-OpenSSH_9.2)" in proc.stderr
