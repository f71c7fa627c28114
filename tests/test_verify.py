"""tosi-verify on a cache filled by tosi-fetch from the real registry."""

import os

import pytest

from tests.support.plans import parse_plan, plan_text, random_layer, records_text
from tosi_tools.cache import Workdir


@pytest.fixture
def image(pusher, repo_name):
    layers = [random_layer(50_000 * (i + 1)) for i in range(3)]
    return pusher.push_image(repo_name, "v1", layers)


@pytest.fixture
def fetched(tool, registry, image, workdir):
    """The plan tosi-fetch wrote after filling the cache."""
    return tool("tosi-fetch", "--workdir", workdir,
                input=plan_text(registry.url, image, workdir), check=0).stdout


def digest_list(image):
    return "".join(layer.digest + "\n" for layer in image.layers)


def test_a_good_cache_verifies_and_the_plan_passes_through_unchanged(tool, fetched, workdir):
    proc = tool("tosi-verify", "--workdir", workdir, input=fetched, check=0)
    assert parse_plan(proc.stdout) == parse_plan(fetched)
    assert proc.stderr == ""


def test_the_workdir_named_by_the_plan_is_used_without_the_flag(tool, fetched):
    proc = tool("tosi-verify", input=fetched, env={"TOSI_WORKDIR": "/nonexistent"}, check=0)
    assert len(parse_plan(proc.stdout)) == 4


def test_a_truncated_blob_fails_and_is_moved_to_quarantine(tool, fetched, image, workdir):
    cache = Workdir(workdir)
    path = cache.layer_path(image.layers[1].digest)
    with open(path, "r+b") as f:
        f.truncate(1000)
    proc = tool("tosi-verify", "--workdir", workdir, input=fetched, check=1)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"tosi-verify: error: layer 1 ({image.layers[1].digest})")
    assert "size is 1000 bytes" in lines[0]
    assert not os.path.exists(path)
    assert os.path.getsize(os.path.join(cache.quarantine, os.path.basename(path))) == 1000
    assert [r.get("index") for r in parse_plan(proc.stdout)] == [None, 0]


def test_a_flipped_byte_fails_and_the_next_fetch_replaces_the_blob(tool, fetched, registry, image, workdir):
    path = Workdir(workdir).layer_path(image.layers[2].digest)
    with open(path, "r+b") as f:
        f.seek(4321)
        byte = f.read(1)
        f.seek(4321)
        f.write(bytes([byte[0] ^ 1]))
    proc = tool("tosi-verify", "--workdir", workdir, input=fetched, check=1)
    assert "hashes to sha256:" in proc.stderr and proc.stderr.count("\n") == 1
    assert not os.path.exists(path)
    tool("tosi-fetch", "--workdir", workdir, input=plan_text(registry.url, image, workdir), check=0)
    tool("tosi-verify", "--workdir", workdir, input=fetched, check=0)


def with_size(plan, index, size):
    """`plan` (text) with layer `index`'s size replaced by `size`."""
    records = parse_plan(plan)
    records[1 + index]["size"] = size
    return records_text(records)


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("delta", [-1, 1], ids=["smaller", "larger"])
def test_a_wrong_plan_size_for_a_good_blob_is_a_usage_error_and_the_blob_stays(
        tool, fetched, image, workdir, delta):
    layer = image.layers[1]
    path = Workdir(workdir).layer_path(layer.digest)
    proc = tool("tosi-verify", "--workdir", workdir,
                input=with_size(fetched, 1, len(layer.data) + delta), check=2)
    assert proc.stderr == (
        f"tosi-verify: error: layer 1 ({layer.digest}): the plan says {len(layer.data) + delta} bytes, "
        f"but the blob is {len(layer.data)} bytes and matches its digest: the plan is wrong "
        "(the blob stays in the cache)\n")
    assert read(path) == layer.data
    assert os.listdir(Workdir(workdir).quarantine) == []


def test_the_plan_written_stops_before_the_layer_whose_size_is_wrong(tool, fetched, image, workdir):
    proc = tool("tosi-verify", "--workdir", workdir,
                input=with_size(fetched, 1, len(image.layers[1].data) + 1), check=2)
    assert [r.get("index") for r in parse_plan(proc.stdout)] == [None, 0]


