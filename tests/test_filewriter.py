"""The C file-writer thread, and layers applied with it giving the trees they give without it."""

import io
import os
import random
import stat
import subprocess

import pytest

from tests.support.images import (
    dir_entry, file_entry, gnu_posix_times, hardlink_entry, make_layer, opaque_entry, pax_tar, symlink_entry,
    whiteout_entry,
)
from tests.support.staging import snapshot
from tosi_tools import filewriter, layer, space, tarstream


def test_the_extension_is_built_here():
    # Without it every test below would pass on the pure-Python path alone.
    assert filewriter.available(), "tosi_tools._filewriter was not built (no C compiler?)"


@pytest.fixture
def dir_fd(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_dup_gives_a_close_on_exec_handle_of_the_same_directory(tmp_path, dir_fd):
    from tosi_tools import _filewriter

    dup = _filewriter.dup(dir_fd)
    try:
        assert dup != dir_fd and not os.get_inheritable(dup)
        assert os.fstat(dup).st_ino == os.fstat(dir_fd).st_ino == os.stat(tmp_path).st_ino
    finally:
        os.close(dup)
    with pytest.raises(OSError):
        _filewriter.dup(-1)


def test_make_dir_makes_a_directory_owned_as_asked(tmp_path, dir_fd):
    assert filewriter.make_dir(dir_fd, "d", 0o700, 1234, 5678, True)
    st = os.lstat(tmp_path / "d")
    assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == (1234, 5678)


def test_make_dir_leaves_an_existing_name_to_the_caller_and_follows_no_symlink(tmp_path, dir_fd):
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    assert not filewriter.make_dir(dir_fd, "link", 0o700, 1, 1, True)
    assert os.path.islink(tmp_path / "link") and not os.path.exists(tmp_path / "elsewhere")


def test_make_dir_raises_what_os_mkdir_raises_naming_the_entry(dir_fd):
    with pytest.raises(FileNotFoundError, match="missing/d"):
        filewriter.make_dir(dir_fd, "missing/d", 0o700, 0, 0, False)


def _add(writer, fd, name, data=b"x", mode=0o644, flags=0, uid=0, gid=0, mtime_ns=0):
    writer.add(fd, name, data, mode, flags, uid, gid, mtime_ns, name)


def test_files_get_their_data_mode_owner_and_mtime(tmp_path, dir_fd):
    writer = filewriter.FileWriter()
    try:
        _add(writer, dir_fd, "a", b"alpha", 0o4750, filewriter.CHOWN | filewriter.CHMOD, 1234, 5678,
             1_600_000_000_123_456_789)
        _add(writer, dir_fd, "before-1970", b"", 0o600, 0, 0, 0, -1_500_000_000)
        assert writer.sync() == []
    finally:
        writer.close()
    st = os.lstat(tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == b"alpha"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4750, 1234, 5678)
    assert st.st_mtime_ns == 1_600_000_000_123_456_789
    assert os.lstat(tmp_path / "before-1970").st_mtime_ns == -1_500_000_000


def test_a_name_that_exists_hands_back_that_task_and_all_after_it(tmp_path, dir_fd):
    (tmp_path / "b").write_bytes(b"old")
    writer = filewriter.FileWriter()
    try:
        for name in ("a", "b", "c", "d"):
            _add(writer, dir_fd, name)
        assert writer.sync() == ["b", "c", "d"]
        _add(writer, dir_fd, "e")  # a sync starts afresh
        assert writer.sync() == []
    finally:
        writer.close()
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "e"]
    assert (tmp_path / "b").read_bytes() == b"old"


def test_a_symlink_at_the_name_is_not_followed(tmp_path, dir_fd):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    os.symlink(outside, tmp_path / "link")
    writer = filewriter.FileWriter()
    try:
        _add(writer, dir_fd, "link", b"pwned")
        assert writer.sync() == ["link"]
    finally:
        writer.close()
    assert not os.path.lexists(outside)


