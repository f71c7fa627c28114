"""Robustness suite, fuzzing: the tar reader and the layer applier on raw bytes (hypothesis).

Each example is a layer hypothesis builds (files, dirs, symlinks, hardlinks,
devices, whiteouts, opaque markers, names with "..", absolute names and links
out of the root, in ustar, GNU or PAX form), then damages at the byte level
(flipped bytes, overwritten header fields, truncation, appended junk, in the tar
or in its gzip/zstd stream), and applies in-process with layer.apply_layer, in
flat mode over a lower layer of symlinks that point out of the root and in
overlay mode into an empty directory. What must hold for every example:

- nothing outside the root is created, changed or removed (the sandbox around
  the root, three levels of parents with victims in each, is compared entry by
  entry, directory mtimes included);
- the only exceptions are the library's typed errors (TosiError subclasses).
"""

import ast
import gzip
import io
import os
import re
import shutil
import tarfile

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from tests.support.images import (OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, dir_entry, file_entry,
                                  hardlink_entry, pax_record, pax_tar, special_entry, symlink_entry, tar_bytes)
from tests.support.robustness import hypothesis_settings
from tests.support.staging import snapshot
from tosi_tools import layer, saferoot, space, tarstream
from tosi_tools.errors import TosiError

pytestmark = [pytest.mark.robustness("fuzz"),
              pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")]

DEPTH = ("s1", "s2", "s3")  # the root is sandbox/s1/s2/s3/root: "../" climbs reach a victim
MEDIA = {"tar": OCI_LAYER_TAR, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}


class Sandbox:
    """sandbox/{victim, s1/{victim, s2/{victim, s3/{victim, root}}}}, and what it held before."""

    def __init__(self, base):
        self.base = str(base)
        parts = [self.base, *DEPTH]
        for i in range(len(parts)):
            directory = os.path.join(*parts[:i + 1])
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "victim"), "wb") as f:
                f.write(b"victim")
        self.parent = os.path.join(*parts)
        self.root = os.path.join(self.parent, "root")
        self.before = self._outside()

    def _outside(self):
        parent, root = os.path.relpath(self.parent, self.base), os.path.relpath(self.root, self.base)
        tree = {path: info for path, info in snapshot(self.base, with_dir_mtimes=True).items()
                if path != root and not path.startswith(root + "/")}
        tree[parent].pop("mtime")  # moves with the root's removal and making; its mode, owner, xattrs stay
        return tree

    def fresh_root(self):
        if os.path.lexists(self.root):
            shutil.rmtree(self.root)  # as root: modes of 000 are no obstacle
        os.mkdir(self.root)
        return self.root

    def assert_unchanged(self):
        after = self._outside()
        changed = {p: (after.get(p), self.before.get(p)) for p in {*after, *self.before}
                   if after.get(p) != self.before.get(p)}
        assert changed == {}, f"outside the root: {changed}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return Sandbox(tmp_path_factory.mktemp("fuzz-sandbox"))


# ---------------------------------------------------------------- layers, then damage

segments = st.sampled_from(["a", "b", "esc", "up", "..", ".", "", ".wh.a", ".wh.esc", ".wh..wh..opq",
                            "victim", "root", "s3"])
names = st.one_of(st.lists(segments, min_size=1, max_size=5).map("/".join),
                  st.lists(segments, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p)),
                  st.text(max_size=12))
link_targets = st.one_of(names, st.sampled_from(["..", "../..", "../../..", "../../../victim", "/", "/tmp",
                                                 "/etc/passwd"]))


