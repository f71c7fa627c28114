"""The free-space reserve and the bound on tar padding: a layer or a blob may not fill
its filesystem, and an endless stream after a tar's end marker is refused.

Each bomb runs against a small ext4 made by the test on a loop device (blocks: 64
MiB; inodes: mkfs.ext4 -N), unmounted and removed at the end even on failure.
"""

import contextlib
import json
import os
import subprocess
import tarfile
import zlib

import pytest

from tests.support.faultproxy import Rule
from tests.support.images import DOCKER_LAYER_GZIP, Layer, dir_entry, file_entry, make_layer, sha256, tar_bytes
from tests.support.staging import run_unpack, stage_image
from tosi_tools import space

MIB = 1 << 20
DEFAULT_RESERVE = 8 * MIB  # a 64 MiB filesystem's: the larger of 8 MiB and 1%


@pytest.fixture
def small_fs(tmp_path):
    """small_fs(size_mib, inodes=None) -> the mount point of a fresh ext4 of that size."""
    made = []

    def make(size_mib=64, inodes=None):
        image = tmp_path / f"fs{len(made)}.img"
        point = tmp_path / f"fs{len(made)}"
        point.mkdir()
        with open(image, "wb") as f:
            f.truncate(size_mib * MIB)
        made.append((str(point), str(image)))
        subprocess.run(["mkfs.ext4", "-q", "-F", *(["-N", str(inodes)] if inodes else []), str(image)],
                       check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True, capture_output=True)
        made[-1] = (str(point), str(image), True)
        return str(point)

    yield make
    for point, image, *mounted in made:
        if mounted:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
        os.unlink(image)


def free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_favail


def zeros_layer(size, padding=0):
    """A gzip layer of one file of `size` zero bytes (tiny on the wire), built without
    holding it in memory; `padding` more zero bytes after the tar's end marker."""
    info = tarfile.TarInfo("zeros")
    info.size = size
    head = info.tobuf(tarfile.PAX_FORMAT)
    tail = bytes(-size % 512) + bytes(1024) + bytes(padding)
    gz = zlib.compressobj(6, zlib.DEFLATED, 31)
    diff = __import__("hashlib").sha256()
    parts = []
    for chunk in [head] + [bytes(MIB)] * (size // MIB) + [bytes(size % MIB), tail]:
        diff.update(chunk)
        parts.append(gz.compress(chunk))
    parts.append(gz.flush())
    return Layer(data=b"".join(parts), media_type=DOCKER_LAYER_GZIP, diff_id=f"sha256:{diff.hexdigest()}")


@pytest.fixture(scope="module")
def bomb():
    layer = zeros_layer(200 * MIB)
    assert len(layer.data) < 1 * MIB  # the point of a bomb: small on the wire
    return layer


def one_error_line(proc, prog):
    lines = [line for line in proc.stderr.splitlines() if line]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def assert_reserve_kept(proc, prog, point, layer_text="layer 0", reserve=DEFAULT_RESERVE, what="bytes"):
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc, prog)
    assert layer_text in line and "the reserve is" in line and point in line, line
    assert "TOSI_MIN_FREE" in line, line
    free_bytes, free_inodes = free(point)
    if what == "bytes":
        assert free_bytes >= reserve, (free_bytes, line)
    else:
        assert free_inodes >= reserve, (free_inodes, line)
    return line


# ---------------------------------------------------------------- blocks

def test_extractto_bomb_stops_at_the_reserve_and_says_the_target_is_partial(
        tool, pusher, registry, repo_name, workdir, small_fs, bomb):
    point = small_fs()
    image = pusher.push_image(repo_name, "1", [bomb])
    target = os.path.join(point, "rootfs")
    proc = tool("tosi", "-image", f"{registry.host}/{repo_name}:1", "-extractto", target, "-workdir", workdir)
    line = assert_reserve_kept(proc, "tosi", point)
    assert f"{target} is partially extracted" in line
    assert image.digest  # pushed


def test_per_layer_bomb_stops_at_the_reserve_and_leaves_no_layer_behind(
        pusher, registry, repo_name, small_fs, bomb):
    point = small_fs()
    workdir = os.path.join(point, "workdir")  # the cache and the overlays on the small filesystem
    plan, _ = stage_image(pusher, registry, repo_name, [bomb], workdir)
    proc = run_unpack(plan, "--workdir", workdir)
    assert_reserve_kept(proc, "tosi-unpack", point)
    overlays = os.path.join(workdir, "overlays")
    assert [n for n in os.listdir(overlays) if not n.endswith(".lock")] == []  # temp dir removed


