"""tosi-unpack checks each layer's diffID (the config's digest of the uncompressed tar) while it extracts.

The images go through the real registry, tosi-resolve and tosi-fetch; a wrong
diffID is one the image's config states (the blobs themselves are sound). The
check covers the whole decompressed stream, what follows the tar's end marker
included, so the compressed stream is read to its end too.
"""

import dataclasses
import gzip
import hashlib
import os

import pytest
import zstandard

from tests.support.images import DOCKER_LAYER_GZIP, OCI_LAYER_TAR, Layer, file_entry, make_layer, sha256, tar_bytes
from tests.support.plans import records_text
from tests.support.staging import run_unpack, stage_image
from tests.test_unpack_modes import one_error_line, records_of
from tosi_tools.cache import Workdir
from tosi_tools.digest import Digest

MODES = ["per-layer", "into"]
COMPRESSIONS = ["gzip", "zstd", "none"]
NOT_THE_DIFF_ID = "sha256:" + "0" * 64


@pytest.fixture
def stage(pusher, registry, repo_name, workdir):
    """stage(layers) -> the fetched plan's records."""
    def _stage(layers):
        _, records = stage_image(pusher, registry, repo_name, layers, workdir)
        return records
    return _stage


@pytest.fixture
def unpack(workdir, tmp_path):
    """unpack(records, mode) -> CompletedProcess of tosi-unpack on those records."""
    def _unpack(records, mode):
        args = ["--workdir", workdir] + (["--into", tmp_path / "rootfs"] if mode == "into" else [])
        return run_unpack(records_text(records), *args)
    return _unpack


def overlay_names(workdir):
    overlays = os.path.join(workdir, "overlays")
    return sorted(os.listdir(overlays)) if os.path.isdir(overlays) else []


def assert_nothing_published(workdir, layer):
    """No overlays/<hex>, no short name for it, no temporary directory left."""
    hexname = Digest(layer.digest).hex
    assert [n for n in overlay_names(workdir) if hexname in n and not n.endswith(".lock")] == []
    assert [n for n in overlay_names(workdir) if os.path.islink(os.path.join(workdir, "overlays", n))] == []


def stated(layer, diff_id):
    """The layer as pushed, with `diff_id` in the image config instead of its own."""
    return dataclasses.replace(layer, diff_id=diff_id)


def blob(data, media_type, tar):
    return Layer(data=data, media_type=media_type, diff_id=sha256(tar))


def mismatch(layer, index=0, stated_id=NOT_THE_DIFF_ID):
    return (f"layer {index} ({layer.digest}): uncompressed content hashes to {layer.diff_id}, "
            f"not to the plan's diffID {stated_id}")


def with_diff_id(records, value, index=0):
    """The records with layer `index`'s diffID set to `value` (None: null; ...: absent)."""
    edited = [dict(r) for r in records]
    if value is ...:
        del edited[1 + index]["diffID"]
    else:
        edited[1 + index]["diffID"] = value
    return edited


TAR = tar_bytes([file_entry("etc/hostname", b"box\n"), file_entry("bin/tool", os.urandom(3000), mode=0o755)])


# ---------------------------------------------------------------- a wrong diffID

@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_wrong_diff_id_is_refused_per_layer_and_nothing_is_published(stage, unpack, workdir, compression):
    layer = make_layer(raw_tar=TAR, compression=compression)
    proc = unpack(stage([stated(layer, NOT_THE_DIFF_ID)]), "per-layer")
    assert mismatch(layer) in one_error_line(proc, 1)
    assert '"type":"layer"' not in proc.stdout
    assert_nothing_published(workdir, layer)


