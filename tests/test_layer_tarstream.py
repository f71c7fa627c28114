"""tarstream reads what GNU tar and Python's tarfile write: every header format a layer may use."""

import io
import os
import subprocess
import tarfile

import pytest

from fractions import Fraction

from tests.support.images import (dir_entry, file_entry, gnu_posix_times, hardlink_entry, pax_header, pax_record,
                                  pax_tar, special_entry, symlink_entry, tar_bytes)
from tosi_tools import tarstream
from tosi_tools.errors import UnpackError
from tosi_tools.tarstream import MAX_TIME, TarReader

LONG = "/".join(["n" * 50] * 6)


def entries(data, with_data=True):
    reader = TarReader(io.BytesIO(data), "test")
    out = []
    for e in reader:
        body = reader.read_data(e.data_size) if with_data else None
        out.append((e, body))
    return out


def summary(data):
    return [(e.name, e.type, e.mode, e.uid, e.gid, e.size, int(e.mtime), e.linkname, e.devmajor, e.devminor,
             body) for e, body in entries(data)]


def tarfile_summary(data):
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar:
            body = tar.extractfile(m).read() if m.isreg() else b""
            out.append((m.name, m.type.decode(), m.mode, m.uid, m.gid, m.size if m.isreg() else 0,
                        int(m.mtime), m.linkname, m.devmajor if m.ischr() or m.isblk() else 0,
                        m.devminor if m.ischr() or m.isblk() else 0, body))
    return out


MEMBERS = [
    dir_entry("dir", mode=0o1755, uid=5, gid=6), file_entry("dir/file", b"hello", mode=0o4711, uid=1000),
    file_entry(LONG, b"long"), symlink_entry("sym", "t" * 150), hardlink_entry("hard", "dir/file"),
    special_entry("chr", tarfile.CHRTYPE, 4, 64), special_entry("blk", tarfile.BLKTYPE, 8, 1),
    special_entry("fifo", tarfile.FIFOTYPE), file_entry("big-uid", b"x", uid=3_000_000_000),
    file_entry("empty", b""),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reads_what_tarfile_writes(fmt):
    data = tar_bytes(MEMBERS, format=fmt)
    assert summary(data) == tarfile_summary(data)


def test_reads_ustar_prefix_names():
    name = "p" * 120 + "/file"
    data = tar_bytes([file_entry(name, b"u")], format=tarfile.USTAR_FORMAT)
    [(e, body)] = entries(data)
    assert e.name == name and body == b"u"


def test_pax_xattrs_keep_their_bytes():
    data = tar_bytes([file_entry("f", pax={"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.b": "\u00e9"})])
    [(e, _)] = entries(data)
    assert e.xattrs == [("user.a", b"1"), ("user.b", "\u00e9".encode())]


def test_pax_mtime_keeps_fractions():
    info, body = file_entry("f")
    info.pax_headers = {"mtime": "1600000000.25"}
    [(e, _)] = entries(tar_bytes([(info, body)]))
    assert e.mtime == 1600000000.25


@pytest.mark.parametrize("value,ns", [
    ("1600000000.123456789", 1600000000123456789),  # a float would give ...768
    ("1600000000.1234567899", 1600000000123456789),  # digits past the ninth are cut, as Go does
    ("-1.5", -1500000000),
    (".5", 500000000),
    ("7.", 7000000000),
])
def test_pax_mtime_is_exact_to_the_nanosecond(value, ns):
    [(e, _)] = entries(tar_bytes([file_entry("f", pax={"mtime": value})]))
    assert int(e.mtime * 1_000_000_000) == ns


def with_field(data, offset, width, text):
    """`data` (one ustar header first) with a header field replaced and the checksum made right."""
    block = bytearray(data[:512])
    block[offset:offset + width] = text.ljust(width, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block) + data[512:]


@pytest.mark.parametrize("mode", [b"-000001", b"+004755", b"0o4755", b"0_755", b"0644 x", b"\t0644"])
def test_a_header_number_with_anything_but_octal_digits_is_refused(mode):
    data = with_field(tar_bytes([file_entry("f", b"x")], format=tarfile.USTAR_FORMAT), 100, 8, mode)
    assert "bad number" in refusal(data)


@pytest.mark.parametrize("mode,expected", [(b"0000644\0", 0o644), (b"  644 \0", 0o644), (b"644\0junk", 0o644),
                                           (b"\0" * 8, 0)])
def test_a_header_number_may_be_padded_with_spaces_and_nuls(mode, expected):
    data = with_field(tar_bytes([file_entry("f", b"x")], format=tarfile.USTAR_FORMAT), 100, 8, mode)
    [(e, _)] = entries(data)
    assert e.mode & 0o7777 == expected


@pytest.mark.parametrize("length", [b"+20", b"2_0"])
def test_a_pax_record_length_with_anything_but_digits_is_refused(length):
    data = tar_bytes([file_entry("f", b"x", pax={"comment": "x" * 8})])
    # as long as before: the record still says its own length right
    data = data.replace(b"20 comment=xxxxxxxx", length + b" comment=xxxxxxx")
    assert "malformed PAX header" in refusal(data)


def test_global_pax_header_applies_to_following_entries():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"SCHILY.xattr.user.g": "all"}) as tar:
        tar.addfile(tarfile.TarInfo("a"), io.BytesIO(b""))
    [(e, _)] = entries(buf.getvalue())
    assert e.name == "a" and e.xattrs == [("user.g", b"all")]


