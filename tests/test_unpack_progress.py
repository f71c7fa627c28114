"""unpack's progress callback: what the library tells while it lays layers out
(the bars of tosi are drawn from it), without printing anything itself."""

import io
import threading

from tests.support.images import file_entry, make_layer
from tosi_tools import unpack
from tosi_tools.cache import Workdir
from tosi_tools.plan import LayerRecord, new_layer_record


def layers_and_records(*file_counts):
    layers = [make_layer([file_entry(f"l{i}/f{j}", b"x" * 100) for j in range(count)])
              for i, count in enumerate(file_counts)]
    records = [LayerRecord(new_layer_record(i, layer.descriptor(), diffID=layer.diff_id))
               for i, layer in enumerate(layers)]
    return layers, records


class Events:
    """progress(record, event, stats) as (index, event, entries, bytes) tuples."""

    def __init__(self):
        self.seen = []
        self._lock = threading.Lock()

    def __call__(self, record, event, stats):
        with self._lock:
            self.seen.append((record.index, event, *((stats.entries, stats.bytes) if stats else ())))

    def of(self, index):
        return [event for event in self.seen if event[0] == index]


def streams_of(layers):
    by_digest = {layer.digest: layer.data for layer in layers}
    return lambda record: io.BytesIO(by_digest[record.digest])


def test_into_reports_each_layer_start_entries_and_bytes_then_done(tmp_path):
    layers, records = layers_and_records(2, 3)
    events = Events()
    list(unpack.apply_layers_into(tmp_path / "rootfs", records, Workdir(str(tmp_path / "w")),
                                  open_stream=streams_of(layers), progress=events))
    # Each file entry's parent directory is made implicitly: entries are the tar's own.
    assert events.seen == [
        (0, "start"), (0, "advance", 1, 100), (0, "advance", 2, 200), (0, "done", 2, 200),
        (1, "start"), (1, "advance", 1, 100), (1, "advance", 2, 200), (1, "advance", 3, 300),
        (1, "done", 3, 300)]


def test_per_layer_reports_extractions_then_reuses(tmp_path):
    layers, records = layers_and_records(1, 2)
    workdir = Workdir(str(tmp_path / "w"))
    first = Events()
    list(unpack.extract_layers_to_overlays(workdir, records, open_stream=streams_of(layers), progress=first))
    assert first.of(0) == [(0, "start"), (0, "advance", 1, 100), (0, "done", 1, 100)]
    assert first.of(1) == [(1, "start"), (1, "advance", 1, 100), (1, "advance", 2, 200), (1, "done", 2, 200)]
    again = Events()
    list(unpack.extract_layers_to_overlays(workdir, records, open_stream=streams_of(layers), progress=again))
    assert sorted(again.seen) == [(0, "reused"), (1, "reused")]


def test_a_layer_the_plan_names_twice_is_extracted_once_and_reused_once(tmp_path):
    layers, records = layers_and_records(1)
    twice = [records[0], LayerRecord({**records[0], "index": 1})]
    events = Events()
    list(unpack.extract_layers_to_overlays(Workdir(str(tmp_path / "w")), twice,
                                           open_stream=streams_of(layers), progress=events))
    assert events.seen == [(0, "start"), (0, "advance", 1, 100), (0, "done", 1, 100), (1, "reused")]
