"""The harness itself: a real registry answers, and pushed images can be read back."""

import requests

from tests.support.images import DOCKER_MANIFEST, file_entry, make_layer


def test_registry_answers_v2_ping(registry):
    r = requests.get(f"{registry.url}/v2/", timeout=5)
    assert r.status_code == 200
    assert r.headers.get("Docker-Distribution-Api-Version") == "registry/2.0"


def test_pushed_image_manifest_and_blob_read_back(registry, pusher, repo_name):
    layer = make_layer([file_entry("hello.txt", b"hi\n")])
    image = pusher.push_image(repo_name, "v1", [layer])
    r = requests.get(f"{registry.url}/v2/{repo_name}/manifests/v1",
                     headers={"Accept": DOCKER_MANIFEST}, timeout=5)
    assert r.status_code == 200
    assert r.content == image.manifest
    assert r.headers["Docker-Content-Digest"] == image.digest
    blob = requests.get(f"{registry.url}/v2/{repo_name}/blobs/{layer.digest}", timeout=5)
    assert blob.content == layer.data
