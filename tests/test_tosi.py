"""The umbrella `tosi` end to end against the real registry: the original README's
examples, -url, flag forms, the checks made before any request, and the proof that
it makes the same trees as the pipeline of the stage commands."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from tests.conftest import BIN
from tests.support.images import (dir_entry, file_entry, hardlink_entry, make_layer, opaque_entry,
                                  sha256, special_entry, symlink_entry, whiteout_entry)
from tests.support.staging import snapshot
from tosi_tools import overlayfs
from tosi_tools.cache import Workdir


def rich_layers():
    """Three layers exercising what a flat tree and an overlay view must agree on."""
    base = make_layer([
        dir_entry("etc"), file_entry("etc/os-release", b"ID=test\n"),
        file_entry("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
        dir_entry("bin"), file_entry("bin/sh", b"#!shell\n" * 100, mode=0o755),
        hardlink_entry("bin/ash", "bin/sh"), symlink_entry("bin/bash", "/bin/sh"),
        dir_entry("var/cache/apt"), file_entry("var/cache/apt/pkgcache.bin", b"cache"),
        dir_entry("tmp", mode=0o1777), file_entry("usr/bin/passwd", b"suid", mode=0o4755),
        special_entry("dev/null", tarfile.CHRTYPE, 1, 3, mode=0o666),
        file_entry("opt/old/a", b"a"), file_entry("opt/old/b", b"b"),
        special_entry("run/initctl", tarfile.FIFOTYPE, mode=0o600), dir_entry("mnt/empty"),
        file_entry("usr/lib/" + "long-name-" * 20, b"long"),
        file_entry("usr/bin/ping", b"ping", mode=0o755,
                   pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"
                        "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
                        "SCHILY.xattr.user.origin": "test"}),
    ])
    middle = make_layer([
        whiteout_entry("var/cache/apt"), file_entry("etc/os-release", b"ID=test\nVERSION=2\n"),
        opaque_entry("opt/old"), file_entry("opt/old/c", b"c"), dir_entry("home/user", uid=1000, gid=1000),
        file_entry("home/user/.profile", b"export A=1\n", uid=1000, gid=1000),
    ], compression="zstd")
    top = make_layer([file_entry("app/run", b"run\n", mode=0o755), whiteout_entry("bin/bash"),
                      file_entry("bin/bash", b"not a link any more\n")], compression=None)
    return [base, middle, top]


@pytest.fixture
def image(pusher, registry, repo_name):
    pushed = pusher.push_image(repo_name, "1", rich_layers(), config={"Env": ["A=1"], "Cmd": ["/app/run"]})
    return pushed, f"{registry.host}/{repo_name}:1"


class ConnectionCounter:
    """A TCP listener on 127.0.0.1 that counts the connections made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.count = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def host(self):
        return "127.0.0.1:%d" % self.sock.getsockname()[1]

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def counter():
    listener = ConnectionCounter()
    yield listener
    listener.close()


def shell_pipeline(*commands, timeout=120):
    """Run bin/ commands joined by pipes under bash -o pipefail."""
    line = " | ".join(" ".join([shlex.quote(sys.executable), shlex.quote(os.path.join(BIN, cmd[0]))]
                               + [shlex.quote(str(a)) for a in cmd[1:]]) for cmd in commands)
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc


def without_root(tree):
    # The top directory is the target itself (made by tosi, or the overlay's upperdir).
    return {path: info for path, info in tree.items() if path != "."}


# ---------------------------------------------------------------- the README's examples

def test_extractto_example_makes_the_flattened_rootfs(tool, image, tmp_path, workdir):
    _, ref = image
    target = tmp_path / "nginx-rootfs"
    proc = tool("tosi", "-image", ref, "-extractto", target, "-workdir", workdir, check=0)
    assert proc.stdout == ""
    assert (target / "etc/os-release").read_text() == "ID=test\nVERSION=2\n"
    assert not (target / "var/cache/apt").exists()
    assert sorted(os.listdir(target / "opt/old")) == ["c"]
    assert (target / "bin/bash").read_text() == "not a link any more\n"
    assert os.stat(target / "bin/sh").st_ino == os.stat(target / "bin/ash").st_ino
    assert not os.path.exists(Workdir(workdir).overlays) or not os.listdir(Workdir(workdir).overlays)