def _sparse_file(path):
    with open(path, "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek((3 << 20) - 3)
        f.write(b"end")


@pytest.mark.parametrize("flags", [
    ["--format=pax", "--sparse-version=1.0"], ["--format=pax", "--sparse-version=0.1"],
    ["--format=pax", "--sparse-version=0.0"], ["--format=gnu"],
])
def test_reads_gnu_sparse_files(tmp_path, flags):
    _sparse_file(tmp_path / "sparse")
    out = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", *flags, "-cf", out, "-C", tmp_path, "sparse"], check=True)
    reader = TarReader(io.BytesIO(out.read_bytes()), "test")
    e = next(reader)
    content = bytearray(e.size)
    for offset, size in e.sparse:
        content[offset:offset + size] = reader.read_data(size)
    assert e.name == "sparse" and e.size == 3 << 20
    assert bytes(content) == (tmp_path / "sparse").read_bytes()
    assert list(reader) == []


def test_old_directory_marked_by_trailing_slash():
    info = tarfile.TarInfo("olddir/")
    info.type = tarfile.AREGTYPE
    data = tar_bytes([(info, None)], format=tarfile.USTAR_FORMAT)
    [(e, _)] = entries(data)
    assert e.isdir() and e.name == "olddir"


def test_unread_data_is_skipped():
    data = tar_bytes([file_entry("a", b"a" * 5000), file_entry("b", b"b")])
    names = [e.name for e in TarReader(io.BytesIO(data), "test")]
    assert names == ["a", "b"]


def test_archive_without_end_marker_is_tolerated():
    data = tar_bytes([file_entry("a", b"a")])
    [(e, body)] = entries(data[:1024])
    assert e.name == "a" and body == b"a"


def test_bad_checksum_is_an_error():
    data = bytearray(tar_bytes([file_entry("a", b"a")]))
    data[0] ^= 1
    with pytest.raises(UnpackError, match="test: not a valid tar header"):
        entries(bytes(data))


def test_stream_ending_inside_data_is_an_error():
    data = tar_bytes([file_entry("a", os.urandom(4000))])
    with pytest.raises(UnpackError, match="ends"):
        entries(data[:2048])


def test_stream_ending_inside_a_header_is_an_error():
    data = tar_bytes([file_entry("a", b"")])
    with pytest.raises(UnpackError, match="ends inside a header"):
        entries(data[:300])


@pytest.mark.parametrize("pax", [{"path": "a\0b"}, {"linkpath": "t\0u"}, {"SCHILY.xattr.user.a\0b": "v"}])
def test_a_nul_byte_in_a_pax_name_is_an_unpack_error(pax):
    data = tar_bytes([file_entry("f", b"x", pax=pax)])
    with pytest.raises(UnpackError, match="NUL byte"):
        entries(data)


def refusal(data):
    with pytest.raises(UnpackError) as info:
        entries(data)
    return str(info.value)


@pytest.mark.parametrize("key,value", [
    ("uid", "-1"), ("uid", str(1 << 32)), ("gid", str(10**30)), ("uid", "4294967295"),
])
def test_a_pax_uid_or_gid_out_of_range_is_an_unpack_error(key, value):
    assert "out of range" in refusal(tar_bytes([file_entry("f", b"x", pax={key: value})]))


@pytest.mark.parametrize("value", [str(10**30), "-" + "9" * 20, "1" * 400 + ".5", "9223372037", "-9223372036.5"])
def test_a_pax_mtime_out_of_range_is_an_unpack_error(value):
    assert "out of range" in refusal(tar_bytes([file_entry("f", b"x", pax={"mtime": value})]))


@pytest.mark.parametrize("value", ["inf", "nan", "1e5", "1_000", " 5"])
def test_a_pax_mtime_that_is_no_decimal_is_an_unpack_error(value):
    assert "bad PAX mtime" in refusal(tar_bytes([file_entry("f", b"x", pax={"mtime": value})]))


@pytest.mark.parametrize("field,value", [("uid", 1 << 40), ("gid", -5), ("mtime", -(1 << 62))])
def test_a_base_256_header_number_out_of_range_is_an_unpack_error(field, value):
    info, body = file_entry("f", b"x")
    setattr(info, field, value)
    assert "out of range" in refusal(tar_bytes([(info, body)], format=tarfile.GNU_FORMAT))


def test_a_device_number_out_of_range_is_an_unpack_error():
    info, body = special_entry("dev", tarfile.CHRTYPE, 1 << 40, 1)
    assert "out of range" in refusal(tar_bytes([(info, body)], format=tarfile.GNU_FORMAT))


SPARSE_01 = {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.name": "s",
             "GNU.sparse.realsize": "10", "GNU.sparse.map": "0,1"}


@pytest.mark.parametrize("pax", [
    {**SPARSE_01, "GNU.sparse.map": "a,b"},
    {**SPARSE_01, "GNU.sparse.map": "0,-1"},
    {**SPARSE_01, "GNU.sparse.realsize": "zz"},
    {"GNU.sparse.offset": "x", "GNU.sparse.numbytes": "1"},
], ids=["map-letters", "map-negative", "realsize", "sparse-0.0"])
def test_a_non_numeric_pax_sparse_map_is_an_unpack_error(pax):
    message = refusal(tar_bytes([file_entry("f", b"x", pax=pax)]))
    assert "sparse" in message and ("decimal" in message or "out of range" in message)


def test_a_non_numeric_sparse_1_0_map_is_an_unpack_error():
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
           "GNU.sparse.realsize": "10"}
    message = refusal(tar_bytes([file_entry("f", b"one\nx\n".ljust(512, b"\0") + b"x", pax=pax)]))
    assert "bad GNU sparse 1.0 map count b'one'" in message


