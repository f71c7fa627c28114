"""tosi-gc: the images a workdir holds (--list), and removing what no kept image uses,
the least recently used images first under --max-size; never what a running pull or a
live mount uses."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import BIN
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import dir_entry, file_entry, make_layer
from tosi_tools.cache import Workdir


def host_of(url):
    return url.split("://", 1)[1]


def pull(tool, reference, workdir):
    """tosi-resolve | tosi-fetch | tosi-unpack: blobs, config and overlay dirs cached."""
    plan = tool("tosi-resolve", "--workdir", workdir, reference, check=0).stdout
    plan = tool("tosi-fetch", "--progress", "never", input=plan, check=0).stdout
    return tool("tosi-unpack", input=plan, check=0).stdout


def listed(tool, workdir):
    """--list's JSON lines (stdout is no terminal here)."""
    out = tool("tosi-gc", "--workdir", workdir, "--list", check=0).stdout
    return [json.loads(line) for line in out.splitlines()]


def files_under(path):
    found = set()
    for directory, dirs, files in os.walk(path):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(directory, name), path))
    return found


def image_layers(tag):
    return [make_layer([file_entry(f"etc/{tag}", tag.encode() * 1000)]),
            make_layer([file_entry(f"opt/{tag}/bin/run", b"#!/bin/sh\n", mode=0o755)])]


@pytest.fixture
def two_images(tool, pusher, registry, repo_name, workdir):
    """Two images pulled and unpacked into `workdir`, "old" used before "new"."""
    refs = {}
    for tag in ("old", "new"):
        pusher.push_image(repo_name, tag, image_layers(tag))
        refs[tag] = f"{registry.host}/{repo_name}:{tag}"
        pull(tool, refs[tag], workdir)
        time.sleep(0.05)  # distinct last-use times
    return refs


def test_list_gives_each_image_its_reference_digest_platform_size_and_last_use_as_json_lines(
        tool, pusher, registry, repo_name, workdir):
    image = pusher.push_image(repo_name, "1", image_layers("one"), arch="arm64", variant="v8")
    pull(tool, f"{registry.host}/{repo_name}:1", workdir)
    [entry] = listed(tool, workdir)
    assert entry["reference"] == f"{registry.host}/{repo_name}:1"
    assert (entry["registry"], entry["repository"]) == (registry.host, repo_name)
    assert entry["digest"] == image.digest
    assert entry["platform"] == "linux/arm64/v8"
    assert entry["size"] > sum(len(layer.data) for layer in image.layers)
    assert abs(time.mktime(time.strptime(entry["lastUsed"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
               - time.time()) < 120


def test_list_puts_the_most_recently_used_image_first_and_a_resolve_counts_as_a_use(
        tool, two_images, workdir):
    assert [entry["reference"] for entry in listed(tool, workdir)] == [two_images["new"], two_images["old"]]
    time.sleep(1.1)  # lastUsed is in whole seconds
    tool("tosi-resolve", "--workdir", workdir, two_images["old"], check=0)
    assert [entry["reference"] for entry in listed(tool, workdir)] == [two_images["old"], two_images["new"]]


def test_list_on_a_terminal_is_a_table(tool, two_images, workdir):
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, os.path.join(BIN, "tosi-gc"), "--workdir", workdir, "--list"],
                              stdout=follower, stderr=subprocess.PIPE, timeout=60)
        os.close(follower)
        follower = None
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)
    assert proc.returncode == 0, proc.stderr
    lines = out.decode().splitlines()
    assert lines[0].split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "LAST", "USED"]
    assert lines[1].startswith(two_images["new"]) and lines[2].startswith(two_images["old"])


def test_gc_removes_nothing_that_a_cached_image_uses(tool, two_images, workdir):
    before = files_under(workdir)
    out = tool("tosi-gc", "--workdir", workdir, check=0).stdout
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("freed 0 bytes")]
    assert files_under(workdir) - {"overlays/.tosi-mount.lock"} == before  # the lock gc takes