def test_mount_example_mounts_and_umount_undoes_it(tool, image, tmp_path, workdir, mounts):
    _, ref = image
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    proc = tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir, check=0)
    assert proc.stdout == ""
    assert overlayfs.mount_at(target)[0] == "overlay"
    assert open(os.path.join(target, "app/run")).read() == "run\n"
    subprocess.run(["umount", target], check=True)
    assert not overlayfs.mount_at(target)


def test_saveconfig_example_writes_the_config_object_and_unpacks(tool, image, tmp_path, workdir):
    pushed, ref = image
    saved = tmp_path / "tomcat.config"
    tool("tosi", "-image", ref, "-saveconfig", saved, "-workdir", workdir, check=0)
    config = json.loads(pushed.config)
    assert json.loads(saved.read_text()) == config["config"] == {"Env": ["A=1"], "Cmd": ["/app/run"]}
    cached = Workdir(workdir).saved_config_path(sha256(pushed.config))
    assert saved.read_bytes() == open(cached, "rb").read()
    for layer in pushed.layers:
        assert os.path.isdir(Workdir(workdir).overlay_path(layer.digest))


def test_saveconfig_onto_a_full_filesystem_names_the_file_and_keeps_the_old_one(tool, image, tmp_path,
                                                                                 workdir):
    _, ref = image
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "tmpfs", full], check=True)
    try:
        saved = full / "config.json"
        saved.write_text("old")
        with open(full / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
            while True:
                f.write(b"x" * 1024)
        proc = tool("tosi", "-image", ref, "-saveconfig", saved, "-workdir", workdir)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == f"tosi: error: -saveconfig {saved}: cannot write it: No space left on device\n"
        assert saved.read_text() == "old" and sorted(os.listdir(full)) == ["config.json", "filler"]
    finally:
        subprocess.run(["umount", full], check=True)


def test_saveconfig_replaces_an_existing_file_atomically(tool, image, tmp_path, workdir):
    _, ref = image
    saved = tmp_path / "config.json"
    saved.write_text("old")
    os.link(saved, tmp_path / "old-name")
    tool("tosi", "-image", ref, "-saveconfig", saved, "-workdir", workdir, check=0)
    assert json.loads(saved.read_text())["Cmd"] == ["/app/run"]
    assert (tmp_path / "old-name").read_text() == "old"  # a new file was renamed over it


@pytest.mark.parametrize("parallel", ["8", "0", "1"])
def test_parallel_downloads_example_pulls_every_layer(tool, image, workdir, parallel):
    pushed, ref = image
    tool("tosi", "-image", ref, "-parallel-downloads", parallel, "-workdir", workdir, check=0)
    for layer in pushed.layers:
        with open(Workdir(workdir).layer_path(layer.digest), "rb") as f:
            assert f.read() == layer.data


def test_workdir_example_keeps_the_original_cache_layout(tool, image, tmp_path):
    pushed, ref = image
    workdir = tmp_path / "image-cache"
    proc = tool("tosi", "-workdir", workdir, "-image", ref, check=0)
    assert proc.stdout == ""
    cache = Workdir(str(workdir))
    for layer in pushed.layers:
        assert os.path.isfile(cache.layer_path(layer.digest))
        link = open(cache.overlay_link_file(layer.digest)).read().strip()
        assert os.readlink(os.path.join(cache.overlays, link)) == layer.digest[7:]
    assert os.listdir(cache.configs)


def test_overlaydir_puts_the_extracted_layers_there(tool, image, tmp_path, workdir):
    pushed, ref = image
    overlays = tmp_path / "layers-here"
    tool("tosi", "-image", ref, "-overlaydir", overlays, "-workdir", workdir, check=0)
    for layer in pushed.layers:
        assert (overlays / layer.digest[7:]).is_dir()


# ---------------------------------------------------------------- -url and flag forms

@pytest.mark.parametrize("scheme", ["", "http://"])
def test_deprecated_url_names_the_registry_and_image_the_repository(tool, image, registry,
                                                                    repo_name, tmp_path, workdir,
                                                                    scheme):
    target = tmp_path / "rootfs"
    tool("tosi", "-url", scheme + registry.host, "-image", f"{repo_name}:1", "-extractto", target,
         "-workdir", workdir, check=0)
    assert (target / "app/run").read_text() == "run\n"


@pytest.mark.parametrize("style", ["-{}", "--{}", "-{}=", "--{}="])
def test_every_flag_form_works_end_to_end(tool, image, tmp_path, workdir, style):
    _, ref = image
    target = tmp_path / "rootfs"
    args = []
    for name, value in (("image", ref), ("extractto", target), ("workdir", workdir),
                        ("parallel-downloads", "2")):
        args += [style.format(name) + str(value)] if style.endswith("=") else [style.format(name), value]
    tool("tosi", *args, style.format("validate-cache").rstrip("="), check=0)
    assert (target / "app/run").read_text() == "run\n"


def test_stdout_stays_empty_and_logs_go_to_stderr(tool, image, tmp_path, workdir):
    _, ref = image
    proc = tool("tosi", "-image", ref, "-extractto", tmp_path / "r", "-workdir", workdir,
                "-v", "2", "-logtostderr", check=0)
    assert proc.stdout == ""
    assert "tosi:" in proc.stderr


def test_platform_picks_the_entry_of_a_multi_platform_image(tool, pusher, registry, repo_name,
                                                             tmp_path, workdir):
    amd = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"amd64\n")])], oci=True)
    arm = pusher.push_image(repo_name, None, [make_layer([file_entry("arch", b"arm64\n")])], oci=True,
                            arch="arm64", variant="v8")
    pusher.push_index(repo_name, "multi", [amd, arm])
    target = tmp_path / "rootfs"
    tool("tosi", "-image", f"{registry.host}/{repo_name}:multi", "-platform", "linux/arm64/v8",
         "-extractto", target, "-workdir", workdir, check=0)
    assert (target / "arch").read_text() == "arm64\n"