def test_a_sparse_map_out_of_range_is_an_unpack_error():
    pax = {**SPARSE_01, "GNU.sparse.map": f"{1 << 63},1"}
    assert "out of range" in refusal(tar_bytes([file_entry("f", b"x", pax=pax)]))


def test_a_sparse_map_of_an_odd_count_is_an_unpack_error():
    pax = {**SPARSE_01, "GNU.sparse.map": "0,1,5"}
    assert "not offset/size pairs" in refusal(tar_bytes([file_entry("f", b"x", pax=pax)]))


def test_the_largest_ids_and_times_a_system_call_takes_are_read():
    pax = {"uid": "4294967294", "gid": "0", "mtime": "-9223372036"}
    [(e, _)] = entries(tar_bytes([file_entry("f", b"x", pax=pax)]))
    assert (e.uid, e.gid, e.mtime) == (4294967294, 0, -9223372036)


# ---------------------------------------------------------------- the C parser of plain headers

def test_the_c_parser_reads_a_plain_header_as_the_entry_holds_it():
    from tosi_tools._tarheader import parse

    data = tar_bytes([file_entry(LONG[:150] + "/f", b"abc", mode=0o4755, uid=7, gid=8)], format=tarfile.USTAR_FORMAT)
    assert parse(b"junk" + data, 4) == ((LONG[:150] + "/f", "0", 0o4755, 7, 8, 3, 1600000000, "", 0, 0, 3), 516)


@pytest.mark.parametrize("case", ["pax", "gnu long name", "base-256 uid", "bad checksum", "end of archive",
                                  "short", "mtime beyond time_t nanoseconds", "spaces inside a number"])
