"""Small things a new user saw (issue 15): lock files do not pile up, a failed lookup
leaves no remembered scheme, tosi-verify names a corrupt blob's digest once, -v
counts in words that agree with the count, and a corrupt cached blob's message
names the fix."""

import os
import socket
import threading

from tests.support.images import Layer, file_entry, make_layer
from tests.support.plans import plan_text
from tosi_tools import cache
from tosi_tools.cache import Workdir


def lock_files(workdir):
    return [os.path.join(d, name) for d, _, names in os.walk(workdir) for name in names if name.endswith(".lock")]


# ---------------------------------------------------------------- locks

def test_a_pull_leaves_no_lock_file_in_the_workdir(tool, registry, pusher, repo_name, workdir, tmp_path):
    pusher.push_image(repo_name, "1", [make_layer([file_entry("a", b"a")]), make_layer([file_entry("b", b"b")])])
    tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-workdir", workdir,
         "-extractto", tmp_path / "root", check=0)
    assert os.listdir(Workdir(workdir).layers) and lock_files(workdir) == []


def test_a_lock_file_is_removed_by_its_last_holder(tmp_path):
    path = str(tmp_path / "blob.lock")
    with cache.file_lock(path):
        assert os.path.exists(path)
    assert not os.path.exists(path)


def test_lockers_racing_with_the_removal_of_the_lock_file_still_exclude_each_other(tmp_path):
    path = str(tmp_path / "blob.lock")
    counter = tmp_path / "counter"
    counter.write_text("0")
    inside = []

    def bump():
        for _ in range(150):
            with cache.file_lock(path):
                inside.append(1)
                assert len(inside) == 1  # nobody else holds it
                counter.write_text(str(int(counter.read_text()) + 1))
                inside.pop()

    threads = [threading.Thread(target=bump) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert counter.read_text() == str(6 * 150)
    assert not os.path.exists(path)


def test_a_lock_file_a_killed_holder_left_is_taken_and_removed(tmp_path):
    path = tmp_path / "blob.lock"
    path.write_text("")
    with cache.file_lock(str(path)):
        pass
    assert not path.exists()


# ---------------------------------------------------------------- the remembered scheme

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_lookup_of_a_registry_that_is_not_there_remembers_no_scheme(tool, workdir):
    host = f"127.0.0.1:{free_port()}"
    tool("tosi-resolve", "--workdir", workdir, f"{host}/test/x:1", check=1)
    assert not os.path.exists(Workdir(workdir).scheme_path(host))
    assert not os.path.exists(os.path.join(Workdir(workdir).manifests, host))


# ---------------------------------------------------------------- tosi-verify

def test_tosi_verify_names_a_corrupt_blobs_digest_once(tool, registry, pusher, repo_name, workdir):
    layer = make_layer([file_entry("a", os.urandom(1000))])
    image = pusher.push_image(repo_name, "1", [layer])
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan_text(registry.url, image, workdir), check=0).stdout
    with open(Workdir(workdir).layer_path(layer.digest), "r+b") as f:
        f.write(b"\0\0\0\0")
    proc = tool("tosi-verify", "--workdir", workdir, input=plan, check=1)
    line = proc.stderr.strip()
    assert line.startswith(f"tosi-verify: error: layer 0 ({layer.digest}): content hashes to sha256:")
    assert line.count(layer.digest) == 1


# ---------------------------------------------------------------- -v

def test_verbose_logs_count_in_words_that_agree_and_the_layer_count_once(tool, registry, pusher, repo_name,
                                                                        workdir, tmp_path):
    pusher.push_image(repo_name, "1", [make_layer([file_entry("one", b"1")]),
                                       make_layer([file_entry("two", b"2")])])
    proc = tool("tosi", "-v", "1", "-image", f"{registry.host}/{repo_name}:1", "-workdir", workdir,
                "-extractto", tmp_path / "root", check=0)
    assert "applied 1 entry, 1 byte of data" in proc.stderr
    assert "1 entries" not in proc.stderr
    assert proc.stderr.count("2 layers") == 1


# ---------------------------------------------------------------- corrupt cached blobs

def gzip_layer():
    return make_layer([file_entry("first", os.urandom(200_000)), file_entry("second", os.urandom(300_000))])


def test_tosi_unpack_names_the_fix_for_a_corrupt_cached_blob(tool, registry, pusher, repo_name, workdir):
    layer = gzip_layer()
    image = pusher.push_image(repo_name, "1", [layer])
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan_text(registry.url, image, workdir), check=0).stdout
    path = Workdir(workdir).layer_path(layer.digest)
    with open(path, "r+b") as f:
        f.seek(len(layer.data) // 2)
        f.write(b"\xff" * 64)
    proc = tool("tosi-unpack", "--workdir", workdir, input=plan, check=1)
    assert proc.stderr.count("\n") == 1
    assert "to be fetched again (run tosi-fetch on the plan again; tosi-verify checks its other cached blobs)" \
        in proc.stderr


def test_a_bad_cached_layer_whose_blob_matches_its_digest_says_the_registry_serves_it(
        tool, registry, pusher, repo_name, workdir):
    good = gzip_layer()
    bad = Layer(data=good.data[:len(good.data) // 2], media_type=good.media_type, diff_id=good.diff_id)
    image = pusher.push_image(repo_name, "1", [bad])
    plan = tool("tosi-fetch", "--workdir", workdir, input=plan_text(registry.url, image, workdir), check=0).stdout
    proc = tool("tosi-unpack", "--workdir", workdir, input=plan, check=1)
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("tosi-unpack: error: the registry serves a bad layer (its cached blob "
                                  "matches its digest): layer 0 (")