# ---------------------------------------------------------------- refused before any request

def test_non_empty_extractto_target_is_refused_before_any_request(tool, counter, tmp_path, workdir):
    target = tmp_path / "rootfs"
    target.mkdir()
    (target / "keep").write_text("mine")
    proc = tool("tosi", "-image", f"{counter.host}/test/app:1", "-extractto", target,
                "-workdir", workdir, check=2)
    assert proc.stderr.strip() == f"tosi: error: -extractto {target}: directory is not empty"
    assert counter.count == 0
    assert os.listdir(target) == ["keep"]
    assert not os.path.exists(workdir)


def test_extractto_and_mount_together_are_refused_before_any_request(tool, counter, tmp_path):
    proc = tool("tosi", "-image", f"{counter.host}/test/app:1", "-extractto", tmp_path / "a",
                "-mount", tmp_path / "b", check=2)
    assert "-extractto and -mount are mutually exclusive" in proc.stderr
    assert counter.count == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mount_on_a_mount_point_is_refused_before_any_request(tool, counter, tmp_path, mounts):
    target = tmp_path / "busy"
    target.mkdir()
    mounts.append(str(target))
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    proc = tool("tosi", "-image", f"{counter.host}/test/app:1", "-mount", target, check=2)
    assert "is already a mount point" in proc.stderr
    assert counter.count == 0