def test_the_c_parser_leaves_all_but_plain_headers_to_python(case):
    from tosi_tools._tarheader import parse

    block = bytearray(tar_bytes([file_entry("f", b"x")], format=tarfile.USTAR_FORMAT)[:512])
    if case == "pax":
        block = bytearray(tar_bytes([file_entry("f", b"x", pax={"path": "g"})], format=tarfile.PAX_FORMAT)[:512])
    elif case == "gnu long name":
        block = bytearray(tar_bytes([file_entry("n" * 120, b"x")], format=tarfile.GNU_FORMAT)[:512])
    elif case == "base-256 uid":
        block[108:116] = b"\x80" + (5).to_bytes(7, "big")
    elif case == "bad checksum":
        block[0] ^= 1
    elif case == "end of archive":
        block = bytearray(512)
    elif case == "short":
        block = block[:511]
    elif case == "mtime beyond time_t nanoseconds":
        block[136:148] = b"777777777777"
    else:
        block[100:108] = b"00 0644\0"
    if case not in ("bad checksum", "end of archive", "short"):
        block[148:156] = b"        "
        block[148:156] = b"%06o\0 " % sum(block)
    assert parse(bytes(block), 0) is None


# ---------------------------------------------------------------- the C run of small files

def take_run(data, prefix=b"d/", pos=0, **given):
    """What _tarheader.files takes from `data`: (new pos, count, data bytes, charged,
    writer tasks, redo tasks, queued keys, made paths)."""
    from tosi_tools._tarheader import files

    args = dict(max_files=1000, max_bytes=1 << 30, max_size=64 << 10, room_bytes=1 << 40, room_inodes=1 << 40,
                dir_fd=9, canonical=("d",), as_root=True, chown_all=False, euid=0, egid=0, umask=0o022)
    args.update(given)
    batch, tasks, queued, made = [], [], set(), set()
    result = files(data, pos, prefix, *args.values(), (batch, tasks, queued, made))
    return (*result, batch, tasks, queued, made)


def test_the_c_run_queues_each_plain_file_under_the_prefix_as_the_applier_would():
    data = tar_bytes([file_entry("d/a", b"abc", mode=0o640, uid=5, gid=6, mtime=7),
                      file_entry("d/b", b"", mode=0o644)], format=tarfile.USTAR_FORMAT)
    pos, count, nbytes, charged, batch, tasks, queued, made = take_run(data)
    assert (pos, count, nbytes, charged) == (3 * 512, 2, 3, 4096)
    assert batch == [(9, b"a", b"abc", 0o640, 1, 5, 6, 7_000_000_000),
                     (9, b"b", b"", 0o644, 0, 0, 0, 1_600_000_000_000_000_000)]
    assert tasks[0] == (("d",), "a", ("d/a", "0", 0o640, 5, 6, 3, 7, "", 0, 0, 3), b"abc", "d/a")
    assert queued == {(("d",), "a"), (("d",), "b")}
    assert made == {("d", "a"), ("d", "b")}


@pytest.mark.parametrize("stop", [
    file_entry("d/.wh.a"), file_entry("d/e/a"), file_entry("e/a"), file_entry("d/.."), file_entry("d/."),
    file_entry("d/s", b"x", mode=0o4755), file_entry("d/g", b"x", mode=0o2755),
    file_entry("d/big", b"x" * ((64 << 10) + 1)), file_entry("d/p", b"x", pax={"comment": "pax"}),
    dir_entry("d/sub"), symlink_entry("d/l", "a"), hardlink_entry("d/h", "d/a"),
], ids=["whiteout", "deeper", "other dir", "dotdot", "dot", "setuid", "setgid", "big", "pax", "dir",
        "symlink", "hardlink"])
def test_the_c_run_stops_at_the_first_entry_the_applier_must_see(stop):
    data = tar_bytes([file_entry("d/a", b"x"), stop, file_entry("d/z", b"z")])
    pos, count, *_ = take_run(data)
    assert (pos, count) == (1024, 1)


def test_the_c_run_stops_where_a_file_is_not_all_in_the_buffer():
    data = tar_bytes([file_entry("d/a", b"x"), file_entry("d/b", b"y" * 600)], format=tarfile.USTAR_FORMAT)
    assert take_run(data[:1024 + 512 + 1023])[:2] == (1024, 1)
    assert take_run(data[:1024 + 512 + 1024])[:2] == (2560, 2)


