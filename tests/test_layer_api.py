"""The in-process API the umbrella command and streaming callers use: any stream in, records out."""

import io
import logging
import os
import pickle
import shutil
import stat
import tarfile
import tempfile
import threading

import pytest

from tests.support.images import (
    DOCKER_FOREIGN_LAYER, DOCKER_LAYER_GZIP, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD,
    dir_entry, file_entry, make_layer, opaque_entry, special_entry, symlink_entry, whiteout_entry,
)
from tosi_tools import compression, layer, overlayfs, unpack
from tosi_tools.errors import UnpackError, UsageError
from tosi_tools.plan import new_image_record, new_layer_record


def pipe_stream(data):
    """A non-seekable reader fed by a thread, like a download in flight."""
    read_fd, write_fd = os.pipe()

    def feed():
        with os.fdopen(write_fd, "wb") as w:
            w.write(data)

    thread = threading.Thread(target=feed)
    thread.start()
    return os.fdopen(read_fd, "rb", buffering=0), thread


def test_apply_layer_reads_a_non_seekable_stream(tmp_path):
    data = make_layer([file_entry("big", os.urandom(3 << 20)), file_entry("small", b"s")]).data
    stream, feeder = pipe_stream(data)
    with stream:
        stats = layer.apply_layer(str(tmp_path), stream, DOCKER_LAYER_GZIP, layer_name="piped")
    feeder.join()
    assert sorted(os.listdir(tmp_path)) == ["big", "small"]
    assert stats.entries == 2 and stats.bytes == (3 << 20) + 1


def test_empty_blob_is_an_empty_layer(tmp_path):
    stats = layer.apply_layer(str(tmp_path), io.BytesIO(b""), OCI_LAYER_TAR)
    assert os.listdir(tmp_path) == [] and stats.entries == 0


@pytest.mark.parametrize("media_type,expected", [
    (DOCKER_LAYER_GZIP, "gzip"), (DOCKER_FOREIGN_LAYER, "gzip"), (OCI_LAYER_GZIP, "gzip"),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "gzip"),
    (OCI_LAYER_ZSTD, "zstd"), (OCI_LAYER_TAR, "tar"),
])
def test_compression_follows_the_media_type(media_type, expected):
    assert compression.compression_of(media_type) == expected


@pytest.mark.parametrize("media_type", ["application/vnd.oci.image.layer.v1.tar+lz4", "text/plain", None])
def test_unknown_media_type_is_an_unpack_error(media_type):
    with pytest.raises(UnpackError, match="unsupported layer media type"):
        compression.compression_of(media_type)


def test_overlay_mode_needs_an_empty_dir_per_layer_api(tmp_path):
    lay = make_layer([file_entry("a", b"a"), whiteout_entry("b")])
    stats = layer.apply_layer(str(tmp_path), io.BytesIO(lay.data), lay.media_type, mode=layer.OVERLAY)
    assert stats.whiteouts == 1
    assert stat.S_ISCHR(os.lstat(tmp_path / "b").st_mode)


def _records(tmp_path, layers):
    workdir = str(tmp_path / "workdir")
    os.makedirs(os.path.join(workdir, "layers"))
    records = []
    for i, lay in enumerate(layers):
        path = os.path.join(workdir, "layers", lay.digest.split(":")[1])
        with open(path, "wb") as f:
            f.write(lay.data)
        records.append(new_layer_record(i, lay.descriptor(), path=path))
    image = new_image_record(workdir=workdir, layerCount=len(layers))
    return workdir, image, records


def test_unpack_plan_into_sets_rootfs_and_yields_applied_records(tmp_path):
    workdir, image, records = _records(tmp_path, [make_layer([file_entry("a")]), make_layer([file_entry("b")])])
    target = str(tmp_path / "rootfs")
    out = list(unpack.unpack_plan(image, iter(records), workdir=workdir, into=target))
    assert image["rootfs"] == target
    assert [(r["index"], r["applied"]) for r in out] == [(0, True), (1, True)]
    assert sorted(os.listdir(target)) == ["a", "b"]