@pytest.mark.parametrize("name", ["dir", "dir/", "file/config.json"])
def test_saveconfig_naming_a_directory_is_refused_before_any_request(tool, counter, tmp_path, workdir, name):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("a file")
    target = tmp_path / "rootfs"
    proc = tool("tosi", "-image", f"{counter.host}/test/app:1", "-saveconfig", f"{tmp_path}/{name}",
                "-extractto", target, "-workdir", workdir, check=2)
    assert proc.stderr.startswith(f"tosi: error: -saveconfig {tmp_path}/{name}: ")
    assert len(proc.stderr.splitlines()) == 1 and "directory" in proc.stderr
    assert counter.count == 0
    assert not target.exists() and not os.path.exists(workdir)


def test_unknown_repository_is_one_line_and_leaves_no_target(tool, registry, tmp_path, workdir):
    target = tmp_path / "rootfs"
    proc = tool("tosi", "-image", f"{registry.host}/test/no-such-repo:1", "-extractto", target,
                "-workdir", workdir, check=1)
    assert proc.stderr.startswith("tosi: error: ") and len(proc.stderr.splitlines()) == 1
    assert not target.exists()


# ---------------------------------------------------------------- mounts

def test_mounted_view_equals_the_flat_extraction(tool, image, tmp_path, workdir, mounts):
    _, ref = image
    flat, target = tmp_path / "flat", str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", ref, "-extractto", flat, "-workdir", workdir, check=0)
    tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir, check=0)
    assert without_root(snapshot(target)) == without_root(snapshot(str(flat)))


def test_write_through_the_mount_lands_in_the_upperdir(tool, image, tmp_path, workdir, mounts):
    _, ref = image
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir, check=0)
    with open(os.path.join(target, "etc/os-release"), "w") as f:
        f.write("changed\n")
    assert open(os.path.join(target + ".upper", "etc/os-release")).read() == "changed\n"
    flat = tmp_path / "flat"
    tool("tosi", "-image", ref, "-extractto", flat, "-workdir", workdir, check=0)
    assert (flat / "etc/os-release").read_text() == "ID=test\nVERSION=2\n"


def test_read_only_mount_refuses_writes(tool, image, tmp_path, workdir, mounts):
    _, ref = image
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", ref, "-mount", target, "-read-only", "-workdir", workdir, check=0)
    with pytest.raises(OSError) as caught:
        open(os.path.join(target, "app/new"), "w")
    assert caught.value.errno == 30  # EROFS
    assert not os.path.exists(target + ".upper")


def test_relative_mount_path_with_trailing_slash(image, tmp_path, workdir, mounts):
    _, ref = image
    mounts.append(str(tmp_path / "rootfs"))
    proc = subprocess.run([sys.executable, os.path.join(BIN, "tosi"), "-image", ref,
                           "-mount", "rootfs/", "-workdir", workdir],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert overlayfs.mount_at(str(tmp_path / "rootfs"))
    assert (tmp_path / "rootfs.upper").is_dir() and (tmp_path / "rootfs.work").is_dir()


def test_mount_again_after_unmount(tool, image, tmp_path, workdir, mounts):
    _, ref = image
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir, check=0)
    tool("tosi-mount", "--unmount", "--clean", target, check=0)
    tool("tosi", "-image", ref, "-mount", target, "-workdir", workdir, check=0)
    assert open(os.path.join(target, "app/run")).read() == "run\n"


def test_image_of_120_layers_is_mounted(tool, pusher, registry, repo_name, tmp_path, workdir, mounts):
    layers = [make_layer([file_entry(f"layer/{i:03d}", f"{i}\n".encode()),
                          file_entry("top", f"{i}\n".encode())]) for i in range(120)]
    pusher.push_image(repo_name, "many", layers)
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", f"{registry.host}/{repo_name}:many", "-mount", target,
         "-parallel-downloads", "0", "-workdir", workdir, timeout=300, check=0)
    assert len(os.listdir(os.path.join(target, "layer"))) == 120
    assert open(os.path.join(target, "top")).read() == "119\n"


# ---------------------------------------------------------------- same as the pipeline