@pytest.mark.parametrize("limit, taken", [
    ({"max_files": 2}, 2), ({"max_bytes": 2}, 2), ({"room_inodes": 2}, 2), ({"room_bytes": 8192}, 2),
    ({"room_bytes": 4095}, 0), ({"max_size": 0}, 0),
])
def test_the_c_run_stops_at_its_limits(limit, taken):
    data = tar_bytes([file_entry(f"d/{i}", b"x") for i in range(5)])
    pos, count, nbytes, charged, *_ = take_run(data, **limit)
    assert (pos, count, nbytes, charged) == (1024 * taken, taken, taken, 4096 * taken)


@pytest.mark.parametrize("given, entry, flags", [
    ({}, file_entry("d/a", mode=0o644), 0),
    ({}, file_entry("d/a", mode=0o644, uid=1), 1),
    ({"euid": 1, "egid": 2}, file_entry("d/a", mode=0o644, uid=1, gid=2), 0),
    ({"chown_all": True}, file_entry("d/a", mode=0o644), 1),
    ({"as_root": False}, file_entry("d/a", mode=0o644, uid=1), 0),
    ({}, file_entry("d/a", mode=0o666), 2),
    ({}, file_entry("d/a", mode=0o1644), 2),
])
def test_the_c_run_asks_for_fchown_and_fchmod_where_file_fixes_would(given, entry, flags):
    *_, batch, _, _, _ = take_run(tar_bytes([entry]), **given)
    assert batch[0][4] == flags


def test_the_c_run_takes_names_after_any_prefix_and_notes_no_made_paths_without_a_set():
    from tosi_tools._tarheader import files

    data = tar_bytes([file_entry("./x/../f", b"1"), file_entry("./x/../g", b"2")], format=tarfile.USTAR_FORMAT)
    batch, tasks, queued = [], [], set()
    result = files(data, 0, b"./x/../", 9, 1 << 20, 1 << 16, 1 << 40, 1 << 40, 3, (), False, False, 0, 0, 0,
                   (batch, tasks, queued, None))
    assert result == (2048, 2, 2, 8192)
    assert queued == {((), "f"), ((), "g")}
    assert [t[4] for t in tasks] == ["./x/../f", "./x/../g"]


def test_plain_files_starts_after_the_current_entrys_data_and_moves_the_reader_on():
    data = tar_bytes([file_entry("d/a", b"x" * 700), file_entry("d/b", b"y"), file_entry("e", b"z")])
    tar = TarReader(io.BytesIO(data))
    first = next(tar)
    assert first.name == "d/a"  # its data is left unread: plain_files skips it
    batch, tasks, queued = [], [], set()
    assert tar.plain_files(b"d/", 10, 1 << 20, 1 << 16, 1 << 40, 1 << 40, 3, ("d",), False, False, 0, 0, 0,
                           (batch, tasks, queued, None)) == (1, 1, 4096)
    assert [(e.name, tar.read_data(e.size)) for e in tar] == [("e", b"z")]


def test_a_lone_zero_block_followed_by_a_header_is_refused():
    first = tar_bytes([file_entry("a", b"a")])
    second = tar_bytes([file_entry("hidden", b"h")])
    first_member = first[:1024]  # header and data block of "a"
    assert "lone zero block" in refusal(first_member + bytes(512) + second)


@pytest.mark.parametrize("ending", [bytes(512), bytes(1024), bytes(10240)])
def test_the_archive_may_end_with_one_zero_block_or_more(ending):
    data = tar_bytes([file_entry("a", b"a")])[:1024] + ending
    assert [e.name for e, _ in entries(data)] == ["a"]


# ---------------------------------------------------------------- PAX headers of times alone, in C

def python_read(data):
    """What the Python parser alone makes of `data`: [(entry's fields, mtime's type)] or its refusal."""
    saved = tarstream._parse_plain
    tarstream._parse_plain = None
    try:
        return [(tuple(getattr(e, slot) for slot in tarstream.Entry.__slots__), type(e.mtime))
                for e, _ in entries(data)]
    except UnpackError as exc:
        return str(exc)
    finally:
        tarstream._parse_plain = saved


def c_read(data, monkeypatch):
    """What a TarReader makes of `data`, and how many of its entries C parsed."""
    parsed = []
    parse = tarstream._parse_plain

    def counting(buf, pos):
        result = parse(buf, pos)
        parsed.append(result is not None)
        return result

    monkeypatch.setattr(tarstream, "_parse_plain", counting)
    try:
        read = [(tuple(getattr(e, slot) for slot in tarstream.Entry.__slots__), type(e.mtime))
                for e, _ in entries(data)]
    except UnpackError as exc:
        read = str(exc)
    return read, sum(parsed)