def test_the_directory_stays_the_one_given_when_the_caller_closes_its_handle(tmp_path):
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    writer = filewriter.FileWriter()
    try:
        _add(writer, fd, "f", b"in d")
        os.close(fd)
        os.rename(tmp_path / "d", tmp_path / "moved")
        assert writer.sync() == []
    finally:
        writer.close()
    assert (tmp_path / "moved" / "f").read_bytes() == b"in d"


def test_a_name_with_a_nul_byte_is_refused(dir_fd):
    writer = filewriter.FileWriter()
    try:
        with pytest.raises(ValueError):
            for i in range(64):  # whatever the batch size, the batch with it is refused
                _add(writer, dir_fd, f"n{i}\0x")
    finally:
        writer.close()


def test_close_finishes_what_was_queued(tmp_path, dir_fd):
    writer = filewriter.FileWriter()
    _add(writer, dir_fd, "queued")
    writer.close()
    assert os.listdir(tmp_path) == ["queued"]


# ---------------------------------------------------------------- layers, with and without it

MANY = layer.WRITER_AFTER_FILES + 100


def _small_files(prefix, count=MANY):
    return [file_entry(f"{prefix}/f{i:04}", f"{prefix}-{i}".encode() * (i % 7), mode=0o640 + (i % 2) * 0o100,
                       uid=i % 3, gid=i % 5, mtime=1_500_000_000 + i) for i in range(count)]


STACKS = {
    "files_dirs_and_symlinks_interleaved": [
        [dir_entry("a"), *_small_files("a"), dir_entry("a/sub"), symlink_entry("a/sub/up", ".."),
         *_small_files("a/sub"), dir_entry("b", mode=0o700), *_small_files("b")],
    ],
    "a_name_given_twice_keeps_the_last": [
        [dir_entry("a"), *_small_files("a"), file_entry("a/f0003", b"second")],
    ],
    "a_file_then_a_directory_of_the_same_name": [
        [dir_entry("a"), *_small_files("a"), dir_entry("a/f0005"), file_entry("a/f0005/in", b"x")],
    ],
    "a_file_just_queued_then_a_directory_of_the_same_name": [
        [dir_entry("a"), *_small_files("a"), file_entry("a/late", b"x"), dir_entry("a/late"),
         file_entry("a/late/in", b"y")],
    ],
    "files_just_queued_in_a_directory_a_symlink_then_replaces": [
        [dir_entry("d"), dir_entry("x")],
        [*_small_files("d"), symlink_entry("d", "x"), file_entry("d/through", b"z")],
    ],
    "a_file_then_a_symlink_of_the_same_name": [
        [dir_entry("a"), *_small_files("a"), symlink_entry("a/f0007", "f0008")],
    ],
    "a_file_on_the_way_of_a_later_one": [  # an error: the same one, after the same files
        [dir_entry("a"), *_small_files("a"), file_entry("a/f0009/below", b"x")],
    ],
    "hardlinks_and_whiteouts_in_the_same_layer": [
        [dir_entry("a"), *_small_files("a"), hardlink_entry("a/link", "a/f0010"), whiteout_entry("a/f0011")],
    ],
    "an_upper_layer_replaces_a_directory_full_of_files": [
        [dir_entry("a"), *_small_files("a"), dir_entry("c"), *_small_files("c")],
        [dir_entry("x"), *_small_files("x"), symlink_entry("a", "x"), file_entry("c", b"now a file"),
         *_small_files("a2")],
    ],
    "big_files_between_small_ones_new_names_and_queued_ones": [
        [dir_entry("a"), *_small_files("a"), file_entry("a/big", b"B" * (filewriter.MAX_FILE + 1)),
         file_entry("a/f0004", b"b" * (filewriter.MAX_FILE + 7)), *_small_files("b"),
         file_entry("a/big2", b"C" * (filewriter.MAX_FILE * 2))],
    ],
    "a_big_file_over_a_lower_directory_of_queued_files": [
        [dir_entry("a"), dir_entry("a/d")],
        [*_small_files("a/d"), file_entry("a/d", b"D" * (filewriter.MAX_FILE + 1)), *_small_files("a/e")],
    ],
    "an_upper_layer_deletes_and_refills": [
        [dir_entry("a"), *_small_files("a")],
        [*_small_files("a"), opaque_entry("a"), whiteout_entry("a/f0001"), *_small_files("z")],
    ],
    "a_symlink_and_a_big_file_over_directories_queued_files_are_deep_below": [
        [dir_entry("x"), dir_entry("p"), dir_entry("p/q"), dir_entry("p/q/r")],
        [dir_entry("a"), dir_entry("a/b"), *_small_files("a/b"), symlink_entry("a", "x"), *_small_files("p/q/r"),
         file_entry("p", b"P" * (filewriter.MAX_FILE + 1)), file_entry("a/b/after", b"x")],
    ],
    "a_symlink_and_a_big_file_over_directories_no_queued_file_is_in": [
        [dir_entry("x"), dir_entry("lower"), file_entry("lower/f", b"f"), dir_entry("low2")],
        [dir_entry("a"), *_small_files("a"), symlink_entry("lower", "x"),
         file_entry("low2", b"L" * (filewriter.MAX_FILE + 1)), *_small_files("a", 80)],
    ],
    # What stops a run of files taken in C (tarstream.TarReader.plain_files), or must not.
    "runs_under_prefixes_that_name_the_same_directory_otherwise": [
        [dir_entry("a"), dir_entry("a/b"), *_small_files("./a"), *_small_files("a/b/../b"),
         *_small_files("a//b"), *_small_files("/a"), *_small_files(".")],
    ],
    "whiteouts_setuid_files_and_a_repeated_name_inside_a_run": [
        [dir_entry("a"), *_small_files("a")],
        [*_small_files("a", 80), whiteout_entry("a/f0100"), file_entry("a/s", b"s", mode=0o4755, uid=3),
         file_entry("a/g", b"g", mode=0o2750, gid=4), file_entry("a/f0002", b"again"), *_small_files("a", 90),
         file_entry("a/.wh..wh..opq"), *_small_files("a", 70)],
    ],
    "a_run_into_a_setgid_directory_with_a_lower_layer_below": [
        [dir_entry("s", mode=0o2775, gid=7), *_small_files("s", 10)],
        [*_small_files("s"), whiteout_entry("s"), *_small_files("t")],
    ],
    "a_run_cut_by_a_big_file_a_symlink_over_its_directory_and_a_file_below_it": [
        [dir_entry("d"), dir_entry("x"), *_small_files("d"), file_entry("d/big", b"B" * (filewriter.MAX_FILE + 1)),
         *_small_files("d", 90), symlink_entry("d", "x"), *_small_files("d", 80), file_entry("d/f0001/no", b"")],
    ],
}


