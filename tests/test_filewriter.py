"""The C file-writer thread, and layers applied with it giving the trees they give without it."""

import io
import os
import stat
import subprocess

import pytest

from tests.support.images import (
    dir_entry, file_entry, hardlink_entry, make_layer, opaque_entry, symlink_entry, whiteout_entry,
)
from tests.support.staging import snapshot
from tosi_tools import filewriter, layer, space


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
}


def _apply(stack, root, mode, env):
    os.makedirs(root)
    result = "ok"
    previous = os.environ.get("TOSI_FILE_WRITER")
    os.environ["TOSI_FILE_WRITER"] = env
    try:
        for i, entries in enumerate(stack):
            lay = make_layer(entries)
            target = root if mode == layer.FLAT else os.path.join(root, str(i))
            os.makedirs(target, exist_ok=True)
            layer.apply_layer(target, io.BytesIO(lay.data), lay.media_type, mode=mode, layer_name=str(i))
    except Exception as exc:  # the same error either way is part of the equivalence
        result = f"{type(exc).__name__}: {exc}"
    finally:
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
    assert (without[0] != "ok") == (case == "a_file_on_the_way_of_a_later_one"), without[0]


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
