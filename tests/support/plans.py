"""Plans for the stages after resolve, built from a pushed image without running tosi-resolve,
and the checks of what those stages leave in the cache.

The records carry the fields tosi-resolve writes (see HACKING.md); the config
is left for tosi-fetch to download unless `cache_config` puts it in place the
way resolve does.
"""

import json
import os

from tests.support.images import file_entry, make_layer
from tosi_tools.cache import Workdir, atomic_write
from tosi_tools.plan import new_image_record, new_layer_record


def plan_records(endpoint, image, workdir, cache_config=False, layers=None):
    """Image record plus layer records for `image` (a tests.support.images.PushedImage)
    as served by `endpoint` (e.g. a registry's or a fault proxy's URL)."""
    host = endpoint.split("://", 1)[1]
    manifest = json.loads(image.manifest)
    config = dict(manifest["config"])
    cache = Workdir(workdir)
    config["path"] = cache.config_path(config["digest"])
    if cache_config:
        atomic_write(config["path"], image.config)
    descriptors = layers if layers is not None else manifest["layers"]
    record = new_image_record(
        reference=f"{host}/{image.repo}:{image.tag}", registry=host, endpoint=endpoint,
        repository=image.repo, tag=image.tag, digest=image.digest, mediaType=image.media_type,
        size=len(image.manifest), manifestPath=None, index=None, platform=image.platform,
        config=config, workdir=os.path.abspath(workdir), layerCount=len(descriptors),
        insecure=False, caFile=None,
    )
    diff_ids = json.loads(image.config)["rootfs"]["diff_ids"]
    layer_records = [
        new_layer_record(i, d, diffID=diff_ids[i] if i < len(diff_ids) else None)
        for i, d in enumerate(descriptors)
    ]
    return [record, *layer_records]


def plan_text(endpoint, image, workdir, **kwargs):
    """The plan as the JSON lines a stage reads on stdin."""
    return records_text(plan_records(endpoint, image, workdir, **kwargs))


def records_text(records):
    """Plan records as the JSON lines a stage reads on stdin."""
    return "".join(json.dumps(r) + "\n" for r in records)


def parse_plan(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def random_layer(size):
    """An uncompressed layer of incompressible content, a little over `size` bytes."""
    return make_layer([file_entry("blob.bin", os.urandom(size))], compression=None)


def assert_cached(workdir, layers):
    """Each layer's blob is in `layers/<hex>` of the workdir, byte for byte."""
    for layer in layers:
        with open(Workdir(workdir).layer_path(layer.digest), "rb") as f:
            assert f.read() == layer.data, f"cached {layer.digest} differs"