def test_min_free_sets_the_reserve(pusher, registry, repo_name, workdir, small_fs, bomb):
    point = small_fs()
    plan, _ = stage_image(pusher, registry, repo_name, [bomb], workdir)
    target = os.path.join(point, "rootfs")
    proc = run_unpack(plan, "--workdir", workdir, "--into", target, "--min-free", "32M")
    line = assert_reserve_kept(proc, "tosi-unpack", point, reserve=32 * MIB)
    assert "the reserve is 32.0 MiB" in line


def test_the_reserve_comes_from_the_environment_too(pusher, registry, repo_name, workdir, small_fs, bomb):
    point = small_fs()
    plan, _ = stage_image(pusher, registry, repo_name, [bomb], workdir)
    proc = run_unpack(plan, "--workdir", workdir, "--into", os.path.join(point, "r"),
                      env={"TOSI_MIN_FREE": "50%"})
    st = os.statvfs(point)
    assert_reserve_kept(proc, "tosi-unpack", point, reserve=st.f_blocks * st.f_frsize // 2)


def test_min_free_zero_lets_a_layer_fill_the_filesystem(pusher, registry, repo_name, workdir, small_fs, bomb):
    point = small_fs()
    plan, _ = stage_image(pusher, registry, repo_name, [bomb], workdir)
    proc = run_unpack(plan, "--workdir", workdir, "--into", os.path.join(point, "r"), "--min-free", "0")
    assert proc.returncode == 1
    assert "no space left" in one_error_line(proc, "tosi-unpack")


@pytest.mark.parametrize("value", ["lots", "-1M", "5X", "101%"])
def test_a_bad_min_free_is_a_usage_error(tool, value, workdir):
    proc = tool("tosi-unpack", "--workdir", workdir, "--min-free", value, input="")
    assert proc.returncode == 2 and "--min-free" in proc.stderr
    proc = tool("tosi", "-image", "example.invalid/x", "-extractto", "/nonexistent/x", "-min-free", value)
    assert proc.returncode == 2 and "-min-free" in one_error_line(proc, "tosi")


def test_a_layer_that_fits_above_the_reserve_is_applied(pusher, registry, repo_name, workdir, small_fs):
    point = small_fs()
    plan, _ = stage_image(pusher, registry, repo_name, [zeros_layer(20 * MIB)], workdir)
    target = os.path.join(point, "r")
    proc = run_unpack(plan, "--workdir", workdir, "--into", target)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(os.path.join(target, "zeros")) == 20 * MIB


# ---------------------------------------------------------------- inodes

@pytest.fixture(scope="module")
def inode_bomb():
    return make_layer([dir_entry("d")] + [file_entry(f"d/{i}") for i in range(6000)])


@pytest.mark.parametrize("mode", ["into", "per-layer"])
def test_inode_bomb_stops_at_the_inode_reserve(pusher, registry, repo_name, small_fs, inode_bomb, mode,
                                               tmp_path):
    point = small_fs(64, inodes=4096)
    assert free(point)[1] < 6000
    if mode == "into":
        workdir = str(tmp_path / "workdir")
        plan, _ = stage_image(pusher, registry, repo_name, [inode_bomb], workdir)
        proc = run_unpack(plan, "--workdir", workdir, "--into", os.path.join(point, "r"))
    else:
        workdir = os.path.join(point, "workdir")
        plan, _ = stage_image(pusher, registry, repo_name, [inode_bomb], workdir)
        proc = run_unpack(plan, "--workdir", workdir)
    line = assert_reserve_kept(proc, "tosi-unpack", point, reserve=512, what="inodes")
    assert "512 inodes" in line


# ---------------------------------------------------------------- the cache side

def _plan_with_sizes(registry_host, repo, digest, workdir, sizes):
    ref = f"{registry_host}/{repo}@{digest}"
    from tests.conftest import run_tool

    resolved = run_tool("tosi-resolve", "--workdir", workdir, ref, check=0).stdout
    records = [json.loads(line) for line in resolved.splitlines()]
    for record in records:
        if record["type"] == "layer":
            record["size"] = sizes[record["index"]]
    return "".join(json.dumps(r) + "\n" for r in records), records


def test_a_blob_bigger_than_the_room_above_the_reserve_is_refused_before_it_is_asked_for(
        tool, pusher, registry, repo_name, small_fs, fault_proxy):
    point = small_fs()
    layer = make_layer([file_entry("a", b"a")])
    image = pusher.push_image(repo_name, "1", [layer])
    workdir = os.path.join(point, "workdir")
    plan, _ = _plan_with_sizes(fault_proxy.url.split("//")[1], repo_name, image.digest, workdir, [1 << 40])
    proc = tool("tosi-fetch", "--workdir", workdir, "--progress", "never", input=plan)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc, "tosi-fetch")
    assert "layer 0" in line and "needs 1024.0 GiB more" in line and point in line, line
    assert fault_proxy.count("GET", f"/blobs/{layer.digest}") == 0