def test_a_blob_that_does_not_match_its_digest_is_quarantined_even_when_the_plan_gives_its_size(
        tool, fetched, image, workdir):
    cache = Workdir(workdir)
    path = cache.layer_path(image.layers[1].digest)
    with open(path, "r+b") as f:
        f.truncate(1000)
    proc = tool("tosi-verify", "--workdir", workdir, input=with_size(fetched, 1, 1000), check=1)
    assert proc.stderr.count("\n") == 1 and "hashes to sha256:" in proc.stderr
    assert not os.path.exists(path)
    assert os.path.getsize(os.path.join(cache.quarantine, os.path.basename(path))) == 1000


def test_a_wrong_size_is_exit_2_even_with_a_corrupt_blob_too_and_each_gets_its_line(
        tool, fetched, image, workdir):
    cache = Workdir(workdir)
    with open(cache.layer_path(image.layers[2].digest), "ab") as f:
        f.write(b"!")
    proc = tool("tosi-verify", "--workdir", workdir,
                input=with_size(fetched, 0, len(image.layers[0].data) + 1), check=2)
    lines = proc.stderr.splitlines()
    assert len(lines) == 2
    assert "layer 0" in lines[0] and "the plan is wrong" in lines[0]
    assert "layer 2" in lines[1] and "moved to" in lines[1]
    assert os.path.exists(cache.layer_path(image.layers[0].digest))
    assert not os.path.exists(cache.layer_path(image.layers[2].digest))


def test_a_blob_named_twice_is_checked_against_each_size_the_plan_gives(
        tool, pusher, registry, repo_name, workdir):
    layer = random_layer(60_000)
    image = pusher.push_image(repo_name, "v1", [layer, random_layer(1000), layer])
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan_text(registry.url, image, workdir),
                check=0).stdout
    proc = tool("tosi-verify", "--workdir", workdir, input=with_size(plan, 2, len(layer.data) + 5), check=2)
    assert proc.stderr.count("\n") == 1 and f"layer 2 ({layer.digest}): the plan says" in proc.stderr
    assert read(Workdir(workdir).layer_path(layer.digest)) == layer.data


def test_fetch_and_verify_refuse_a_wrong_size_for_a_good_cached_blob_in_the_same_words(
        tool, fetched, registry, image, workdir):
    size = len(image.layers[0].data) - 7
    verify = tool("tosi-verify", "--workdir", workdir, input=with_size(fetched, 0, size), check=2)
    fetch = tool("tosi-fetch", "--workdir", workdir,
                 input=with_size(plan_text(registry.url, image, workdir), 0, size), check=2)
    assert verify.stderr.removeprefix("tosi-verify: ") == fetch.stderr.removeprefix("tosi-fetch: ")


def test_a_missing_blob_fails_with_one_line(tool, fetched, image, workdir):
    os.unlink(Workdir(workdir).layer_path(image.layers[0].digest))
    proc = tool("tosi-verify", "--workdir", workdir, input=fetched, check=1)
    assert proc.stderr == (f"tosi-verify: error: layer 0 ({image.layers[0].digest}): missing from the cache "
                           f"({Workdir(workdir).layer_path(image.layers[0].digest)})\n")
    assert [r["type"] for r in parse_plan(proc.stdout)] == ["image"]


def test_a_corrupt_config_is_reported(tool, fetched, image, workdir):
    config = parse_plan(fetched)[0]["config"]
    with open(config["path"], "ab") as f:
        f.write(b" ")
    proc = tool("tosi-verify", "--workdir", workdir, input=fetched, check=1)
    assert f"config ({config['digest']})" in proc.stderr
    assert proc.stdout == ""


def test_every_bad_blob_gets_its_own_line(tool, fetched, image, workdir):
    for layer in image.layers[:2]:
        os.unlink(Workdir(workdir).layer_path(layer.digest))
    proc = tool("tosi-verify", "--workdir", workdir, input=fetched, check=1)
    assert [line.split(" (")[0] for line in proc.stderr.splitlines()] == [
        "tosi-verify: error: layer 0", "tosi-verify: error: layer 1"]