def test_gc_removes_the_blobs_config_overlay_dirs_records_and_short_links_no_image_uses(
        tool, two_images, workdir):
    wd = Workdir(workdir)
    [old] = [entry for entry in listed(tool, workdir) if entry["reference"] == two_images["old"]]
    plan = [json.loads(line) for line in pull(tool, two_images["old"], workdir).splitlines()]
    os.unlink(os.path.join(wd.manifest_dir(old["registry"], old["repository"]), old["digest"]))
    tool("tosi-gc", "--workdir", workdir, check=0)
    config = plan[0]["config"]["digest"]
    assert not os.path.exists(wd.config_path(config)) and not os.path.exists(wd.saved_config_path(config))
    for layer in plan[1:]:
        for path in (wd.layer_path(layer["digest"]), wd.lock_path(layer["digest"]),
                     wd.overlay_path(layer["digest"]), wd.diffid_path(layer["digest"]),
                     wd.overlay_link_file(layer["digest"]), wd.overlay_lock_path(layer["digest"]),
                     os.path.join(wd.overlays, layer["link"])):
            assert not os.path.lexists(path), path
    assert [entry["reference"] for entry in listed(tool, workdir)] == [two_images["new"]]


def test_the_image_left_keeps_its_blobs_and_overlay_dirs_and_mounts(tool, two_images, workdir, tmp_path,
                                                                     mounts):
    tool("tosi-gc", "--workdir", workdir, "--max-size", "1", "--keep", two_images["new"], check=0)
    plan = tool("tosi-resolve", "--workdir", workdir, two_images["new"], check=0).stdout
    wd = Workdir(workdir)
    for layer in [json.loads(line) for line in plan.splitlines()][1:]:
        assert os.path.isfile(wd.layer_path(layer["digest"])) and os.path.isdir(wd.overlay_path(layer["digest"]))
    plan = tool("tosi-fetch", "--progress", "never", input=plan, check=0).stdout
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi-mount", target, input=tool("tosi-unpack", input=plan, check=0).stdout, check=0)
    with open(os.path.join(target, "etc", "new"), "rb") as f:
        assert f.read() == b"new" * 1000


def test_max_size_removes_the_least_recently_used_images_first(tool, two_images, workdir):
    from tosi_tools.gc import usage_of

    sizes = {entry["reference"]: entry["size"] for entry in listed(tool, workdir)}
    total = sum(usage_of(workdir).values())
    out = tool("tosi-gc", "--workdir", workdir, "--max-size", str(total - sizes[two_images["old"]] // 2),
               check=0).stdout
    assert f"removed image {two_images['old']}" in out
    assert [entry["reference"] for entry in listed(tool, workdir)] == [two_images["new"]]


def test_keep_keeps_an_image_whatever_max_size_says(tool, two_images, workdir):
    tool("tosi-gc", "--workdir", workdir, "--max-size", "0", "--keep", two_images["old"], check=0)
    assert [entry["reference"] for entry in listed(tool, workdir)] == [two_images["old"]]


def test_keep_naming_no_cached_image_is_a_usage_error_and_removes_nothing(tool, two_images, workdir):
    before = files_under(workdir)
    proc = tool("tosi-gc", "--workdir", workdir, "--max-size", "0", "--keep", "example.com/not/cached:1", check=2)
    assert proc.stderr.startswith("tosi-gc: error: --keep 'example.com/not/cached:1': no cached image")
    assert files_under(workdir) == before


def test_dry_run_says_what_would_go_and_the_bytes_freed_and_removes_nothing(tool, two_images, workdir):
    before = files_under(workdir)
    out = tool("tosi-gc", "--workdir", workdir, "--dry-run", "--max-size", "0", check=0).stdout.splitlines()
    assert files_under(workdir) == before
    assert {f"would remove image {ref}" for ref in two_images.values()} <= {line.split(" (")[0] for line in out}
    assert any(line.startswith("would remove blob ") for line in out)
    assert any(line.startswith("would remove overlay dir ") for line in out)
    freed = int(out[-1].split()[2])
    real = tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0).stdout.splitlines()
    assert int(real[-1].split()[1]) == freed > 0


def test_stale_locks_dead_extractions_and_old_temporaries_go(tool, two_images, workdir):
    wd = Workdir(workdir)
    gone = "ab" * 32
    stale = [wd.lock_path(f"sha256:{gone}"), wd.overlay_lock_path(f"sha256:{gone}"),
             os.path.join(wd.configs, f".tmp-sha256:{gone}-0123abcd")]
    for path in stale:
        open(path, "w").close()
    old = time.time() - 7200
    os.utime(stale[-1], (old, old))
    dead = wd.overlay_temp_path(f"sha256:{gone}")
    os.makedirs(os.path.join(dead, "usr", "bin"))
    recent = os.path.join(wd.configs, f".tmp-sha256:{gone}-4567cdef")  # a live atomic_write's, maybe
    open(recent, "w").close()
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert [path for path in stale + [dead] if os.path.lexists(path)] == []
    assert os.path.exists(recent)