def test_endless_blobs_stop_at_the_reserve_of_the_cache(tool, pusher, registry, repo_name, small_fs,
                                                       fault_proxy):
    # Each blob alone fits above the reserve; the two together do not, and the
    # registry sends zeros for ever: the downloads stop while the reserve is free.
    point = small_fs()
    layers = [make_layer([file_entry("a", b"a")]), make_layer([file_entry("b", b"b")])]
    image = pusher.push_image(repo_name, "1", layers)
    endless = iter(lambda: bytes(256 << 10), None)
    for layer in layers:
        fault_proxy.add(Rule("status", path=f"/blobs/{layer.digest}", status=200, body=endless))
    workdir = os.path.join(point, "workdir")
    room = free(point)[0] - DEFAULT_RESERVE
    size = room * 2 // 3
    plan, _ = _plan_with_sizes(fault_proxy.url.split("//")[1], repo_name, image.digest, workdir, [size, size])
    proc = tool("tosi-fetch", "--workdir", workdir, "--progress", "never", "--parallel", "2", input=plan)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc, "tosi-fetch")
    assert "the reserve is" in line and point in line and "stopped with" in line, line
    assert free(point)[0] >= DEFAULT_RESERVE


# ---------------------------------------------------------------- padding after the end marker

@pytest.mark.parametrize("mode", ["into", "per-layer"])
def test_megabytes_of_padding_after_the_end_marker_are_refused(pusher, registry, repo_name, workdir,
                                                               tmp_path, mode):
    layer = make_layer(raw_tar=tar_bytes([file_entry("a", b"a")]) + bytes(2 * MIB))
    plan, _ = stage_image(pusher, registry, repo_name, [layer], workdir)
    args = ["--into", str(tmp_path / "r")] if mode == "into" else []
    proc = run_unpack(plan, "--workdir", workdir, *args)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc, "tosi-unpack")
    assert "layer 0" in line and "follow the tar's end-of-archive marker" in line, line


@pytest.mark.parametrize("mode", ["into", "per-layer"])
def test_a_tar_record_of_padding_is_accepted(pusher, registry, repo_name, workdir, tmp_path, mode):
    raw = tar_bytes([file_entry("a", b"a")]) + bytes(10 << 10)
    layer = make_layer(raw_tar=raw)
    assert layer.diff_id == sha256(raw)
    plan, _ = stage_image(pusher, registry, repo_name, [layer], workdir)
    args = ["--into", str(tmp_path / "r")] if mode == "into" else []
    proc = run_unpack(plan, "--workdir", workdir, *args)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the rule itself

def test_the_default_reserve_is_the_larger_of_8_mib_and_1_percent_at_most_1_gib():
    class St:
        f_frsize = 4096
        f_files = 1_000_000

        def __init__(self, total):
            self.f_blocks = total // 4096
    assert space.Reserve().for_filesystem(St(64 * MIB)) == (8 * MIB, 10_000)
    assert space.Reserve().for_filesystem(St(100 << 30))[0] == (100 << 30) // 100
    assert space.Reserve().for_filesystem(St(4 << 40))[0] == 1 << 30
    assert space.Reserve.parse("2%").for_filesystem(St(100 * MIB))[0] == 2 * MIB
    assert space.Reserve.parse("0").off


# ---------------------------------------------------------------- the C file writer

@pytest.mark.skipif(not __import__("tosi_tools.filewriter").filewriter.available(),
                    reason="the C file writer is not built")