def test_a_digest_list_comes_back_as_the_verified_digests(tool, fetched, image, workdir):
    proc = tool("tosi-verify", "--workdir", workdir, input=digest_list(image), check=0)
    assert proc.stdout == digest_list(image)


def test_a_digest_list_with_a_bad_blob_lists_only_the_good_ones(tool, fetched, image, workdir):
    path = Workdir(workdir).layer_path(image.layers[1].digest)
    with open(path, "ab") as f:
        f.write(b"extra")
    proc = tool("tosi-verify", "--workdir", workdir, input=digest_list(image), check=1)
    assert proc.stdout.splitlines() == [image.layers[0].digest, image.layers[2].digest]
    assert f"blob {image.layers[1].digest}" in proc.stderr


def test_a_digest_list_may_name_a_config(tool, fetched, image, workdir):
    digest = parse_plan(fetched)[0]["config"]["digest"]
    proc = tool("tosi-verify", "--workdir", workdir, input=f"# the config\n{digest}\n", check=0)
    assert proc.stdout == digest + "\n"


def test_a_malformed_digest_list_is_a_usage_error(tool, workdir):
    proc = tool("tosi-verify", "--workdir", workdir, input="sha256:nothex\n")
    assert proc.returncode == 2
    assert proc.stderr.startswith("tosi-verify: error: stdin: line 1:")


JUNK = "x" * (100 << 20)


@pytest.mark.parametrize("line", [JUNK, '{"type": "%s"}' % JUNK], ids=["digest-list", "plan"])
def test_a_100_mb_junk_line_is_quoted_in_80_characters(tool, workdir, line):
    proc = tool("tosi-verify", "--workdir", workdir, input=line + "\n")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and len(proc.stderr) < 300, proc.stderr[:300]
    assert proc.stderr.count("x" * 40) == 2 and "x" * 41 not in proc.stderr
    assert f"({len(JUNK)} characters)" in proc.stderr


def test_empty_input_is_a_usage_error(tool, workdir):
    proc = tool("tosi-verify", "--workdir", workdir, input="")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_a_plan_cannot_point_verify_at_files_outside_the_cache(tool, fetched, tmp_path, workdir):
    records = parse_plan(fetched)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not a blob")
    records[1]["path"] = str(victim)
    text = records_text(records)
    # Refused as it is read (a plan names cache paths only inside its workdir); never touched.
    proc = tool("tosi-verify", "--workdir", workdir, input=text, check=2)
    assert proc.stderr.count("\n") == 1 and "is not where a workdir keeps" in proc.stderr
    assert victim.read_bytes() == b"not a blob"
    assert os.listdir(os.path.join(workdir, "quarantine")) == []  # made empty with the workdir


def test_a_corrupt_blob_named_twice_is_reported_once(tool, pusher, registry, repo_name, workdir):
    layer = random_layer(60_000)
    image = pusher.push_image(repo_name, "v1", [layer, random_layer(1000), layer])
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan_text(registry.url, image, workdir),
                check=0).stdout
    with open(Workdir(workdir).layer_path(layer.digest), "r+b") as f:
        f.write(b"!")
    proc = tool("tosi-verify", "--workdir", workdir, input=plan, check=1)
    assert proc.stderr.count("\n") == 1 and "layer 0" in proc.stderr
    assert [r.get("index") for r in parse_plan(proc.stdout)] == [None]


DEEP_JSON = '{"type": "image", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"


@pytest.mark.parametrize("cmd", ["tosi-verify", "tosi-fetch", "tosi-unpack", "tosi-mount"])
def test_a_plan_line_nested_too_deeply_is_a_usage_error_not_a_crash(tool, workdir, cmd):
    extra = ("--into", f"{workdir}/into") if cmd == "tosi-unpack" else (
        (f"{workdir}/mnt",) if cmd == "tosi-mount" else ())
    proc = tool(cmd, "--workdir", workdir, *extra, input=DEEP_JSON)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"{cmd}: error: stdin: line 1") and proc.stderr.count("\n") == 1, proc.stderr
    assert "nested too deeply" in proc.stderr