def test_a_good_blob_is_not_quarantined_when_the_plan_gives_a_wrong_diff_id_and_size(stage, unpack, workdir):
    layer = make_layer(raw_tar=TAR, compression="gzip")
    records = with_diff_id(stage([layer]), NOT_THE_DIFF_ID)
    records[1]["size"] += 3
    proc = unpack(records, "per-layer")
    assert mismatch(layer) in one_error_line(proc, 1)
    with open(Workdir(workdir).layer_path(layer.digest), "rb") as f:
        assert f.read() == layer.data
    assert os.listdir(Workdir(workdir).quarantine) == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_wrong_diff_id_is_refused_into_and_the_target_is_said_partial(stage, unpack, tmp_path, compression):
    good = make_layer([file_entry("below", b"b")])
    layer = make_layer(raw_tar=TAR, compression=compression)
    proc = unpack(stage([good, stated(layer, NOT_THE_DIFF_ID)]), "into")
    line = one_error_line(proc, 1)
    assert mismatch(layer, index=1) in line
    assert line.endswith(f"{tmp_path / 'rootfs'} is partially extracted (layers 0 applied); remove it")


def test_repeated_layer_with_another_diff_id_the_second_time_is_refused(stage, unpack):
    layer = make_layer(raw_tar=TAR)
    records = stage([layer, make_layer([file_entry("mid")]), layer])
    proc = unpack(with_diff_id(records, NOT_THE_DIFF_ID, index=2), "per-layer")
    assert mismatch(layer, index=2) in one_error_line(proc, 1)


@pytest.mark.parametrize("first", [None, "right"], ids=["first-unchecked", "first-checked"])
def test_layer_extracted_by_an_earlier_run_is_checked_when_reused(stage, unpack, workdir, first):
    layer = make_layer(raw_tar=TAR)
    records = stage([layer])
    earlier = unpack(with_diff_id(records, None) if first is None else records, "per-layer")
    assert earlier.returncode == 0, earlier.stderr
    _, [record] = records_of(earlier.stdout)
    refused = unpack(with_diff_id(records, NOT_THE_DIFF_ID), "per-layer")
    assert mismatch(layer) in one_error_line(refused, 1)
    again = unpack(records, "per-layer")
    assert again.returncode == 0, again.stderr
    assert records_of(again.stdout)[1][0]["overlay"] == record["overlay"]


def test_sha512_diff_id_is_checked_too(stage, unpack, workdir):
    layer = make_layer(raw_tar=TAR)
    records = stage([layer])
    right = "sha512:" + hashlib.sha512(TAR).hexdigest()
    wrong = "sha512:" + "1" * 128
    refused = unpack(with_diff_id(records, wrong), "per-layer")
    assert (f"layer 0 ({layer.digest}): uncompressed content hashes to {right}, not to the plan's "
            f"diffID {wrong}") in one_error_line(refused, 1)
    assert_nothing_published(workdir, layer)
    accepted = unpack(with_diff_id(records, right), "per-layer")
    assert accepted.returncode == 0, accepted.stderr
    _, [record] = records_of(accepted.stdout)
    assert sorted(os.listdir(record["overlay"])) == ["bin", "etc"]