def test_unpack_plan_checks_the_into_target_before_anything(tmp_path):
    workdir, image, records = _records(tmp_path, [make_layer([file_entry("a")])])
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs" / "x").write_bytes(b"")
    with pytest.raises(UsageError, match="not empty"):
        unpack.unpack_plan(image, iter(records), workdir=workdir, into=str(tmp_path / "rootfs"))
    assert "rootfs" not in image


def test_extract_layer_to_overlay_takes_a_stream(tmp_path):
    lay = make_layer([file_entry("streamed", b"s")])
    record = new_layer_record(0, lay.descriptor())
    out = unpack.extract_layer_to_overlay(str(tmp_path / "wd"), record, stream=io.BytesIO(lay.data))
    assert os.listdir(out["overlay"]) == ["streamed"]
    assert out["link"] and "path" not in out


def _as_nobody(func):
    """Run func() in a forked child with uid/gid 65534; returns (result, log lines) it sent back."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_fd)
            records = []
            handler = logging.Handler()
            handler.emit = lambda rec: records.append(rec.getMessage())
            logging.getLogger("tosi").addHandler(handler)
            logging.getLogger("tosi").setLevel(logging.INFO)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                result = ("ok", func())
            except Exception as exc:
                result = ("error", f"{type(exc).__name__}: {exc}")
            with os.fdopen(write_fd, "wb") as w:
                pickle.dump((result, records), w)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        data = r.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the unprivileged child failed"
    return pickle.loads(data)


@pytest.fixture
def nobody_dir():
    # Outside pytest's tmp_path, whose parents only root may enter.
    path = tempfile.mkdtemp(prefix="tosi-nobody-", dir="/tmp")
    os.chown(path, 65534, 65534)
    yield path
    shutil.rmtree(path)


def test_as_non_root_devices_are_skipped_with_one_counting_warning(nobody_dir):
    lay = make_layer([special_entry("null", tarfile.CHRTYPE, 1, 3), special_entry("sda", tarfile.BLKTYPE, 8, 0),
                      special_entry("fifo", tarfile.FIFOTYPE), file_entry("f", b"x", uid=0)])
    (result, logs) = _as_nobody(lambda: layer.apply_layer(nobody_dir, io.BytesIO(lay.data), lay.media_type,
                                                          layer_name="L").skipped_devices)
    assert result == ("ok", 2)
    assert sorted(os.listdir(nobody_dir)) == ["f", "fifo"]
    assert [m for m in logs if "device" in m] == ["layer L: skipped 2 device node(s): creating them needs root"]
    assert os.stat(os.path.join(nobody_dir, "f")).st_uid == 65534
    assert len([m for m in logs if "not running as root" in m]) == 1


def test_as_non_root_per_layer_whiteouts_in_root_form_fail_clearly(nobody_dir):
    lay = make_layer([whiteout_entry("gone")])
    (result, _) = _as_nobody(lambda: layer.apply_layer(nobody_dir, io.BytesIO(lay.data), lay.media_type,
                                                       mode=layer.OVERLAY, layer_name="L",
                                                       form=overlayfs.TRUSTED_FORM))
    assert result[0] == "error"
    assert "needs root" in result[1] and "--into" in result[1]


def test_as_non_root_per_layer_layers_take_the_user_form(nobody_dir):
    lay = make_layer([whiteout_entry("gone"), dir_entry("d"), opaque_entry("d")])
    (result, _) = _as_nobody(lambda: layer.apply_layer(nobody_dir, io.BytesIO(lay.data), lay.media_type,
                                                       mode=layer.OVERLAY, layer_name="L").whiteouts)
    assert result == ("ok", 2)
    assert overlayfs.is_whiteout(os.lstat(os.path.join(nobody_dir, "gone")))
    assert os.getxattr(os.path.join(nobody_dir, "d"), overlayfs.USER_OPAQUE_XATTR) == b"y"


def test_filesystem_error_names_layer_and_entry(tmp_path):
    lay = make_layer([file_entry("n" * 300, b"x")])
    with pytest.raises(UnpackError,
                       match=r"layer L: entry 'n{40}'\.\.\.'n{40}' \(300 characters\): File name too long"):
        layer.apply_layer(str(tmp_path), io.BytesIO(lay.data), lay.media_type, layer_name="L")


def test_whiteouts_count_towards_the_entry_cap(tmp_path):
    lay = make_layer([whiteout_entry(f"w{i}") for i in range(11)])
    with pytest.raises(UnpackError, match="more than 10 entries"):
        layer.apply_layer(str(tmp_path), io.BytesIO(lay.data), lay.media_type, limits=layer.Limits(max_entries=10))


def test_entry_cap_allows_exactly_the_cap(tmp_path):
    lay = make_layer([file_entry(f"f{i}") for i in range(10)])
    stats = layer.apply_layer(str(tmp_path), io.BytesIO(lay.data), lay.media_type, limits=layer.Limits(max_entries=10))
    assert stats.entries == 10


@pytest.mark.parametrize("into", [True, False])
def test_unpack_plan_reads_blobs_from_open_stream_when_given(tmp_path, into):
    layers = [make_layer([file_entry("a")]), make_layer([file_entry("b")])]
    blobs = {lay.digest: lay.data for lay in layers}
    records = [new_layer_record(i, lay.descriptor()) for i, lay in enumerate(layers)]  # no cache paths
    image = new_image_record(workdir=str(tmp_path / "wd"), layerCount=2)
    target = str(tmp_path / "rootfs") if into else None
    # The workdir is named, not taken from the plan: a plan's is used only if it is a tosi workdir.
    out = list(unpack.unpack_plan(image, iter(records), workdir=str(tmp_path / "wd"), into=target,
                                  open_stream=lambda record: io.BytesIO(blobs[record["digest"]])))
    trees = [target] if into else [r["overlay"] for r in out]
    assert sorted(n for tree in trees for n in os.listdir(tree)) == ["a", "b"]


def test_a_pax_mtime_reaches_the_file_to_the_nanosecond(tmp_path):
    data = make_layer([file_entry("f", b"x", pax={"mtime": "1600000000.123456789"}),
                       dir_entry("d", pax={"mtime": "1600000001.987654321"})]).data
    layer.apply_layer(str(tmp_path), io.BytesIO(data), DOCKER_LAYER_GZIP)
    assert os.lstat(tmp_path / "f").st_mtime_ns == 1600000000123456789
    assert os.lstat(tmp_path / "d").st_mtime_ns == 1600000001987654321


def test_a_zstd_layer_opening_with_a_skippable_frame_is_applied(tmp_path):
    import struct

    skippable = struct.pack("<II", 0x184D2A50 + 0xE, 4) + b"meta"
    blob = skippable + make_layer([file_entry("f", b"framed")], compression="zstd").data
    layer.apply_layer(str(tmp_path), io.BytesIO(blob), OCI_LAYER_ZSTD)
    assert (tmp_path / "f").read_bytes() == b"framed"


def test_a_symlink_gets_its_xattrs_but_user_ones_linux_does_not_keep_there(tmp_path):
    data = make_layer([symlink_entry("l", "missing-target", pax={
        "SCHILY.xattr.trusted.tosi-test": "kept", "SCHILY.xattr.user.note": "not on symlinks"})]).data
    layer.apply_layer(str(tmp_path), io.BytesIO(data), DOCKER_LAYER_GZIP)
    link = str(tmp_path / "l")
    assert os.readlink(link) == "missing-target"
    assert os.getxattr(link, "trusted.tosi-test", follow_symlinks=False) == b"kept"
    assert "user.note" not in os.listxattr(link, follow_symlinks=False)
