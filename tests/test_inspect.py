"""Inspecting a remote image without a cache (issue 15): `tosi-resolve --no-cache`
prints the plan and writes nothing anywhere, as `skopeo inspect` would; `tosi-resolve
--list-tags` lists a repository's tags, page after page."""

import json
import os

import pytest

from tests.support.faultproxy import Rule
from tests.support.images import file_entry, make_layer
from tests.support.plans import assert_cached

CACHE_PATHS = ("manifestPath", "workdir")


def plan_of(stdout):
    records = [json.loads(line) for line in stdout.splitlines()]
    return records[0], records[1:]


@pytest.fixture
def image(pusher, repo_name):
    return pusher.push_image(repo_name, "1", [make_layer([file_entry("etc/hello", b"hi\n")]),
                                              make_layer([file_entry("etc/bye", b"bye\n")])])


def test_no_cache_prints_the_plan_and_creates_no_workdir(tool, registry, image, tmp_path):
    workdir = tmp_path / "never"
    proc = tool("tosi-resolve", "--no-cache", "--workdir", workdir, f"{registry.host}/{image.repo}:1",
                env={"TOSI_WORKDIR": str(tmp_path / "nor-this")}, check=0)
    record, layers = plan_of(proc.stdout)
    assert record["digest"] == image.digest
    assert [layer["digest"] for layer in layers] == [layer.digest for layer in image.layers]
    assert os.listdir(tmp_path) == []


def test_a_no_cache_plan_names_no_cache_path(tool, registry, image):
    proc = tool("tosi-resolve", "--no-cache", f"{registry.host}/{image.repo}:1", check=0)
    record, layers = plan_of(proc.stdout)
    assert [record[name] for name in CACHE_PATHS] == [None, None]
    assert record["config"]["path"] is None and record["config"]["savedConfig"] is None
    assert all("path" not in layer for layer in layers)


def test_no_cache_of_an_index_names_no_index_path(tool, registry, pusher, repo_name):
    amd = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"amd64\n")])], oci=True)
    pusher.push_index(repo_name, "multi", [amd])
    proc = tool("tosi-resolve", "--no-cache", "--platform", "linux/amd64", f"{registry.host}/{repo_name}:multi",
                check=0)
    record, _ = plan_of(proc.stdout)
    assert record["index"]["path"] is None and record["digest"] == amd.digest


def test_a_no_cache_plan_is_fetched_into_the_fetchers_own_workdir(tool, registry, image, workdir):
    plan = tool("tosi-resolve", "--no-cache", f"{registry.host}/{image.repo}:1", check=0).stdout
    fetched = tool("tosi-fetch", "--workdir", workdir, input=plan, check=0).stdout
    record, _ = plan_of(fetched)
    assert record["workdir"] == workdir
    assert_cached(workdir, image.layers)


def test_a_failed_no_cache_lookup_leaves_nothing_behind(tool, registry, tmp_path):
    proc = tool("tosi-resolve", "--no-cache", "--workdir", tmp_path / "wd", f"{registry.host}/test/absent:1",
                check=1)
    assert "absent" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_list_tags_prints_every_tag_of_the_repository(tool, registry, pusher, repo_name, tmp_path):
    layer = make_layer([file_entry("a", b"a")])
    for tag in ("1.0", "1.1", "latest"):
        pusher.push_image(repo_name, tag, [layer])
    proc = tool("tosi-resolve", "--list-tags", "--workdir", tmp_path / "wd", f"{registry.host}/{repo_name}",
                check=0)
    assert sorted(proc.stdout.split()) == ["1.0", "1.1", "latest"]
    assert os.listdir(tmp_path) == []


def test_list_tags_asks_for_pages_of_the_size_given(tool, fault_proxy, pusher, repo_name):
    pusher.push_image(repo_name, "1", [make_layer([file_entry("a", b"a")])])
    host = fault_proxy.url.split("://", 1)[1]
    tool("tosi-resolve", "--list-tags", "--page-size", "2", f"{host}/{repo_name}", check=0)
    assert [r.path for r in fault_proxy.seen("GET", "/tags/list")] == [f"/v2/{repo_name}/tags/list?n=2"]


def test_list_tags_follows_the_registrys_next_page_links(tool, fault_proxy, pusher, repo_name):
    # docker-registry 2.8 answers every tag at once; the proxy pages its answer as the
    # distribution spec does (n=, last=, Link rel="next"), as Docker Hub or distribution 3 do.
    fault_proxy.add(Rule("paginate", path="/tags/list"))
    layer = make_layer([file_entry("a", b"a")])
    tags = [f"t{i}" for i in range(5)]
    for tag in tags:
        pusher.push_image(repo_name, tag, [layer])
    host = fault_proxy.url.split("://", 1)[1]
    proc = tool("tosi-resolve", "--list-tags", "--page-size", "2", f"{host}/{repo_name}", check=0)
    assert proc.stdout.split() == tags
    assert fault_proxy.count("GET", "/tags/list") == 3


def test_list_tags_of_an_unknown_repository_is_one_error_line(tool, registry):
    proc = tool("tosi-resolve", "--list-tags", f"{registry.host}/test/no-such-repository", check=1)
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "tags of test/no-such-repository" in proc.stderr


def test_page_size_without_list_tags_is_a_usage_error(tool, registry):
    proc = tool("tosi-resolve", "--page-size", "2", f"{registry.host}/test/x:1", check=2)
    assert "--page-size goes with --list-tags" in proc.stderr


def test_list_tags_refuses_a_next_page_on_another_host(tool, fault_proxy, repo_name):
    fault_proxy.add(Rule("status", path="/tags/list", status=200, body=b'{"name": "x", "tags": ["a"]}',
                         headers={"Content-Type": "application/json",
                                  "Link": '<http://192.0.2.1/v2/x/tags/list?n=1&last=a>; rel="next"'}))
    host = fault_proxy.url.split("://", 1)[1]
    proc = tool("tosi-resolve", "--list-tags", f"{host}/{repo_name}", check=1)
    assert "the next page is on another host (192.0.2.1)" in proc.stderr
    assert fault_proxy.count("GET", "/tags/list") == 1