def test_pipeline_and_tosi_extractto_make_identical_trees(tool, image, tmp_path):
    _, ref = image
    piped, direct = tmp_path / "piped", tmp_path / "direct"
    shell_pipeline(("tosi-resolve", "--workdir", tmp_path / "w1", ref), ("tosi-fetch",),
                   ("tosi-verify",), ("tosi-unpack", "--into", piped))
    tool("tosi", "-image", ref, "-extractto", direct, "-workdir", tmp_path / "w2", check=0)
    tree = snapshot(str(piped))
    assert tree["app/run"]["mode"] == 0o755 and "var/cache/apt" not in tree
    assert tree == snapshot(str(direct))


def test_pipeline_and_tosi_mount_make_identical_views(tool, image, tmp_path, mounts):
    _, ref = image
    piped, direct = str(tmp_path / "piped"), str(tmp_path / "direct")
    mounts += [piped, direct]
    proc = shell_pipeline(("tosi-resolve", "--workdir", tmp_path / "w1", ref), ("tosi-fetch",),
                          ("tosi-verify",), ("tosi-unpack",), ("tosi-mount", piped))
    assert json.loads(proc.stdout.splitlines()[0])["mount"]["target"] == piped
    tool("tosi", "-image", ref, "-mount", direct, "-workdir", tmp_path / "w2", check=0)
    tree = snapshot(piped)
    assert tree["dev/null"]["rdev"] == (1, 3) and "opt/old/a" not in tree
    assert tree["usr/bin/ping"]["xattrs"]["user.origin"] == b"test"
    assert "security.capability" in tree["usr/bin/ping"]["xattrs"]
    assert tree == snapshot(direct)


# ---------------------------------------------------------------- login and the cache

@pytest.fixture
def private_image(htpasswd_pusher, htpasswd_registry, repo_name):
    htpasswd_pusher.push_image(repo_name, "1", [make_layer([file_entry("secret", b"s\n")])])
    user, password = next(iter(htpasswd_registry.users.items()))
    return f"{htpasswd_registry.host}/{repo_name}:1", user, password


def test_username_and_password_log_in(tool, private_image, tmp_path, workdir):
    ref, user, password = private_image
    tool("tosi", "-image", ref, "-username", user, "-password", password,
         "-extractto", tmp_path / "r", "-workdir", workdir, check=0)
    assert (tmp_path / "r/secret").read_text() == "s\n"


def test_password_stdin_reads_the_first_line(tool, private_image, tmp_path, workdir):
    ref, user, password = private_image
    tool("tosi", "-image", ref, "-username", user, "-password-stdin", "-extractto", tmp_path / "r",
         "-workdir", workdir, input=password + "\n", check=0)
    assert (tmp_path / "r/secret").read_text() == "s\n"
    for dirpath, _dirs, files in os.walk(workdir):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert password.encode() not in f.read(), name


def test_wrong_password_is_one_line_exit_one(tool, private_image, tmp_path, workdir):
    ref, user, _ = private_image
    proc = tool("tosi", "-image", ref, "-username", user, "-password", "not-her-password-8431",
                "-extractto", tmp_path / "r", "-workdir", workdir, check=1)
    assert proc.stderr.startswith("tosi: error: ") and len(proc.stderr.splitlines()) == 1
    assert "not-her-password-8431" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_validate_cache_replaces_a_corrupt_cached_layer(tool, image, tmp_path, workdir):
    pushed, ref = image
    tool("tosi", "-image", ref, "-workdir", workdir, check=0)
    blob = Workdir(workdir).layer_path(pushed.layers[0].digest)
    with open(blob, "r+b") as f:
        f.write(b"\0\0\0\0")
    tool("tosi", "-image", ref, "-validate-cache", "-extractto", tmp_path / "r", "-workdir", workdir,
         check=0)
    with open(blob, "rb") as f:
        assert f.read() == pushed.layers[0].data
    assert (tmp_path / "r/etc/shadow").read_text() == "root:*:1::::::\n"