def test_a_registry_nothing_is_cached_from_goes_with_its_scheme_file(tool, two_images, workdir):
    wd = Workdir(workdir)
    os.makedirs(os.path.dirname(wd.scheme_path("unreachable.example:5000")))
    open(wd.scheme_path("unreachable.example:5000"), "w").close()
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert not os.path.lexists(os.path.join(wd.manifests, "unreachable.example:5000"))
    assert len(listed(tool, workdir)) == 2


def test_a_live_mount_keeps_its_image_and_lowerdirs_and_still_reads_after_gc(
        tool, pusher, registry, repo_name, workdir, tmp_path, mounts):
    # "a/b" without an entry for "a": an implicit directory, so the mount has an attributes lowerdir.
    pusher.push_image(repo_name, "1", [make_layer([dir_entry("a", mode=0o700)]),
                                       make_layer([file_entry("a/b", b"b\n")])])
    reference = f"{registry.host}/{repo_name}:1"
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-workdir", workdir, "-image", reference, "-mount", target, "-read-only", check=0)
    attributes = [name for name in os.listdir(Workdir(workdir).overlays) if name.startswith(".tosi-attrs-")]
    assert attributes
    tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0)
    with open(os.path.join(target, "a", "b"), "rb") as f:
        assert f.read() == b"b\n"
    assert oct(os.stat(os.path.join(target, "a")).st_mode & 0o777) == "0o700"
    assert [entry["reference"] for entry in listed(tool, workdir)] == [reference]
    assert all(os.path.isdir(os.path.join(Workdir(workdir).overlays, name)) for name in attributes)
    tool("tosi-mount", "--unmount", target, check=0)
    tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0)
    assert listed(tool, workdir) == []
    assert [name for name in os.listdir(Workdir(workdir).overlays) if not name.endswith(".lock")] == []


def test_gc_waits_for_a_mount_that_is_choosing_its_lowerdirs(tool, two_images, workdir):
    from tosi_tools.cache import shared_lock

    with shared_lock(Workdir(workdir).mount_lock_path()):  # what mount_image holds until mount(2)
        gc = subprocess.Popen([sys.executable, os.path.join(BIN, "tosi-gc"), "--workdir", workdir,
                               "--max-size", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                gc.wait(timeout=2)
            assert len(listed(tool, workdir)) == 2
        except BaseException:
            gc.kill()
            gc.communicate()
            raise
    _, err = gc.communicate(timeout=60)
    assert gc.returncode == 0, err
    assert listed(tool, workdir) == []


def test_a_running_pull_keeps_its_image_and_succeeds(tool, pusher, registry, repo_name, workdir, tmp_path):
    noise = os.urandom(100_000)  # incompressible: the throttled blob takes seconds
    image = pusher.push_image(repo_name, "1", [make_layer([file_entry("etc/slow", noise)])])
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("throttle", path=image.layers[0].digest, rate=25_000))
        reference = f"{host_of(proxy.url)}/{repo_name}:1"
        target = str(tmp_path / "flat")
        pull_proc = subprocess.Popen(
            [sys.executable, os.path.join(BIN, "tosi"), "-workdir", workdir, "-image", reference,
             "-extractto", target], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wd = Workdir(workdir)
            deadline = time.monotonic() + 30
            while not (os.path.isdir(wd.layers)
                       and any(name.endswith(".partial") for name in os.listdir(wd.layers))):
                assert time.monotonic() < deadline and pull_proc.poll() is None
                time.sleep(0.05)
            out = tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0).stdout
            assert pull_proc.poll() is None  # gc ran while the pull did
            assert "removed image" not in out and "removed blob" not in out
        finally:
            _, err = pull_proc.communicate(timeout=60)
    assert pull_proc.returncode == 0, err
    with open(os.path.join(target, "etc", "slow"), "rb") as f:
        assert f.read() == noise
    assert [entry["reference"] for entry in listed(tool, workdir)] == [reference]


def test_a_workdir_others_can_write_is_refused(tool, two_images, workdir):
    before = files_under(workdir)
    os.chmod(workdir, 0o777)
    proc = tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=2)
    assert proc.stderr.startswith("tosi-gc: error: ") and workdir in proc.stderr
    assert files_under(workdir) == before