def test_a_gnu_posix_format_layers_members_take_the_c_path_and_keep_their_nanosecond_mtimes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    times = {}
    for i, ns in enumerate([1_700_000_000_123_456_789, 1_700_000_000_000_000_000, 1_700_000_000_100_000_000,
                            5, 1_000_000_001]):
        path = src / "d" / f"f{i}"
        path.write_bytes(b"x" * i)
        os.utime(path, ns=(ns, ns))
        times[f"./d/f{i}"] = ns
    os.utime(src / "d", ns=(1_600_000_000_987_654_321,) * 2)
    times["./d"] = 1_600_000_000_987_654_321
    out = tmp_path / "posix.tar"
    subprocess.run(["tar", "--format=posix", "-cf", out, "-C", src, "./d"], check=True)
    data = out.read_bytes()
    # A PAX header of times before every member; an mtime in it where there are nanoseconds.
    assert (data.count(b"PaxHeaders/"), data.count(b" mtime="), data.count(b" atime=")) == (6, 5, 6)

    read, in_c = c_read(data, monkeypatch)
    assert in_c == len(read) == 6
    assert {fields[0]: int(fields[6] * 1_000_000_000) for fields, _ in read} == times
    assert read == python_read(data)


@pytest.mark.parametrize("value", [
    "1700000000", "1700000000.123456789", "1700000000.000000000", "1700000000.1", "1700000000.", "7.", ".5", "-.5",
    "0", "-0", "-0.0", "-1.5", "0001700000000.5000", "00000000000000000001", "-0000000000000000001.5",
    "1.0000000001", "1.1234567891234567890000", "1." + "0" * 500, str(MAX_TIME), f"-{MAX_TIME}", f"{MAX_TIME}.000",
    f"{MAX_TIME - 1}.999999999", "-0.000000000999999999", "1.999999999999999999",
])
def test_the_c_parser_reads_a_pax_mtime_as_the_python_parser_does_an_int_or_an_exact_fraction(value, monkeypatch):
    data = pax_tar([(pax_record("mtime", value), file_entry("f", b"x"))])
    read, in_c = c_read(data, monkeypatch)
    assert in_c == 1
    assert read == python_read(data)
    [(fields, kind)] = read
    assert kind is (Fraction if "." in value else int)


def test_atime_and_ctime_are_not_read_whatever_they_hold(monkeypatch):
    records = pax_record("atime", "not a time") + pax_record("ctime", "\0\n=") + pax_record("mtime", "5.5")
    data = pax_tar([(records, file_entry("f", b"x"))])
    read, in_c = c_read(data, monkeypatch)
    assert (in_c, read) == (1, python_read(data))
    assert read[0][0][6] == Fraction(11, 2)


def test_a_pax_header_of_times_with_no_mtime_or_no_record_leaves_the_headers_mtime(monkeypatch):
    data = pax_tar([(pax_record("atime", "1.5"), file_entry("a", b"x", mtime=7)),
                    (b"", file_entry("b", b"y", mtime=8)), (b"\0" * 40, file_entry("c", mtime=9))])
    read, in_c = c_read(data, monkeypatch)
    assert (in_c, read) == (3, python_read(data))
    assert [fields[6] for fields, _ in read] == [7, 8, 9]


def test_the_last_of_repeated_pax_mtimes_counts_in_c_as_in_python(monkeypatch):
    data = pax_tar([(pax_record("mtime", "1.5") + pax_record("mtime", "2.25"), file_entry("f", b"x"))])
    read, in_c = c_read(data, monkeypatch)
    assert (in_c, read) == (1, python_read(data))
    assert read[0][0][6] == Fraction(9, 4)


@pytest.mark.parametrize("records", [
    pax_record("mtime", "1.5") + pax_record("path", "g"),
    pax_record("comment", "x") + pax_record("mtime", "1.5"),
    pax_record("uid", "5"), pax_record("size", "1"), pax_record("SCHILY.xattr.user.a", "1"),
    pax_record("GNU.sparse.major", "1"), pax_record("mtim", "1"), pax_record("mtime ", "1"),
    pax_record("MTIME", "1"), pax_record(" mtime", "1"), pax_record("mtime\0", "1"),
], ids=["path", "comment", "uid", "size", "xattr", "sparse", "short key", "key with a space",
        "capitals", "key after two spaces", "key with a nul"])