def _apply(stack, root, mode, env, runs=True):
    os.makedirs(root)
    result = "ok"
    previous = os.environ.get("TOSI_FILE_WRITER")
    os.environ["TOSI_FILE_WRITER"] = env
    plain_files = tarstream._plain_files
    if not runs:
        tarstream._plain_files = None
    try:
        for i, entries in enumerate(stack):
            lay = make_layer(entries)
            target = root if mode == layer.FLAT else os.path.join(root, str(i))
            os.makedirs(target, exist_ok=True)
            layer.apply_layer(target, io.BytesIO(lay.data), lay.media_type, mode=mode, layer_name=str(i))
    except Exception as exc:  # the same error either way is part of the equivalence
        result = f"{type(exc).__name__}: {exc}"
    finally:
        tarstream._plain_files = plain_files
        if previous is None:
            del os.environ["TOSI_FILE_WRITER"]
        else:
            os.environ["TOSI_FILE_WRITER"] = previous
    return result, snapshot(root)


@pytest.mark.parametrize("mode", [layer.FLAT, layer.OVERLAY])
@pytest.mark.parametrize("case", sorted(STACKS))
def test_a_layer_applied_with_the_writer_gives_the_tree_it_gives_without(tmp_path, case, mode):
    with_writer = _apply(STACKS[case], str(tmp_path / "with"), mode, "1")
    without = _apply(STACKS[case], str(tmp_path / "without"), mode, "0")
    assert with_writer == without
    failing = ("a_file_on_the_way_of_a_later_one",
               "a_run_cut_by_a_big_file_a_symlink_over_its_directory_and_a_file_below_it")
    assert (without[0] != "ok") == (case in failing), without[0]