def test_a_missing_workdir_is_said(tool, tmp_path):
    proc = tool("tosi-gc", "--workdir", tmp_path / "none", check=1)
    assert proc.stderr.startswith("tosi-gc: error: workdir ") and "does not exist" in proc.stderr


@pytest.mark.parametrize("args", [["--max-size", "lots"], ["--max-size", "10%"], ["--list", "--dry-run"],
                                  ["--list", "--keep", "alpine"]])
def test_bad_flags_are_usage_errors(tool, tmp_path, args):
    proc = tool("tosi-gc", "--workdir", tmp_path, *args, check=2)
    assert proc.stderr.startswith("tosi-gc: error: ") and len(proc.stderr.splitlines()) == 1


def test_a_symlink_in_the_overlay_dir_is_removed_not_followed(tool, two_images, workdir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    os.symlink(str(outside), os.path.join(Workdir(workdir).overlays, "cd" * 32))
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert (outside / "precious").read_text() == "x"
    assert not os.path.lexists(os.path.join(Workdir(workdir).overlays, "cd" * 32))


def symlink_stack():
    """lib -> usr/lib below, lib/x.so above: a mount of it makes a chain copy, and an
    attributes lowerdir for the implicit directories."""
    from tests.support.images import symlink_entry

    return [make_layer([dir_entry("usr/lib"), file_entry("usr/lib/base", b"b"), symlink_entry("lib", "usr/lib")]),
            make_layer([file_entry("lib/x.so", b"x"), file_entry("lib/sub/y", b"y")])]


def overlay_extras(workdir):
    overlays = Workdir(workdir).overlays
    return sorted((name, os.lstat(os.path.join(overlays, name)).st_ino) for name in os.listdir(overlays)
                  if name.startswith((".tosi-chain-", ".tosi-attrs-")))


def test_the_chain_copies_and_attributes_lowerdir_of_a_kept_image_stay_and_go_with_it(
        tool, pusher, registry, repo_name, workdir, tmp_path, mounts):
    pusher.push_image(repo_name, "1", symlink_stack())
    reference = f"{registry.host}/{repo_name}:1"
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-workdir", workdir, "-image", reference, "-mount", target, check=0)
    tool("tosi-mount", "--unmount", "--clean", target, check=0)
    made = overlay_extras(workdir)
    assert any(name.startswith(".tosi-chain-") for name, _ in made)
    assert any(name.startswith(".tosi-attrs-") for name, _ in made)
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert overlay_extras(workdir) == made
    tool("tosi", "-workdir", workdir, "-image", reference, "-mount", target, check=0)
    assert (tmp_path / "mnt" / "usr" / "lib" / "x.so").read_bytes() == b"x"
    tool("tosi-mount", "--unmount", "--clean", target, check=0)
    assert overlay_extras(workdir) == made  # reused, not made again
    tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0)
    assert overlay_extras(workdir) == []


def test_chain_copies_attributes_lowerdirs_and_dead_mounts_temporaries_no_image_uses_go(
        tool, pusher, registry, repo_name, workdir, tmp_path, mounts):
    pusher.push_image(repo_name, "1", symlink_stack())
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-workdir", workdir, "-image", f"{registry.host}/{repo_name}:1", "-mount", target, check=0)
    tool("tosi-mount", "--unmount", "--clean", target, check=0)
    used = overlay_extras(workdir)
    overlays = Workdir(workdir).overlays
    unused = [".tosi-chain-" + "ee" * 32, ".tosi-attrs-" + "0" * 32, ".tosi-attrs-" + "1" * 32 + ".0123abcd"]
    for name in unused:
        os.makedirs(os.path.join(overlays, name, "usr", "lib"))
    open(os.path.join(overlays, unused[0] + ".implicit"), "w").close()
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert overlay_extras(workdir) == used


MOUNTINFO = (
    "55 27 0:43 / /mnt/a rw,relatime - overlay overlay ro,lowerdir=abc:l\\134:2:/w/overlays/ff,redirect_dir=on\n"
    "56 27 0:44 / /mnt/b ro,relatime - overlay overlay ro,lowerdir+=l1,lowerdir+=/w/o\\054x,datadir+=d\n"
    "57 27 0:45 / /mnt/c rw,relatime shared:1 - ext4 /dev/sda1 rw,lowerdir=nope\n"
)