def test_a_pax_header_with_a_record_other_than_times_falls_back_to_the_python_path(records, monkeypatch):
    data = pax_tar([(records, file_entry("f", b"x"))])
    assert tarstream._parse_plain(data, 0) is None
    read, in_c = c_read(data, monkeypatch)
    assert (in_c, read) == (0, python_read(data))


@pytest.mark.parametrize("records, refusal_says", [
    (b"3a mtime=1\n", "malformed PAX header length"),
    (b"+12 mtime=1\n", "malformed PAX header length"),
    (b" 12 mtime=1\n", "malformed PAX header length"),
    (b"12mtime=1\n", "malformed PAX header"),
    (b"12", "malformed PAX header"),
    (b"13 mtime=1\n", "malformed PAX header record"),  # one too long
    (b"10 mtime=1\n", "malformed PAX header record"),  # one too short: no newline at its end
    (b"0 mtime=1\n", "malformed PAX header record"),
    (b"12 mtime=1x", "malformed PAX header record"),
    (b"11 mtime_1\n", "malformed PAX header record"),
    (b"3 \n", "malformed PAX header record"),
    (b"2 ", "malformed PAX header record"),
    (b"99999999999999999999999999 mtime=1\n", "malformed PAX header record"),
    (pax_record("mtime", "1.5") + b"12 mtime=1x", "malformed PAX header record"),
    (pax_record("mtime", "") , "bad PAX mtime"),
    (pax_record("mtime", "-"), "bad PAX mtime"),
    (pax_record("mtime", "."), "bad PAX mtime"),
    (pax_record("mtime", "1.2.3"), "bad PAX mtime"),
    (pax_record("mtime", "1e9"), "bad PAX mtime"),
    (pax_record("mtime", "+1"), "bad PAX mtime"),
    (pax_record("mtime", " 1"), "bad PAX mtime"),
    (pax_record("mtime", "1\n"), "bad PAX mtime"),
    (pax_record("mtime", "\u0661"), "bad PAX mtime"),  # an Arabic-Indic one: a digit to str.isdigit
    (pax_record("mtime", "bad") + pax_record("mtime", "1"), "bad PAX mtime"),
    (pax_record("mtime", "0" * 21), "out of range"),
    (pax_record("mtime", "-" + "0" * 20 + ".5"), "out of range"),
    (pax_record("mtime", str(MAX_TIME + 1)), "out of range"),
    (pax_record("mtime", f"{MAX_TIME}.000000001"), "out of range"),
    (pax_record("mtime", f"-{MAX_TIME}.1"), "out of range"),
    (pax_record("mtime", "9" * 20), "out of range"),
    (pax_record("mtime", "1" * 400 + ".5"), "out of range"),
])
def test_a_malformed_pax_header_of_times_is_left_to_python_which_refuses_it(records, refusal_says, monkeypatch):
    data = pax_tar([(records, file_entry("f", b"x"))])
    assert tarstream._parse_plain(data, 0) is None
    read, in_c = c_read(data, monkeypatch)
    assert read == python_read(data)
    assert refusal_says in read


@pytest.mark.parametrize("value", ["1." + "1" * 19, "-0." + "0" * 30 + "1", f"{MAX_TIME - 1}.999999999999999999"])
def test_a_pax_mtime_with_more_fraction_digits_than_c_holds_exactly_is_left_to_python(value, monkeypatch):
    data = pax_tar([(pax_record("mtime", value), file_entry("f", b"x"))])
    assert tarstream._parse_plain(data, 0) is None
    read, _ = c_read(data, monkeypatch)
    assert read == python_read(data) and read[0][1] is Fraction


@pytest.mark.parametrize("case", ["pax after pax", "long name after pax", "end after pax", "pax at the end",
                                  "header cut", "records cut", "bad checksum", "base-256 size", "huge size"])