@pytest.mark.parametrize("mode", [layer.FLAT, layer.OVERLAY])
@pytest.mark.parametrize("case", sorted(STACKS))
def test_a_layer_applied_with_runs_of_files_taken_in_c_gives_the_tree_it_gives_without(tmp_path, case, mode):
    assert (_apply(STACKS[case], str(tmp_path / "runs"), mode, "1")
            == _apply(STACKS[case], str(tmp_path / "no runs"), mode, "1", runs=False))


def count_files_taken_in_runs(monkeypatch):
    """A list that gets how many files each run took in C (tarstream._plain_files)."""
    taken = []
    plain_files = tarstream._plain_files

    def counting(*args):
        result = plain_files(*args)
        taken.append(result[1])
        return result

    monkeypatch.setattr(tarstream, "_plain_files", counting)
    return taken


def test_the_files_after_a_queued_one_are_taken_in_runs(tmp_path, monkeypatch):
    taken = count_files_taken_in_runs(monkeypatch)
    lay = make_layer([dir_entry("a"), *_small_files("a", 1000)])
    stats = layer.apply_layer(str(tmp_path), io.BytesIO(lay.data), lay.media_type)
    assert stats.entries == 1001 and len(os.listdir(tmp_path / "a")) == 1000
    # All but the writer's first files and one per run, which start each run in Python.
    assert sum(taken) > 1000 - layer.WRITER_AFTER_FILES - len(taken)
    assert sum(taken) > 800


def _posix_layer(count):
    """What GNU tar --format=posix makes of a directory of `count` small files (nanosecond
    mtimes, some negative, one whole second): a PAX header of times before each member."""
    members = [(gnu_posix_times(atime="1700000009.5"), dir_entry("a"))]
    for i in range(count):
        mtime = ["1700000000", f"{1_700_000_000 + i}.{i:09}", f"-{i}.{i:09}7", f"{i}.{i}"][i % 4]
        members.append((gnu_posix_times(mtime), file_entry(f"a/f{i:04}", b"x" * (i % 700), mode=0o640 + i % 2,
                                                           uid=i % 3, gid=i % 2, mtime=max(0, int(float(mtime))))))
    return pax_tar(members)


def test_a_gnu_posix_format_layer_is_applied_in_c_runs_and_gives_the_tree_the_python_path_gives(tmp_path,
                                                                                                 monkeypatch):
    data = _posix_layer(1000)
    taken = count_files_taken_in_runs(monkeypatch)
    os.mkdir(tmp_path / "c")
    os.mkdir(tmp_path / "python")
    stats = layer.apply_layer(str(tmp_path / "c"), io.BytesIO(data), "application/x-tar")
    assert stats.entries == 1001 and sum(taken) > 800
    monkeypatch.setattr(tarstream, "_plain_files", None)
    monkeypatch.setattr(tarstream, "_parse_plain", None)
    layer.apply_layer(str(tmp_path / "python"), io.BytesIO(data), "application/x-tar")
    in_c, in_python = (snapshot(str(tmp_path / tree), with_dir_mtimes=True) for tree in ("c", "python"))
    in_c.pop("."), in_python.pop(".")  # made when the test made it: no entry names it
    assert in_c == in_python and len(in_c) == 1001
    assert in_c["a/f0005"]["mtime"] == 1_700_000_005_000_000_005
    assert in_c["a/f0006"]["mtime"] == -6_000_000_006  # truncated toward zero (...0067)