def test_leftover_upperdir_is_refused_before_any_request(tool, counter, tmp_path):
    upper = tmp_path / "rootfs.upper"
    upper.mkdir()
    (upper / "changed").write_text("earlier")
    proc = tool("tosi", "-image", f"{counter.host}/test/app:1", "-mount", tmp_path / "rootfs", check=2)
    assert "tosi-mount --keep-upper" in proc.stderr and "--unmount --clean" in proc.stderr
    assert counter.count == 0
    assert not (tmp_path / "rootfs").exists()


def test_download_failure_during_extractto_says_what_the_target_holds(tool, pusher, registry,
                                                                      repo_name, tmp_path, workdir):
    layers = [make_layer([file_entry(name, name.encode())]) for name in ("a", "b", "c")]
    pusher.push_image(repo_name, "1", layers)
    pusher.session.delete(f"{registry.url}/v2/{repo_name}/blobs/{layers[1].digest}").raise_for_status()
    target = tmp_path / "rootfs"
    proc = tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-extractto", target,
                "-parallel-downloads", "1", "-workdir", workdir, check=1)
    assert len(proc.stderr.splitlines()) == 1 and layers[1].digest in proc.stderr
    assert proc.stderr.rstrip().endswith(f"{target} is partially extracted (layers 0 applied); "
                                         "remove it")
    assert os.listdir(target) == ["a"]


def test_a_layer_refused_during_extractto_says_what_the_target_holds(tool, pusher, registry, repo_name,
                                                                    tmp_path, workdir):
    layers = [make_layer([file_entry("a")]), make_layer([file_entry("b")]),
              make_layer([file_entry("../escape")])]
    pusher.push_image(repo_name, "1", layers)
    target = tmp_path / "rootfs"
    proc = tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-extractto", target,
                "-workdir", workdir, check=1)
    assert len(proc.stderr.splitlines()) == 1 and "'../escape'" in proc.stderr
    assert proc.stderr.rstrip().endswith(f"{target} is partially extracted (layers 0-1 applied); remove it")
    assert sorted(os.listdir(target)) == ["a", "b"]


@pytest.mark.slow
def test_image_too_long_for_one_mount_page_is_mounted_by_tosi(tool, pusher, registry, repo_name,
                                                              tmp_path, workdir, mounts):
    count = 400  # 400 short links of up to 13 characters overflow a 4 KiB page
    layers = [make_layer([file_entry(f"layer/{i:03d}", b""), file_entry("top", f"{i}\n".encode())])
              for i in range(count)]
    pusher.push_image(repo_name, "long", layers)
    target = str(tmp_path / "rootfs")
    mounts.append(target)
    tool("tosi", "-image", f"{registry.host}/{repo_name}:long", "-mount", target,
         "-parallel-downloads", "16", "-workdir", workdir, timeout=600, check=0)
    assert "lowerdir+=" in overlayfs.mount_at(target)[1]
    assert len(os.listdir(os.path.join(target, "layer"))) == count
    assert open(os.path.join(target, "top")).read() == f"{count - 1}\n"


def test_interrupt_stops_the_pull_at_once_and_leaves_no_unverified_blob(pusher, registry, repo_name,
                                                                        tmp_path, workdir):
    from tests.support.faultproxy import FaultProxy, Rule

    layer = make_layer([file_entry("big", os.urandom(256 << 10))], compression=None)
    pusher.push_image(repo_name, "1", [layer])
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("stall", path=layer.digest, after=4096))
        host = proxy.url.split("://", 1)[1]
        proc = subprocess.Popen([sys.executable, os.path.join(BIN, "tosi"), "-image",
                                 f"{host}/{repo_name}:1", "-extractto", str(tmp_path / "r"),
                                 "-workdir", workdir], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not any(layer.digest in r.path for r in proxy.requests):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            time.sleep(0.3)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130
    # The layer was being extracted as it arrived: the target holds part of it.
    assert stderr.strip().splitlines() == [
        f"tosi: {tmp_path / 'r'} is partially extracted (no layer applied completely); remove it",
        "tosi: error: interrupted"]
    assert time.monotonic() - started < 5
    assert not os.path.exists(Workdir(workdir).layer_path(layer.digest))