def test_the_c_parser_leaves_a_pax_header_of_times_to_python_unless_a_plain_header_follows_it_whole(case):
    times = gnu_posix_times()
    data = pax_tar([(times, file_entry("f", b"x"))])
    if case == "pax after pax":
        data = pax_header(times) + data
    elif case == "long name after pax":
        data = pax_header(times) + tar_bytes([file_entry("n" * 120, b"x")], format=tarfile.GNU_FORMAT)
    elif case == "end after pax":
        data = pax_header(times) + bytes(1024)
    elif case == "pax at the end":
        data = pax_header(times)
    elif case == "header cut":
        data = data[:1024 + 511]
    elif case == "records cut":
        data = data[:512 + len(times) - 1]
    elif case == "bad checksum":
        data = data[:100] + b"7" + data[101:]
    elif case == "base-256 size":
        data = with_field(data, 124, 12, b"\x80" + len(times).to_bytes(11, "big"))
    else:
        data = with_field(pax_header(times + b"\0" * (16 << 20)), 124, 12, b"%011o" % ((16 << 20) + 1))
    assert tarstream._parse_plain(data, 0) is None


def test_the_c_parser_says_where_the_data_starts_past_a_pax_header_of_times():
    times = gnu_posix_times(atime="1" * 600)  # records of two blocks
    data = b"junk" + pax_tar([(times, file_entry("f", b"abc"))])
    fields, data_at = tarstream._parse_plain(data, 4)
    assert fields == ("f", "0", 0o644, 0, 0, 3, Fraction(1700000000123456789, 10**9), "", 0, 0, 3)
    assert data_at == 4 + 512 + 1024 + 512 and data[data_at:data_at + 3] == b"abc"


def test_the_c_run_takes_small_files_across_pax_headers_of_times_with_their_nanosecond_mtimes():
    members = [(gnu_posix_times(mtime), file_entry(f"d/{i}", b"x" * i)) for i, mtime in
               enumerate(["1700000000.123456789", "1700000000", "-1.5", "-0.0000000005", "2.1234567899"])]
    members.append((pax_record("atime", "1"), file_entry("d/plain", b"p", mtime=9)))
    data = pax_tar(members)
    pos, count, nbytes, charged, batch, tasks, queued, made = take_run(data)
    assert (pos, count, nbytes) == (len(data) - 1024, 6, 0 + 1 + 2 + 3 + 4 + 1)
    assert [task[7] for task in batch] == [1700000000123456789, 1700000000000000000, -1500000000, 0, 2123456789,
                                           9_000_000_000]
    assert [redo[2][6] for redo in tasks] == [Fraction(1700000000123456789, 10**9), 1700000000, Fraction(-3, 2),
                                              Fraction(-1, 2 * 10**9), Fraction(21234567899, 10**10), 9]
    assert [type(redo[2][6]) for redo in tasks] == [Fraction, int, Fraction, Fraction, Fraction, int]
    # The fields are what the reader gives each entry, the Python parser's too.
    assert ([(tuple(getattr(tarstream.entry_of(redo[2]), slot) for slot in tarstream.Entry.__slots__),
              type(redo[2][6])) for redo in tasks] == python_read(data))


@pytest.mark.parametrize("records", [pax_record("path", "d/x"), pax_record("mtime", "1e9"), b"12 mtime=1x",
                                     pax_record("mtime", "1." + "1" * 19)])
def test_the_c_run_stops_at_a_pax_header_it_leaves_to_python(records):
    data = pax_tar([(gnu_posix_times(), file_entry("d/a", b"a")), (records, file_entry("d/b", b"b")),
                    (gnu_posix_times(), file_entry("d/c", b"c"))])
    pos, count, *_ = take_run(data)
    assert (pos, count) == (2048, 1)  # at the second PAX header, for the reader to read


def test_the_c_run_stops_at_a_pax_header_of_times_before_an_entry_the_applier_must_see():
    data = pax_tar([(gnu_posix_times(), file_entry("d/a", b"a")), (gnu_posix_times(), file_entry("d/.wh.b")),
                    (gnu_posix_times(), file_entry("d/c", b"c"))])
    pos, count, *_ = take_run(data)
    assert (pos, count) == (2048, 1)


def test_the_c_run_stops_where_a_file_after_a_pax_header_of_times_is_not_all_in_the_buffer():
    data = pax_tar([(gnu_posix_times(), file_entry("d/a", b"a")), (gnu_posix_times(), file_entry("d/b", b"b"))])
    for cut in (2048 + 511, 2048 + 1023, 2048 + 1535):
        assert take_run(data[:cut])[:2] == (2048, 1)
    assert take_run(data[:4096])[:2] == (4096, 2)