# ---------------------------------------------------------------- no diffID, a malformed one

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", [None, ...], ids=["null", "absent"])
def test_missing_diff_id_skips_the_check(stage, unpack, tmp_path, mode, value):
    records = stage([make_layer(raw_tar=TAR)])
    proc = unpack(with_diff_id(records, value), mode)
    assert proc.returncode == 0, proc.stderr
    _, [record] = records_of(proc.stdout)
    root = tmp_path / "rootfs" if mode == "into" else record["overlay"]
    assert sorted(os.listdir(root)) == ["bin", "etc"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("value", ["md5:" + "0" * 32, "sha256:" + "A" * 64, "sha256:abc", "", 42])
def test_malformed_diff_id_is_a_plan_error(stage, unpack, workdir, tmp_path, mode, value):
    layer = make_layer(raw_tar=TAR)
    proc = unpack(with_diff_id(stage([layer]), value), mode)
    line = one_error_line(proc, 2)
    assert "layer record 0: diffID: invalid digest" in line
    if mode == "into":
        assert not os.path.lexists(tmp_path / "rootfs")  # the plan is checked before it is made
    else:
        assert_nothing_published(workdir, layer)


# ---------------------------------------------------------------- the whole stream counts

@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_data_after_the_tar_end_marker_is_part_of_the_diff_id(stage, unpack, workdir, compression):
    # past the decompressor's first chunk (1 MiB) after the end: the reader must go on
    # past it (but not past 1 MiB of padding: tests/test_space_guard.py)
    raw = TAR + bytes((1 << 20) - len(TAR) + 1024) + b"data after the end-of-archive blocks\n"
    assert len(raw) > 1 << 20 and len(raw) - TAR.index(bytes(1024)) <= 1 << 20
    trailing = make_layer(raw_tar=raw, compression=compression)
    records = stage([trailing])
    accepted = unpack(records, "per-layer")
    assert accepted.returncode == 0, accepted.stderr
    assert sorted(os.listdir(records_of(accepted.stdout)[1][0]["overlay"])) == ["bin", "etc"]


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_diff_id_of_the_tar_without_its_trailing_data_is_refused(stage, unpack, workdir, compression):
    trailing = make_layer(raw_tar=TAR + bytes(5000) + b"x", compression=compression)
    proc = unpack(stage([stated(trailing, sha256(TAR))]), "per-layer")
    assert mismatch(trailing, stated_id=sha256(TAR)) in one_error_line(proc, 1)
    assert_nothing_published(workdir, trailing)


def test_multi_member_gzip_is_the_concatenation_of_its_members(stage, unpack, tmp_path):
    cut = 700  # inside the first entry's data: the tar only makes sense joined
    layer = blob(gzip.compress(TAR[:cut], mtime=0) + gzip.compress(TAR[cut:], mtime=0), DOCKER_LAYER_GZIP, TAR)
    proc = unpack(stage([layer]), "into")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rootfs" / "etc" / "hostname").read_bytes() == b"box\n"


def test_multi_frame_zstd_is_the_concatenation_of_its_frames(stage, unpack, tmp_path):
    zstd = zstandard.ZstdCompressor()
    cut = 700
    layer = blob(zstd.compress(TAR[:cut]) + zstd.compress(TAR[cut:]), "application/vnd.oci.image.layer.v1.tar+zstd",
                 TAR)
    proc = unpack(stage([layer]), "into")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rootfs" / "etc" / "hostname").read_bytes() == b"box\n"


def test_tar_of_the_full_record_size_with_padding_passes(stage, unpack, tmp_path):
    # GNU tar pads to 10 KiB records: the zero blocks after the end marker are hashed too.
    padded = TAR + bytes(-len(TAR) % 10240 + 10240)
    proc = unpack(stage([blob(padded, OCI_LAYER_TAR, padded)]), "into")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- broken gzip after the tar's end

# Zeros after the end marker, more than a decompressor's chunk (but less than the
# 1 MiB of padding allowed): the tar ends before the decompressor meets the fault.
LONG_TAR = TAR + bytes((1 << 20) - len(TAR) + 1024)
GZ = gzip.compress(LONG_TAR, mtime=0)
BROKEN_GZIP = {
    # the tar is whole in each: only reading the compressed stream to its end finds the fault
    "garbage_after_the_member": GZ + b"not a gzip member",
    "trailer_cut": GZ[:-4],
    "garbage_after_a_truncated_member": GZ[:-6] + b"garbage!" * 4,
    "second_member_truncated": GZ + gzip.compress(b"more", mtime=0)[:-3],
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(BROKEN_GZIP))
def test_gzip_broken_after_the_tar_end_is_refused(stage, unpack, workdir, mode, case):
    layer = blob(BROKEN_GZIP[case], DOCKER_LAYER_GZIP, LONG_TAR)
    proc = unpack(stage([layer]), mode)
    assert "corrupt or truncated compressed data" in one_error_line(proc, 1)
    assert_nothing_published(workdir, layer)
