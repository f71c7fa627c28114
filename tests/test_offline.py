"""Images without a registry: `oci:DIR[:TAG|@DIGEST]` (an OCI image layout) and
`docker-archive:FILE[:NAME:TAG]` (a docker save tar) give the same trees as the same
image pulled from the registry, in both modes and through the stage commands; the
plan records the source, fetch verifies what it reads there, and bad sources are one
line and exit 2."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import BIN
from tests.support.images import dir_entry, file_entry, make_layer, sha256
from tests.support.offline import Layout, docker_save
from tests.support.plans import parse_plan
from tests.support.staging import snapshot
from tests.test_tosi import rich_layers, shell_pipeline, without_root
from tosi_tools.cache import Workdir
from tosi_tools.errors import InvalidReference
from tosi_tools.reference import DOCKER_ARCHIVE, OCI_LAYOUT, parse_any_reference, parse_source_reference


@pytest.fixture
def pushed(pusher, repo_name):
    """The rich three-layer image (gzip, zstd and plain layers), pushed to the registry."""
    return pusher.push_image(repo_name, "1", rich_layers(), config={"Env": ["A=1"], "Cmd": ["/app/run"]})


@pytest.fixture
def from_registry(pushed, registry, tool, tmp_path):
    """The tree `tosi -extractto` makes of the pushed image, pulled from the registry."""
    target = tmp_path / "from-registry"
    tool("tosi", "-image", f"{registry.host}/{pushed.repo}:1", "-extractto", target,
         "-workdir", tmp_path / "registry-workdir", check=0)
    return without_root(snapshot(str(target)))


@pytest.fixture
def layout(pushed, tmp_path):
    return Layout(tmp_path / "layout").add_image(pushed, tag="v1")


def one_line_error(proc, status=2):
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ---------------------------------------------------------------- the same trees

def test_oci_layout_extracts_the_tree_the_registry_gives(tool, layout, from_registry, tmp_path, workdir):
    target = tmp_path / "rootfs"
    tool("tosi", "-image", f"oci:{layout.root}:v1", "-extractto", target, "-workdir", workdir, check=0)
    assert without_root(snapshot(str(target))) == from_registry


def test_oci_layout_mounts_the_tree_the_registry_gives(tool, layout, from_registry, tmp_path, workdir, mounts):
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-image", f"oci:{layout.root}:v1", "-mount", target, "-workdir", workdir, check=0)
    assert without_root(snapshot(target)) == from_registry


@pytest.mark.parametrize("form", ["manifest.json", "oci"])
@pytest.mark.parametrize("compress", [None, "gzip"])
def test_docker_archive_extracts_the_tree_the_registry_gives(tool, pushed, from_registry, tmp_path, workdir,
                                                             form, compress):
    archive = docker_save(tmp_path / "image.tar", [(pushed, ["example/app:1"])], form=form, compress=compress)
    for name in ("", ":example/app:1"):
        target = tmp_path / f"rootfs{name}"
        tool("tosi", "-image", f"docker-archive:{archive}{name}", "-extractto", target, "-workdir", workdir,
             check=0)
        assert without_root(snapshot(str(target))) == from_registry


def test_docker_archive_mounts_the_tree_the_registry_gives(tool, pushed, from_registry, tmp_path, workdir, mounts):
    archive = docker_save(tmp_path / "image.tar.gz", [(pushed, ["example/app:1"])], compress="gzip")
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-image", f"docker-archive:{archive}:example/app:1", "-mount", target, "-workdir", workdir,
         check=0)
    assert without_root(snapshot(target)) == from_registry


def test_a_warm_mount_of_a_layout_reuses_the_cache(tool, layout, from_registry, tmp_path, workdir, mounts):
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-image", f"oci:{layout.root}:v1", "-mount", target, "-workdir", workdir, check=0)
    subprocess.run(["umount", target], check=True)
    for name in os.listdir(os.path.join(layout.root, "blobs", "sha256")):  # the config too is cached
        if name not in (layout.entries[0]["digest"][7:],):
            os.unlink(os.path.join(layout.root, "blobs", "sha256", name))
    tool("tosi", "-image", f"oci:{layout.root}:v1", "-mount", target, "-read-only", "-workdir", workdir, check=0)
    assert without_root(snapshot(target)) == from_registry


@pytest.mark.parametrize("kind", ["layout", "archive", "gzip archive"])
def test_a_partial_blob_is_completed_from_the_source(tool, pushed, layout, tmp_path, workdir, kind):
    reference = f"oci:{layout.root}:v1"
    if kind != "layout":
        archive = docker_save(tmp_path / "image.tar", [(pushed, ["app:1"])], form="oci",
                              compress="gzip" if kind == "gzip archive" else None)
        reference = f"docker-archive:{archive}"
    resolved = tool("tosi-resolve", "--workdir", workdir, reference, check=0)
    victim = pushed.layers[0]
    cache = Workdir(workdir)
    os.makedirs(cache.layers, exist_ok=True)
    with open(cache.partial_path(victim.digest), "wb") as f:
        f.write(victim.data[:len(victim.data) // 2])
    tool("tosi-fetch", "--progress", "never", input=resolved.stdout, check=0)
    assert open(cache.layer_path(victim.digest), "rb").read() == victim.data


def test_stages_in_a_pipe_read_the_layout(layout, from_registry, tmp_path, workdir):
    target = tmp_path / "rootfs"
    shell_pipeline(["tosi-resolve", "--workdir", workdir, f"oci:{layout.root}:v1"],
                   ["tosi-fetch", "--progress", "never"],
                   ["tosi-unpack", "--into", target])
    assert without_root(snapshot(str(target))) == from_registry


# ---------------------------------------------------------------- the plan

def test_the_plan_records_the_layout_and_no_registry(tool, layout, pushed, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}:v1", check=0)
    image, *layers = parse_plan(proc.stdout)
    assert image["source"] == {"type": "oci-layout", "path": layout.root}
    assert image["reference"] == f"oci:{layout.root}:v1"
    assert image["digest"] == pushed.digest
    assert (image["registry"], image["endpoint"], image["repository"], image["manifestPath"]) == (None,) * 4
    assert [layer["digest"] for layer in layers] == [layer.digest for layer in pushed.layers]
    assert open(Workdir(workdir).config_path(sha256(pushed.config)), "rb").read() == pushed.config


def test_a_docker_save_layer_is_described_as_stored(tool, pushed, tmp_path, workdir):
    archive = docker_save(tmp_path / "image.tar", [(pushed, ["example/app:1"])])
    proc = tool("tosi-resolve", "--workdir", workdir, f"docker-archive:{archive}:example/app:1", check=0)
    image, *layers = parse_plan(proc.stdout)
    diff_ids = [layer.diff_id for layer in pushed.layers]
    # docker save stores layers uncompressed: each one's digest is its diffID.
    assert [(r["mediaType"], r["digest"], r["diffID"]) for r in layers] == \
        [("application/vnd.oci.image.layer.v1.tar", d, d) for d in diff_ids]
    assert image["source"]["type"] == "docker-archive" and image["source"]["path"] == archive
    assert image["tag"] == "1"
    assert set(image["source"]["members"]) == {sha256(pushed.config), *diff_ids}


# ---------------------------------------------------------------- platforms and names

def test_a_multi_platform_index_in_a_layout_gives_the_platform_asked_for(pusher, repo_name, tool, tmp_path, workdir):
    amd = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"amd64\n")])], arch="amd64")
    arm = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"arm64\n")])], arch="arm64")
    layout = Layout(tmp_path / "layout")
    index_digest = layout.add_index([amd, arm], tag="multi")
    for platform, expected in (("linux/arm64", arm), ("linux/amd64", amd)):
        proc = tool("tosi-resolve", "--workdir", workdir, "--platform", platform, f"oci:{layout.root}:multi",
                    check=0)
        image = parse_plan(proc.stdout)[0]
        assert image["digest"] == expected.digest
        assert image["index"]["digest"] == index_digest
        assert image["platform"]["architecture"] == platform.split("/")[1]
    target = tmp_path / "rootfs"
    tool("tosi", "-image", f"oci:{layout.root}:multi", "-platform", "linux/arm64", "-extractto", target,
         "-workdir", workdir, check=0)
    assert (target / "arch").read_text() == "arm64\n"


def test_a_layout_image_is_named_by_digest(tool, layout, pushed, workdir):
    proc = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}@{pushed.digest}", check=0)
    assert parse_plan(proc.stdout)[0]["digest"] == pushed.digest


def test_an_archive_of_two_images_needs_a_name_and_gives_the_one_named(pusher, repo_name, tool, tmp_path, workdir):
    first = pusher.push_image(repo_name, "a", [make_layer([file_entry("which", b"first\n")])])
    second = pusher.push_image(repo_name, "b", [make_layer([file_entry("which", b"second\n")])])
    archive = docker_save(tmp_path / "two.tar", [(first, ["app:first"]), (second, ["quay.io/x/app:second"])])
    line = one_line_error(tool("tosi-resolve", "--workdir", workdir, f"docker-archive:{archive}"))
    assert "holds 2 images" in line and "docker.io/library/app:first" in line
    target = tmp_path / "rootfs"
    tool("tosi", "-image", f"docker-archive:{archive}:quay.io/x/app:second", "-extractto", target,
         "-workdir", workdir, check=0)
    assert (target / "which").read_text() == "second\n"


# ---------------------------------------------------------------- what fetch lets in

def test_a_layout_blob_that_fails_its_digest_is_refused(tool, layout, pushed, tmp_path, workdir):
    victim = pushed.layers[0]
    with open(layout.blob_path(victim.digest), "r+b") as f:
        f.seek(len(victim.data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    proc = tool("tosi", "-image", f"oci:{layout.root}:v1", "-extractto", tmp_path / "rootfs", "-workdir", workdir)
    line = one_line_error(proc, status=1)
    assert victim.digest in line
    cache = Workdir(workdir)
    assert not os.path.exists(cache.layer_path(victim.digest))
    assert not os.path.exists(cache.partial_path(victim.digest))


def test_a_layout_blob_longer_than_its_descriptor_is_refused(tool, layout, pushed, workdir):
    victim = pushed.layers[2]
    with open(layout.blob_path(victim.digest), "ab") as f:
        f.write(b"\0" * 4096)
    resolved = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}:v1", check=0)
    proc = tool("tosi-fetch", "--progress", "never", input=resolved.stdout)
    assert victim.digest in one_line_error(proc, status=1)
    assert not os.path.exists(Workdir(workdir).layer_path(victim.digest))


def test_a_blob_symlinked_out_of_the_layout_is_refused(tool, layout, pushed, tmp_path, workdir):
    victim = pushed.layers[1]
    outside = tmp_path / "outside-blob"
    os.rename(layout.blob_path(victim.digest), outside)
    os.symlink(outside, layout.blob_path(victim.digest))
    resolved = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}:v1", check=0)
    line = one_line_error(tool("tosi-fetch", "--progress", "never", input=resolved.stdout))
    assert "leads out of it" in line
    assert not os.path.exists(Workdir(workdir).layer_path(victim.digest))


def test_a_blob_symlinked_inside_the_layout_is_read(tool, layout, pushed, tmp_path, workdir):
    victim = pushed.layers[1]
    os.makedirs(os.path.join(layout.root, "store"))
    os.rename(layout.blob_path(victim.digest), os.path.join(layout.root, "store", "blob"))
    os.symlink("../../store/blob", layout.blob_path(victim.digest))
    tool("tosi", "-image", f"oci:{layout.root}:v1", "-workdir", workdir, "-extractto", tmp_path / "rootfs",
         check=0)
    assert open(Workdir(workdir).layer_path(victim.digest), "rb").read() == victim.data


def test_a_plan_naming_an_unknown_source_type_is_refused(tool, layout, workdir):
    resolved = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}:v1", check=0)
    lines = resolved.stdout.splitlines()
    image = json.loads(lines[0])
    image["source"]["type"] = "ftp"
    proc = tool("tosi-fetch", input="\n".join([json.dumps(image), *lines[1:]]) + "\n")
    assert "source: type 'ftp' is not one of" in one_line_error(proc)


# ---------------------------------------------------------------- bad sources: one line, exit 2

def _bad_layouts(tmp_path, pushed):
    missing = tmp_path / "missing"
    no_index = Layout(tmp_path / "no-index")
    ambiguous = Layout(tmp_path / "ambiguous").add_image(pushed, tag="v1")
    other = dict(ambiguous.entries[0], digest=sha256(b"other"))
    ambiguous.entries.append(other)
    ambiguous.write_index()
    not_a_layout = tmp_path / "plain-dir"
    not_a_layout.mkdir()
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"\x1f\x8b" + b"not really gzip" * 100)
    truncated = tmp_path / "truncated.tar"
    docker_save(truncated, [(pushed, ["app:1"])])
    good = docker_save(tmp_path / "good.tar", [(pushed, ["app:1"])])
    truncated.write_bytes(truncated.read_bytes()[:1500])
    return {
        "missing dir": (f"oci:{missing}:v1", "no such directory"),
        "no index.json": (f"oci:{no_index.root}:v1", "no index.json"),
        "not a layout": (f"oci:{not_a_layout}", "no oci-layout"),
        "unknown tag": (f"oci:{ambiguous.root}:v2", "no image tagged 'v2'"),
        "ambiguous tag": (f"oci:{ambiguous.root}:v1", "2 images tagged 'v1'"),
        "missing archive": (f"docker-archive:{tmp_path / 'none.tar'}", "no such file"),
        "corrupt archive": (f"docker-archive:{corrupt}", "corrupt or not a tar archive"),
        "truncated archive": (f"docker-archive:{truncated}", "truncated"),
        "unknown name": (f"docker-archive:{good}:nope:1", "no image named docker.io/library/nope:1"),
        "bad tag": (f"oci:{missing}:-v1", "invalid tag"),
    }


@pytest.mark.parametrize("case", ["missing dir", "no index.json", "not a layout", "unknown tag", "ambiguous tag",
                                  "missing archive", "corrupt archive", "truncated archive", "unknown name",
                                  "bad tag"])
def test_a_bad_source_is_one_line_and_exit_2(tool, pushed, tmp_path, workdir, case):
    reference, expected = _bad_layouts(tmp_path, pushed)[case]
    for command in (["tosi-resolve", "--workdir", workdir, reference],
                    ["tosi", "-workdir", workdir, "-image", reference, "-extractto", tmp_path / "rootfs"]):
        line = one_line_error(tool(*command))
        assert expected in line, line
    assert not os.path.exists(tmp_path / "rootfs")


def test_url_with_a_local_source_is_a_usage_error(tool, layout, workdir):
    line = one_line_error(tool("tosi", "-url", "127.0.0.1:1", "-image", f"oci:{layout.root}", "-workdir", workdir))
    assert "needs none" in line


# ---------------------------------------------------------------- how references are split

@pytest.mark.parametrize("text, path, tag, digest", [
    ("oci:/srv/layout", "/srv/layout", None, None),
    ("oci:/srv/layout:v1.2", "/srv/layout", "v1.2", None),
    ("oci:/srv/layout:example.com/app:1.0", "/srv/layout", "example.com/app:1.0", None),
    ("oci:/srv/layout@sha256:" + "a" * 64, "/srv/layout", None, "sha256:" + "a" * 64),
    ("oci:relative/dir:v1", os.path.abspath("relative/dir"), "v1", None),
])
def test_an_oci_reference_is_split_at_the_first_colon(text, path, tag, digest):
    ref = parse_source_reference(text)
    assert (ref.transport, ref.path, ref.tag, ref.digest) == (OCI_LAYOUT, path, tag, digest)


def test_a_docker_archive_reference_names_an_image_by_docker_rules():
    ref = parse_any_reference("docker-archive:/tmp/x.tar:busybox")
    assert ref.transport == DOCKER_ARCHIVE and ref.path == "/tmp/x.tar"
    assert ref.name.normalized() == "docker.io/library/busybox:latest"
    assert ref.normalized() == "docker-archive:/tmp/x.tar:docker.io/library/busybox:latest"


@pytest.mark.parametrize("text", ["oci:", "oci::v1", "oci:/dir:", "docker-archive:/x.tar:app@sha256:" + "a" * 64])
def test_malformed_source_references_are_refused(text):
    with pytest.raises(InvalidReference):
        parse_any_reference(text)


def test_a_path_with_a_colon_is_named_through_a_symlink(tool, layout, tmp_path, workdir):
    with_colon = tmp_path / "a:b"
    os.rename(layout.root, with_colon)
    os.symlink(with_colon, tmp_path / "ab")
    assert one_line_error(tool("tosi-resolve", "--workdir", workdir, f"oci:{with_colon}:v1"))
    tool("tosi-resolve", "--workdir", workdir, f"oci:{tmp_path / 'ab'}:v1", check=0)


def test_a_layout_directory_of_one_image_needs_no_tag(tool, pusher, repo_name, tmp_path, workdir):
    image = pusher.push_image(repo_name, "x", [make_layer([dir_entry("d"), file_entry("d/f", b"f")])])
    layout = Layout(tmp_path / "one").add_image(image)  # no ref name at all
    proc = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}", check=0)
    assert parse_plan(proc.stdout)[0]["digest"] == image.digest


def test_resolve_reads_no_registry_flags_for_a_layout(layout, workdir):
    # No registry is contacted: not even the endpoint detection a registry reference needs.
    env = dict(os.environ, HTTPS_PROXY="http://127.0.0.1:1", HTTP_PROXY="http://127.0.0.1:1")
    proc = subprocess.run([sys.executable, os.path.join(BIN, "tosi-resolve"), "--workdir", workdir,
                           f"oci:{layout.root}:v1"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_index_json_entries_of_one_tag_for_several_platforms_are_chosen_as_an_index(pusher, repo_name, tool,
                                                                                      tmp_path, workdir):
    amd = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"amd64\n")])], arch="amd64")
    arm = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"arm64\n")])], arch="arm64")
    layout = Layout(tmp_path / "layout")
    layout.add_image(amd, tag="app", platform=True)
    layout.add_image(arm, tag="app", platform=True)
    proc = tool("tosi-resolve", "--workdir", workdir, "--platform", "linux/arm64", f"oci:{layout.root}:app",
                check=0)
    image = parse_plan(proc.stdout)[0]
    assert (image["digest"], image["index"]) == (arm.digest, None)


def test_a_fifo_planted_as_a_blob_is_refused_without_hanging(tool, layout, pushed, workdir):
    victim = pushed.layers[0]
    os.unlink(layout.blob_path(victim.digest))
    os.mkfifo(layout.blob_path(victim.digest))
    resolved = tool("tosi-resolve", "--workdir", workdir, f"oci:{layout.root}:v1", check=0)
    proc = tool("tosi-fetch", "--progress", "never", input=resolved.stdout, timeout=60)
    assert "is not a regular file" in one_line_error(proc)


def test_a_hardlink_member_of_an_archive_is_not_read(tool, pushed, tmp_path, workdir):
    archive = tmp_path / "links.tar"
    docker_save(archive, [(pushed, ["app:1"])])
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(archive) as source, tarfile.open(rewritten, "w") as out:
        members = source.getmembers()
        layer = next(m for m in members if m.name.endswith("layer.tar"))
        for member in members:
            if member is layer:
                link = tarfile.TarInfo(member.name)
                link.type = tarfile.LNKTYPE
                link.linkname = next(m.name for m in members if m.name.endswith(".json") and "/" not in m.name)
                out.addfile(link)
            else:
                out.addfile(member, source.extractfile(member) if member.isreg() else None)
    line = one_line_error(tool("tosi-resolve", "--workdir", workdir, f"docker-archive:{rewritten}"))
    assert "holds no" in line and layer.name in line