@pytest.mark.parametrize("seed", range(12))
def test_random_layers_of_many_small_files_give_the_same_tree_with_runs_without_and_without_the_writer(
        tmp_path, seed):
    rng = random.Random(seed)
    names = [f"{d}/{n}" for d in ("a", "./a", "a/b", "c", "") for n in ("f", "g", ".wh.f", "b", "h")]

    def entry(i):
        name = rng.choice(names).lstrip("/") + str(rng.randrange(30))
        kind = rng.random()
        if kind < 0.8:
            return file_entry(name, os.urandom(rng.choice([0, 1, 511, 512, 513, 4097])),
                              mode=rng.choice([0o644, 0o600, 0o4755, 0o1777, 0o666]), uid=rng.randrange(3),
                              gid=rng.randrange(3), mtime=rng.randrange(1 << 33))
        if kind < 0.85:
            return dir_entry(rng.choice(["a", "a/b", "c", "a/b/h3"]), mode=rng.choice([0o755, 0o2775]), gid=2)
        if kind < 0.9:
            return symlink_entry(rng.choice(["a/b", "c", "a/f1"]), rng.choice(["../x", "x", "/x"]))
        if kind < 0.95:
            return whiteout_entry(rng.choice(["a/f", "a/b", "c/g1", "a"]) + str(rng.randrange(3)))
        return file_entry(name, b"B" * (filewriter.MAX_FILE + rng.randrange(2)))

    def comparable(result):  # an overlay whiteout (char 0/0) is made with the time it is made
        error, tree = result
        return error, {path: {k: v for k, v in node.items() if not (k == "mtime" and node.get("rdev") == (0, 0))}
                       for path, node in tree.items()}

    stack = [[dir_entry("a"), dir_entry("a/b"), dir_entry("c"), dir_entry("x")] + [entry(i) for i in range(400)]
             for _ in range(2)]
    for mode in (layer.FLAT, layer.OVERLAY):
        runs = comparable(_apply(stack, str(tmp_path / mode / "runs"), mode, "1"))
        assert runs == comparable(_apply(stack, str(tmp_path / mode / "no runs"), mode, "1", runs=False))
        no_writer = comparable(_apply(stack, str(tmp_path / mode / "no writer"), mode, "0"))
        # After a failure the writer leaves undone what was queued behind a file it could
        # not make (the layer is partial either way): then only the error must agree.
        assert runs == no_writer if runs[0] == "ok" else runs[0] == no_writer[0]


def test_add_run_queues_what_the_taker_appends_and_submits_at_the_batch_size(tmp_path, dir_fd):
    writer = filewriter.FileWriter()
    asked = []

    def take(dup, batch, tasks, max_files, max_bytes):
        asked.append((max_files, max_bytes))
        for _ in range(max_files):
            batch.append((dup, f"r{len(tasks)}".encode(), b"data", 0o600, 0, 0, 0, 0))
            tasks.append(f"task {len(tasks)}")
        return max_files, 4 * max_files

    try:
        assert writer.add_run(dir_fd, take) == filewriter._FIRST_BATCH_FILES
        assert writer.add_run(dir_fd, take) == 2 * filewriter._FIRST_BATCH_FILES  # batches grow as add's do
        assert writer.sync() == []
    finally:
        writer.close()
    made = sorted(os.listdir(tmp_path))
    assert made == sorted(f"r{i}" for i in range(3 * filewriter._FIRST_BATCH_FILES))
    assert open(tmp_path / "r0", "rb").read() == b"data"
    assert asked[0] == (filewriter._FIRST_BATCH_FILES, filewriter._BATCH_BYTES)


def test_running_out_of_space_in_the_writer_is_the_usual_one_line_error(tmp_path):
    target = tmp_path / "small"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(target)], check=True)
    try:
        lay = make_layer([file_entry(f"f{i}", os.urandom(8192)) for i in range(MANY)])
        # Without the free-space reserve (tests/test_space_guard.py), to reach ENOSPC.
        limits = layer.Limits(reserve=space.Reserve.parse("0"))
        with pytest.raises(layer.UnpackError, match=r"^layer L: no space left on the target$"):
            layer.apply_layer(str(target), io.BytesIO(lay.data), lay.media_type, layer_name="L", limits=limits)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_what_waits_for_a_sync_is_bounded(dir_fd):
    writer = filewriter.FileWriter()
    try:
        for i in range(filewriter._BACKLOG_FILES - 1):
            _add(writer, dir_fd, f"f{i}", b"")
        assert not writer.full
        _add(writer, dir_fd, "last", b"")
        assert writer.full  # the applier syncs here, so a layer's files are not all held at once
        writer.sync()
        assert not writer.full
    finally:
        writer.close()
