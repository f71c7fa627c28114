"""plan.ImageRecord and plan.LayerRecord: checked once when made, read through typed
attributes, never changed in place, and written back as they were read."""

import io
import json
import os

import pytest

from tosi_tools import unpack
from tosi_tools.cache import Workdir, atomic_write
from tosi_tools.errors import PlanError
from tosi_tools.plan import (
    ImageRecord, LayerRecord, PlanReader, PlanWriter, new_image_record, new_layer_record,
)

LAYER_DIGEST = "sha256:" + "a" * 64
DIFF_ID = "sha256:" + "b" * 64
CONFIG_DIGEST = "sha256:" + "c" * 64


def _plan_lines(workdir):
    wd = Workdir(workdir)
    image = new_image_record(
        reference="127.0.0.1:5000/test/img:v1", registry="127.0.0.1:5000",
        endpoint="http://127.0.0.1:5000", repository="test/img", tag="v1",
        config={"mediaType": "application/vnd.oci.image.config.v1+json", "digest": CONFIG_DIGEST,
                "size": 12, "path": wd.config_path(CONFIG_DIGEST)},
        workdir=workdir, layerCount=1, insecure=False, caFile=None, futureField={"z": [1, 2.5]})
    layer = new_layer_record(0, {"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                 "digest": LAYER_DIGEST, "size": 3},
                             diffID=DIFF_ID, path=wd.layer_path(LAYER_DIGEST), x_later="kept")
    # As another tool might write them: spaces, another key order.
    return [json.dumps(dict(reversed(list(image.items())))) + "\n",
            json.dumps(layer, indent=None, separators=(", ", ": ")) + "\n"]


def _written(records):
    out = io.StringIO()
    writer = PlanWriter(out)
    for record in records:
        writer.write(record)
    return out.getvalue()


def test_a_record_no_stage_changed_is_written_back_as_json_dumps_of_what_was_read(tmp_path):
    lines = _plan_lines(str(tmp_path))
    reader = PlanReader(iter(lines))
    expected = "".join(json.dumps(json.loads(line), separators=(",", ":")) + "\n" for line in lines)
    assert _written([reader.image, *reader.layers()]) == expected


def test_typed_attributes_give_the_known_fields(tmp_path):
    reader = PlanReader(iter(_plan_lines(str(tmp_path))))
    image, (layer,) = reader.image, reader.layers()
    assert (image.layer_count, image.repository, image.config_digest, image.config_size) == \
        (1, "test/img", CONFIG_DIGEST, 12)
    assert image.config_digest.hex == "c" * 64 and image.insecure is False and image.rootfs is None
    assert (layer.index, layer.digest, layer.size, layer.diff_id, layer.urls) == \
        (0, LAYER_DIGEST, 3, DIFF_ID, ())
    assert layer.diff_id.algorithm == "sha256" and layer.overlay is None
    assert layer["x_later"] == "kept" and image["futureField"] == {"z": [1, 2.5]}


def test_with_methods_give_a_checked_copy_and_leave_the_record_as_it_was(tmp_path):
    layer = LayerRecord(new_layer_record(0, {"digest": LAYER_DIGEST, "size": 3}, z=1))
    overlay = Workdir(str(tmp_path)).overlay_path(LAYER_DIGEST)
    unpacked = layer.with_overlay(overlay, "L1")
    assert (unpacked.overlay, unpacked.link) == (overlay, "L1")
    assert "overlay" not in layer and layer == {"type": "layer", "index": 0,
                                               "digest": LAYER_DIGEST, "size": 3, "z": 1}
    assert list(unpacked) == ["type", "index", "digest", "size", "z", "overlay", "link"]
    with pytest.raises(PlanError, match="link"):
        layer.with_overlay(overlay, "../elsewhere")
    with pytest.raises(PlanError, match="is not where a workdir keeps"):
        layer.with_path("/etc/shadow")


def test_a_record_cannot_be_changed_in_place():
    image = ImageRecord(new_image_record(layerCount=0))
    with pytest.raises(TypeError):
        image["rootfs"] = "/x"  # type: ignore[index]


def test_a_record_refuses_a_mistyped_known_field_when_made():
    with pytest.raises(PlanError, match="layer record 0: size is a string, not an integer"):
        LayerRecord(new_layer_record(0, {"digest": LAYER_DIGEST, "size": "3"}))
    with pytest.raises(PlanError, match="no layerCount"):
        ImageRecord(new_image_record())
    with pytest.raises(PlanError, match="not an image record"):
        ImageRecord(new_layer_record(0, {"digest": LAYER_DIGEST}))


def test_an_atomic_write_temporary_in_the_overlay_dir_is_no_dead_extraction(tmp_path):
    wd = Workdir(str(tmp_path / "wd")).ensure()
    dead = wd.overlay_temp_path(LAYER_DIGEST)
    os.mkdir(dead)
    not_a_layer = os.path.join(wd.overlays, f".tmp-{'a' * 64}.diffid-1234")
    atomic_write(not_a_layer, b"x")
    assert wd.overlay_temps() == [(wd.overlay_lock_path(LAYER_DIGEST), dead)]
    unpack.remove_abandoned_temps(wd)
    assert os.listdir(wd.overlays) == [os.path.basename(not_a_layer)]  # the lock removed by its holder


def test_the_reader_refuses_text_that_was_not_utf8_as_the_stages_refuse_bytes(tmp_path):
    image, layer = _plan_lines(str(tmp_path))
    undecodable = b'{"x-note": "\xff", '.decode("utf-8", "surrogateescape") + layer[1:]
    with pytest.raises(PlanError, match=r"^stdin: line 2 is not UTF-8 \(byte 0xff at column 13\)$"):
        PlanReader(iter([image, undecodable])).layers()


def test_the_reader_skips_a_byte_order_mark_before_the_first_record_of_text(tmp_path):
    image, layer = _plan_lines(str(tmp_path))
    assert PlanReader(iter(["\ufeff" + image, layer])).image == json.loads(image)