def test_files_queued_for_the_c_writer_count_against_the_reserve(tmp_path):
    # Thousands of small files go to the writer thread; the guard must see them written
    # before it judges, or the thread would fill the filesystem behind its back.
    import io

    from tosi_tools import layer

    target = tmp_path / "small"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(target)], check=True)
    try:
        lay = make_layer([file_entry(f"d/f{i}", bytes([i % 251]) * 8000) for i in range(6000)], compression=None)
        with pytest.raises(space.ReserveReached, match=r"^layer L: stopped with .* the reserve is 8\.0 MiB"):
            layer.apply_layer(str(target), io.BytesIO(lay.data), lay.media_type, layer_name="L")
        assert free(str(target))[0] >= DEFAULT_RESERVE
        assert len(os.listdir(target / "d")) > layer.WRITER_AFTER_FILES  # the writer had work
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_in_memory_tells_tmpfs_from_a_disk_filesystem(disk_path):
    memory = disk_path / "memory"
    memory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(memory)], check=True)
    try:
        fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY) for p in (memory, disk_path)]
        try:
            assert [space.in_memory(fd) for fd in fds] == [True, False]
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        subprocess.run(["umount", str(memory)], check=True)


@contextlib.contextmanager
def open_guards(path, count):
    """`count` guards of the filesystem holding `path`, each on a handle of its own."""
    fds = [os.open(path, os.O_RDONLY | os.O_DIRECTORY) for _ in range(count)]
    guards = [space.Guard(fd, space.Reserve(), "t", str(path)) for fd in fds]
    try:
        yield guards
    finally:
        for guard, fd in zip(guards, fds):
            guard.close()
            os.close(fd)


def _charges_until_a_check_is_due(guards, allowance):
    for count in range(1, 4 * allowance):
        if guards[count % len(guards)].charge(0, 1):
            return count
    raise AssertionError(f"no check was due after {4 * allowance} inodes")


@pytest.mark.parametrize("writers", [1, 3])
def test_charges_held_by_guards_still_make_a_check_due_within_a_quarter_more_than_allowed(tmp_path, writers):
    # Each guard holds small charges back from the shared meter (its lock is the cost);
    # all of them together hold at most a quarter of what the last check allowed.
    with open_guards(tmp_path, writers) as guards:
        guards[0].check()
        # Earlier writers of this process on the same filesystem may have left charges:
        # spend up to the next check (which starts the count afresh), then check.
        _charges_until_a_check_is_due(guards[:1], space.CHECK_INODES)
        guards[0].check()
        meter = guards[0]._open_meter()
        allowance = meter.allow_inodes
        assert meter.spent_inodes == 0 and allowance > 100
        due = _charges_until_a_check_is_due(guards, allowance)
        assert allowance <= due <= allowance + allowance // 4


def test_a_check_makes_every_guard_hand_in_what_it_holds(tmp_path):
    with open_guards(tmp_path, 2) as (holding, checking):
        checking.check()
        meter = holding._open_meter()
        before = meter.spent_inodes  # what earlier writers of this process left
        holding.charge(0, 1)  # the first charge after a check reaches the meter...
        holding.charge(0, 1)  # ...the next is held
        assert meter.spent_inodes == before + 1
        checking.check()      # a new allowance: what was held must be counted against it
        holding.charge(0, 1)
        assert meter.spent_inodes == before + 3


def test_room_is_what_charges_may_take_before_the_meter_must_see_them(tmp_path):
    with open_guards(tmp_path, 1) as (guard,):
        guard.check()
        guard.charge(0, 1)  # reaches the meter, and sets what this guard may hold
        meter = guard._open_meter()
        room_bytes, room_inodes = guard.room()
        assert room_bytes > 0 and room_inodes > 0
        spent = meter.spent_inodes
        guard.hold(4096, room_inodes)  # what the C run of small files took
        assert guard.room() == (room_bytes - 4096, 0)
        assert meter.spent_inodes == spent  # held, not yet counted
        guard.charge(0, 1)  # past the room: what is held goes to the meter with it
        assert meter.spent_inodes == spent + room_inodes + 1


def test_there_is_no_room_after_another_writers_check_until_a_charge(tmp_path):
    with open_guards(tmp_path, 2) as (holding, checking):
        checking.check()
        holding.charge(0, 1)
        assert holding.room() != (0, 0)
        checking.check()  # a new allowance, which holding's hold was not worked out for
        assert holding.room() == (0, 0)
        holding.charge(0, 1)
        assert holding.room() != (0, 0)