def test_the_lowerdirs_of_live_mounts_are_read_from_both_mount_apis_options(tmp_path):
    from tosi_tools.overlayfs import mounted_lowerdirs

    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    assert mounted_lowerdirs(str(path)) == [["abc", "l:2", "/w/overlays/ff"], ["l1", "/w/o,x", "d"]]


def test_the_bytes_freed_count_a_chain_copys_hardlinked_files_once(tool, pusher, registry, repo_name, workdir,
                                                                  tmp_path, mounts):
    from tosi_tools.gc import usage_of

    pusher.push_image(repo_name, "1", [make_layer([file_entry("usr/lib/big", os.urandom(300_000))]),
                                       *symlink_stack()])
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-workdir", workdir, "-image", f"{registry.host}/{repo_name}:1", "-mount", target, check=0)
    tool("tosi-mount", "--unmount", "--clean", target, check=0)
    before = sum(usage_of(workdir).values())
    out = tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0).stdout.splitlines()
    assert any(" chain copy " in line for line in out)
    assert int(out[-1].split()[1]) == before - sum(usage_of(workdir).values())


def test_gc_during_a_pull_and_a_live_mount_leaves_a_cache_both_images_verify_from(
        tool, pusher, registry, repo_name, workdir, tmp_path, mounts):
    pusher.push_image(repo_name, "mounted", image_layers("mounted"))
    noise = os.urandom(100_000)
    pulled = pusher.push_image(repo_name, "pulled", [make_layer([file_entry("etc/pulled", noise)])])
    target = str(tmp_path / "mnt")
    mounts.append(target)
    mounted_ref = f"{registry.host}/{repo_name}:mounted"
    tool("tosi", "-workdir", workdir, "-image", mounted_ref, "-mount", target, check=0)
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("delay", path=pulled.layers[0].digest, seconds=1))
        proxy.add(Rule("throttle", path=pulled.layers[0].digest, rate=25_000))
        pulled_ref = f"{host_of(proxy.url)}/{repo_name}:pulled"
        pull_proc = subprocess.Popen(
            [sys.executable, os.path.join(BIN, "tosi"), "-workdir", workdir, "-image", pulled_ref,
             "-mount", str(tmp_path / "mnt2")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        mounts.append(str(tmp_path / "mnt2"))
        try:
            deadline = time.monotonic() + 30
            while proxy.count("GET", pulled.layers[0].digest) == 0:
                assert time.monotonic() < deadline and pull_proc.poll() is None
                time.sleep(0.05)
            tool("tosi-gc", "--workdir", workdir, "--max-size", "0", check=0)
            assert pull_proc.poll() is None  # gc ran while the pull did
        finally:
            _, err = pull_proc.communicate(timeout=60)
        assert pull_proc.returncode == 0, err
        assert (tmp_path / "mnt2" / "etc" / "pulled").read_bytes() == noise
        assert (tmp_path / "mnt" / "etc" / "mounted").read_bytes() == b"mounted" * 1000
        assert {entry["reference"] for entry in listed(tool, workdir)} == {mounted_ref, pulled_ref}
        for reference in (mounted_ref, pulled_ref):
            plan = tool("tosi-resolve", "--workdir", workdir, reference, check=0).stdout
            tool("tosi-verify", input=plan, check=0)


def test_the_empty_lowerdir_stays_while_a_mount_uses_it_and_goes_after(tool, pusher, registry, repo_name, workdir,
                                                                      tmp_path, mounts):
    pusher.push_image(repo_name, "1", [make_layer([file_entry("one", b"1")])])
    target = str(tmp_path / "mnt")
    mounts.append(target)
    tool("tosi", "-workdir", workdir, "-image", f"{registry.host}/{repo_name}:1", "-mount", target, "-read-only",
         check=0)
    empty = Workdir(workdir).empty_lower_path()
    assert os.path.isdir(empty)
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert os.path.isdir(empty) and (tmp_path / "mnt" / "one").read_bytes() == b"1"
    tool("tosi-mount", "--unmount", target, check=0)
    tool("tosi-gc", "--workdir", workdir, check=0)
    assert not os.path.lexists(empty)