@st.composite
def entries(draw):
    kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "chr", "blk", "fifo"]))
    name = draw(names)
    mode = draw(st.sampled_from([0o644, 0o755, 0o000, 0o4755, 0o1777, 0o7777]))
    uid, gid = draw(st.sampled_from([0, 1000, 65534, 2**21 - 1])), draw(st.sampled_from([0, 100, 65534]))
    if kind == "file":
        pax = draw(st.one_of(st.none(), st.dictionaries(
            st.sampled_from(["SCHILY.xattr.user.k", "SCHILY.xattr.trusted.overlay.opaque",
                             "SCHILY.xattr.security.capability", "SCHILY.xattr.system.posix_acl_access",
                             "size", "uid", "mtime", "path", "linkpath", "GNU.sparse.map",
                             "GNU.sparse.size", "GNU.sparse.major", "GNU.sparse.minor"]),
            st.text(string_chars, max_size=12), max_size=2)))
        return file_entry(name, draw(st.binary(max_size=300)), mode=mode, uid=uid, gid=gid, pax=pax)
    if kind == "dir":
        return dir_entry(name, mode=mode, uid=uid, gid=gid)
    if kind == "symlink":
        return symlink_entry(name, draw(link_targets), uid=uid, gid=gid)
    if kind == "hardlink":
        return hardlink_entry(name, draw(link_targets))
    types = {"chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}
    return special_entry(name, types[kind], draw(st.sampled_from([0, 1, 7])), draw(st.sampled_from([0, 3, 5])),
                         mode=mode, uid=uid, gid=gid)


string_chars = "0123456789,.-abcxyz/ "


# GNU tar --format=posix: a PAX header of times (atime, ctime, mtime) before every member,
# which C parses too; here also with times and records it must leave to Python.
POSIX = "gnu posix"
MAX_TIME = tarstream.MAX_TIME
time_texts = st.one_of(
    st.builds(lambda sign, whole, dot, fraction: f"{sign}{whole}{dot}{fraction}",
              st.sampled_from(["", "", "-"]),
              st.one_of(st.integers(0, 2 * MAX_TIME).map(str), st.sampled_from(["", "0", "00001", "0" * 20])),
              st.sampled_from([".", ".", ""]),
              st.one_of(st.text("0123456789", max_size=12), st.text("0123456789", min_size=17, max_size=40),
                        st.sampled_from(["123456789", "000000000", "9" * 18, "9" * 19, "0" * 30 + "1"]))),
    st.sampled_from([str(MAX_TIME), f"{MAX_TIME}.0", f"{MAX_TIME}.000000001", f"-{MAX_TIME}", f"-{MAX_TIME}.5",
                     str(MAX_TIME + 1), "9" * 20, "-" + "9" * 19, "0" * 21, "1" * 400 + ".5", ".", "-", "-.",
                     "", "1e9", "+1", " 1", "1 ", "1.2.3", "inf", "\u0661"]),
    st.text("0123456789.-+e \n=\0", max_size=24))


@st.composite
def pax_time_record(draw):
    """One record of a PAX header of times: mostly well-formed, some subtly not."""
    key = draw(st.sampled_from(["mtime", "mtime", "atime", "ctime", "path", "comment", "uid", "mtim", "MTIME",
                                "mtime ", " mtime", "SCHILY.xattr.user.k", "GNU.sparse.major", "mtime\0"]))
    value = draw(time_texts) if key.strip() in ("mtime", "atime", "ctime", "mtim", "MTIME") else "x"
    record = pax_record(key, value.encode("utf-8", "surrogateescape"))
    how = draw(st.sampled_from(["good"] * 8 + ["length+1", "length-1", "+length", "0length", "length ", "space",
                                               "no newline", "no =", "nul", "huge length", "no length"]))
    length, _, rest = record.partition(b" ")
    if how == "length+1":
        record = b"%d %s" % (int(length) + 1, rest)
    elif how == "length-1":
        record = b"%d %s" % (int(length) - 1, rest)
    elif how == "+length":
        record = b"+" + record[1:]
    elif how == "0length":  # a leading zero, which takes the place of a digit: still well-formed
        record = b"0%d %s" % (int(length) - 1, rest) if len(b"%d" % (int(length) - 1)) == len(length) else record
    elif how == "length ":
        record = length + b"  " + rest[:-1] + b"\n"
    elif how == "space":
        record = b" " + record[1:]
    elif how == "no newline":
        record = record[:-1] + b"x"
    elif how == "no =":
        record = record.replace(b"=", b"_", 1)
    elif how == "nul":
        record = record[:-2] + b"\0\n"
    elif how == "huge length":
        record = b"9" * 25 + b" " + rest
    elif how == "no length":
        record = rest
    return record


@st.composite
def pax_times(draw, good=False):
    """The records of a PAX header of times (bytes), None for no PAX header; `good`: well-formed ones."""
    if good:
        times = [(key, draw(st.one_of(st.integers(0, 2**33).map(str),
                                       st.builds("{}.{:09d}".format, st.integers(-2**33, 2**33),
                                                 st.integers(0, 10**9 - 1)))))
                 for key in draw(st.sampled_from([["mtime", "atime", "ctime"], ["atime", "ctime"], ["mtime"]]))]
        return b"".join(pax_record(key, value) for key, value in times)
    if draw(st.integers(0, 5)) == 0:
        return None
    records = b"".join(draw(st.lists(pax_time_record(), max_size=4)))
    if draw(st.integers(0, 5)) == 0:
        records += b"\0" * draw(st.integers(1, 20)) + draw(st.binary(max_size=20))  # padding, then anything
    return records


def _tar(entry_list, fmt, times=None):
    try:
        if fmt == POSIX:
            return pax_tar(list(zip(times, entry_list)))
        return tar_bytes(entry_list, format=fmt)
    except (ValueError, UnicodeError, tarfile.TarError):  # a name this format cannot hold
        return tar_bytes([], format=tarfile.USTAR_FORMAT if fmt == POSIX else fmt)


@st.composite
def damaged_tars(draw):
    """(tar bytes, description of the damage)."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, POSIX]))
    entry_list = draw(st.lists(entries(), max_size=8))
    times = [draw(pax_times()) for _ in entry_list] if fmt == POSIX else None
    data = bytearray(_tar(entry_list, fmt, times))
    damage = []
    for _ in range(draw(st.integers(0, 4))):
        how = draw(st.sampled_from(["flip", "field", "truncate", "append", "none"]))
        if how == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= draw(st.integers(1, 255))
            damage.append(f"flip@{at}")
        elif how == "field" and len(data) >= 512:
            # a header field (name, mode, uid, size, mtime, chksum, type, linkname, magic, prefix) of a block
            block = draw(st.integers(0, len(data) // 512 - 1)) * 512
            start, width = draw(st.sampled_from([(0, 100), (100, 8), (108, 8), (124, 12), (136, 12), (148, 8),
                                                 (156, 1), (157, 100), (257, 8), (345, 155)]))
            value = draw(st.one_of(st.binary(min_size=width, max_size=width),
                                   st.sampled_from([b"7" * width, b"\x80" + b"\xff" * (width - 1),
                                                    b"\xff" * width, b" " * width, b"0" * width])))
            data[block + start:block + start + width] = value[:width]
            damage.append(f"field@{block + start}")
        elif how == "truncate" and data:
            cut = draw(st.integers(0, len(data)))
            del data[cut:]
            damage.append(f"truncate@{cut}")
        elif how == "append":
            data += draw(st.binary(max_size=1100))
            damage.append("append")
    return bytes(data), damage


@st.composite
def damaged_layers(draw):
    """(blob bytes, media type, description of the damage)."""
    data, damage = draw(damaged_tars())
    compression = draw(st.sampled_from(["tar", "tar", "gzip", "zstd"]))
    blob = data
    if compression == "gzip":
        blob = gzip.compress(blob, mtime=0)
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(blob)
    if compression != "tar" and blob and draw(st.booleans()):
        at = draw(st.integers(0, len(blob) - 1))
        blob = blob[:at] + bytes([blob[at] ^ 0x55]) + blob[at + 1:]
        damage.append(f"{compression}-flip@{at}")
    return blob, MEDIA[compression], damage


LOWER = tar_bytes([symlink_entry("esc", "../../.."), symlink_entry("up", "/"), symlink_entry("victim", "../victim"),
                   dir_entry("a"), file_entry("a/f", b"f")])


def _apply(root, blob, media_type, mode):
    try:
        return layer.apply_layer(root, io.BytesIO(blob), media_type, mode=mode, layer_name="fuzzed",
                                 limits=layer.Limits(max_bytes=64 << 20, max_entries=10_000))
    except TosiError:
        return None


@pytest.mark.parametrize("mode", [layer.FLAT, layer.OVERLAY])
@hypothesis_settings(150, 3000)
@given(case=damaged_layers())
def test_damaged_layers_touch_nothing_outside_the_root_and_raise_only_typed_errors(robustness, sandbox, mode,
                                                                                 case):
    blob, media_type, damage = case
    robustness.add(cases=1, faults=len(damage), corrupted=sum(d.split("@")[0].endswith("flip") for d in damage))
    root = sandbox.fresh_root()
    if mode == layer.FLAT:
        layer.apply_layer(root, io.BytesIO(LOWER), OCI_LAYER_TAR, mode=layer.FLAT, layer_name="lower")
    _apply(root, blob, media_type, mode)
    sandbox.assert_unchanged()


@hypothesis_settings(100, 2000)
@given(data=st.binary(max_size=4096), media=st.sampled_from(sorted(MEDIA.values())))
def test_random_bytes_touch_nothing_outside_the_root_and_raise_only_typed_errors(robustness, sandbox, data,
                                                                                 media):
    robustness.add(cases=1)
    root = sandbox.fresh_root()
    _apply(root, data, media, layer.FLAT)
    sandbox.assert_unchanged()


# ---------------------------------------------------------------- runs of small files taken in C

run_names = st.sampled_from(["a/f", "a/g", "./a/f", "a/.wh.f", "a/b/f", "a//f", "/a/f", "a/../a/f", "f", "a/.."])


@st.composite
def small_files(draw):
    name = draw(run_names) + draw(st.sampled_from(["", "1", "2"]))
    return file_entry(name, draw(st.binary(max_size=1100)), mode=draw(st.sampled_from([0o644, 0o4755, 0o1777])),
                      uid=draw(st.sampled_from([0, 1000])), gid=draw(st.sampled_from([0, 100])))


WARM_UP = [file_entry(f"a/w{i}", b"w" * i) for i in range(layer.WRITER_AFTER_FILES + 2)]
WARM_UP_BYTES = sum(512 + -(-len(data) // 512) * 512 for _, data in WARM_UP)
WARM_UP_TIMES = pax_record("mtime", "1700000000.5") + pax_record("atime", "1") + pax_record("ctime", "2")


@st.composite
def damaged_runs(draw):
    """(tar bytes, description of the damage): enough small files to start the file
    writer, then mostly small files in few directories (runs the C code takes) with
    other entries among them, damaged past the first files."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, POSIX]))
    body = draw(st.lists(st.one_of(small_files(), small_files(), small_files(), entries()), max_size=60))
    times = None
    warm_up_bytes = WARM_UP_BYTES
    if fmt == POSIX:  # mostly PAX headers of times C takes, in runs too
        times = [WARM_UP_TIMES] * len(WARM_UP) + [draw(st.one_of(pax_times(good=True), pax_times(good=True),
                                                                  pax_times())) for _ in body]
        warm_up_bytes = len(pax_tar(list(zip(times, WARM_UP)), end=False))
    data = bytearray(_tar(WARM_UP + body, fmt, times))
    damage = []
    for _ in range(draw(st.integers(0, 3))):
        if len(data) <= warm_up_bytes:
            break
        at = draw(st.integers(warm_up_bytes, len(data) - 1))
        if draw(st.booleans()):
            data[at] ^= draw(st.integers(1, 255))
            damage.append(f"flip@{at}")
        else:
            del data[at:]
            damage.append(f"truncate@{at}")
    return bytes(data), damage


def _applied(root, data, mode, runs):
    """"ok" or the error applying the tar `data` gave, with or without runs taken in C."""
    plain_files = tarstream._plain_files
    if not runs:
        tarstream._plain_files = None
    try:
        layer.apply_layer(root, io.BytesIO(data), OCI_LAYER_TAR, mode=mode, layer_name="fuzzed",
                          limits=layer.Limits(max_bytes=64 << 20, max_entries=10_000,
                                              reserve=space.Reserve.parse("0")))
        return "ok"
    except TosiError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        tarstream._plain_files = plain_files


def _failed_path(outcome):
    """The path in the root of the entry an applier's error names, or None."""
    found = re.match(r"\w+: layer fuzzed: entry ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"): ", outcome)
    if not found:
        return None
    try:
        return "/".join(saferoot.clean_name(ast.literal_eval(found[1]))) or None
    except (TosiError, ValueError, SyntaxError):
        return None


@pytest.mark.parametrize("mode", [layer.FLAT, layer.OVERLAY])
@hypothesis_settings(100, 2000)
@given(case=damaged_runs())
def test_damaged_runs_of_small_files_give_what_they_give_without_runs_and_stay_in_the_root(robustness, sandbox,
                                                                                         mode, case):
    data, damage = case
    robustness.add(cases=1, faults=len(damage), corrupted=sum(d.startswith("flip") for d in damage))
    assert tarstream._plain_files is not None, "tosi_tools._tarheader was not built"
    results = []
    for runs in (True, False):
        root = sandbox.fresh_root()
        if mode == layer.FLAT:
            layer.apply_layer(root, io.BytesIO(LOWER), OCI_LAYER_TAR, mode=layer.FLAT, layer_name="lower")
        outcome = _applied(root, data, mode, runs)
        sandbox.assert_unchanged()
        # An overlay whiteout (char 0/0) is made with the time it is made; so is the file
        # an error stopped the applier making (say, at an xattr the filesystem refused).
        failed = _failed_path(outcome)
        tree = {path: {k: v for k, v in node.items()
                       if not (k == "mtime" and (node.get("rdev") == (0, 0) or path == failed))}
                for path, node in snapshot(root).items()}
        results.append((outcome, tree))
    assert results[0] == results[1], damage


# Found by the fuzz test above: one flipped byte of a gzip stream, as hypothesis shrank it.
CORRUPT_GZIP = (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\xb8\xc1\x01\r\x00\x00\x00\xc2\xa0\xf7Om\x0e7"
                b"\xa0\x00\x00\x00\x00\x00\x00\x00\x00\x00\x807\x03\x9a\xde\x1d'\x00(\x00\x00")


def test_a_corrupt_gzip_deflate_block_is_an_unpack_error(robustness, sandbox):
    robustness.add(cases=1, faults=1, corrupted=1)
    root = sandbox.fresh_root()
    try:
        layer.apply_layer(root, io.BytesIO(CORRUPT_GZIP), OCI_LAYER_GZIP, layer_name="corrupt")
    except TosiError:
        pass
    except Exception as exc:
        raise AssertionError(f"untyped {type(exc).__module__}.{type(exc).__name__}: {exc}") from exc
    sandbox.assert_unchanged()


def _entries_read(data, c_parser):
    """What a TarReader makes of `data`: every entry's fields, then the error it ended with."""
    saved = tarstream._parse_plain
    tarstream._parse_plain = c_parser
    try:
        reader = tarstream.TarReader(io.BytesIO(data))
        read = []
        try:
            for entry in reader:
                # (the mtime's type too: Fraction(5) == 5)
                read.append((*(getattr(entry, slot) for slot in tarstream.Entry.__slots__), type(entry.mtime)))
                if entry.data_size and reader.pending:
                    read.append(reader.read_data(min(reader.pending, 100)))
        except TosiError as exc:
            read.append(str(exc))
        return read
    finally:
        tarstream._parse_plain = saved


@hypothesis_settings(300, 5000)
@given(case=damaged_tars())
def test_the_c_header_parser_reads_every_tar_as_the_python_parser_does(robustness, case):
    data, damage = case
    robustness.add(cases=1, faults=len(damage), corrupted=sum(d.startswith("flip") for d in damage))
    assert tarstream._parse_plain is not None, "tosi_tools._tarheader was not built"
    assert _entries_read(data, tarstream._parse_plain) == _entries_read(data, None), damage
