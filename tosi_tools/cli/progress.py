"""Progress bars on stderr (tqdm) for tosi and tosi-fetch, showing what really happens.

A download bar ("download" in tosi, "total" in tosi-fetch, above one row per
blob while it downloads) counts the bytes that come over the wire, against the
bytes of the blobs the cache did not hold (a blob found cached, or the part of
one an earlier run left, is taken off its total): it appears with the first
download, so a run that finds every blob cached shows none. tosi adds an "extract" bar: layers applied (or
extracted) out of the plan's, with the entries and bytes applied so far.

On success the bars are replaced by their final lines; on failure or Ctrl-C
(`clear()`) they are taken off the screen, so the error line stands alone.
While bars are shown, the tosi logger writes above them (tqdm.write).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from contextlib import ExitStack
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..layer import LayerStats
    from ..plan import ImageRecord, LayerRecord

REFRESH_SECONDS = 0.1  # the extract bar's text is remade at most this often


def total_bytes(image: "ImageRecord", layers: "Iterable[LayerRecord]") -> int:
    """Bytes of a plan's blobs (an ImageRecord, LayerRecords): each distinct blob
    once, the config included."""
    sizes = {layer.digest: layer.size for layer in layers}
    if image.config_digest is not None:
        sizes[image.config_digest] = image.config_size
    return sum(size for size in sizes.values() if size is not None)


class ProgressBars:
    """tqdm bars on `stream` for one image: a fetch.Fetcher progress callback
    (`__call__`), and with `extraction` an unpack progress callback (`layer`).
    Thread-safe; once cleared or closed, later events are ignored."""

    def __init__(self, image: "ImageRecord", layers: "Iterable[LayerRecord]", stream: IO[str],
                 blob_rows: bool = True, extraction: bool = False, download_label: str = "total") -> None:
        import logging

        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        layers = list(layers)
        self._tqdm = tqdm
        self._stream = stream
        self._lock = threading.Lock()
        self._closed = False
        self._blob_rows = blob_rows
        self._download_label = download_label
        self._extraction = extraction
        self._layer_count = len(layers)
        # Bytes of the plan's blobs not known yet to be in the cache: the download bar's total.
        self._to_download = total_bytes(image, layers)
        self._download: Any = None  # the download bar, made by the first download
        self._download_final = ""  # its line once every byte arrived
        self._counted: dict[Any, int] = {}  # download -> bytes it added to the bar
        self._present: dict[Any, int] = {}  # download -> bytes an earlier run left (off the total)
        self._rows: dict[Any, tuple[int, Any]] = {}  # download -> (row, its bar)
        self._free_rows: list[int] = []
        self._extract: Any = None  # the extract bar, made by the first layer event but a start
        self._layer_stats: dict[int, tuple[int, int]] = {}  # layer index -> (entries, bytes)
        self._layers_done: set[int] = set()
        self._reused = 0
        self._entries = self._bytes = 0
        self._shown_at = 0.0
        self._logging = ExitStack()
        self._logging.enter_context(logging_redirect_tqdm([logging.getLogger("tosi")], tqdm))

    # ------------------------------------------------------------ downloads

    def __call__(self, download: Any, event: str, nbytes: int) -> None:
        """fetch.Fetcher's progress(download, event, nbytes): see blobs.Downloader."""
        with self._lock:
            if self._closed:
                return
            if event == "reused":
                self._uncount(nbytes)
            elif event == "start":
                self._present[download] = nbytes
                self._uncount(nbytes)
                self._counted[download] = 0
                if self._download is None:
                    self._download = self._bar(total=self._to_download, desc=self._download_label, unit="B",
                                               unit_scale=True, unit_divisor=1024)
                if self._blob_rows:
                    row = self._free_rows.pop() if self._free_rows else len(self._rows) + 1
                    self._rows[download] = (row, self._bar(
                        total=download.size, initial=nbytes, desc=download.digest.hex[:12],
                        unit="B", unit_scale=True, unit_divisor=1024, position=row, leave=False))
            elif event == "restart" and download in self._counted:
                # From byte 0 again: what it counted, and what an earlier run left, are to come.
                self._uncount(-self._present.pop(download, 0))
                self._advance(-self._counted[download])
                self._counted[download] = 0
                if download in self._rows:
                    self._rows[download][1].reset(total=download.size)
            elif event == "advance" and download in self._counted:
                self._counted[download] += nbytes
                self._advance(nbytes)
                if download in self._rows:
                    self._rows[download][1].update(nbytes)
            elif event == "done" and download in self._rows:
                row, bar = self._rows.pop(download)
                bar.close()
                self._free_rows.append(row)

    def _bar(self, **options: Any) -> Any:
        # The download and extract bars take the top rows in the order they appear.
        options.setdefault("position", (self._download is not None) + (self._extract is not None))
        return self._tqdm(file=self._stream, dynamic_ncols=True, **options)

    def _uncount(self, nbytes: int) -> None:
        """Take `nbytes` off what is to be downloaded (negative: put them back)."""
        self._to_download -= nbytes
        if self._download is not None:
            self._download.total = self._to_download
            self._download.refresh()
            self._note_downloaded()

    def _advance(self, nbytes: int) -> None:
        if self._download is not None:
            self._download.update(nbytes)
            self._note_downloaded()

    def _note_downloaded(self) -> None:
        # The line to leave: frozen once the bytes are in, whatever extraction takes after.
        bar = self._download
        if bar.n >= bar.total:
            self._download_final = bar.format_meter(**{**bar.format_dict, "rate": None})
            bar.refresh()
        else:
            self._download_final = ""

    # ------------------------------------------------------------ extraction

    def layer(self, record: "LayerRecord", event: str, stats: "LayerStats | None") -> None:
        """unpack's progress(record, event, stats): see tosi_tools.unpack."""
        with self._lock:
            if self._closed or not self._extraction:
                return
            # Made by the first event after a "start", which comes once the layer's first bytes
            # arrived: under the download bar, which its download's start made before them.
            if self._extract is None and event != "start":
                self._extract = self._bar(
                    total=self._layer_count, desc="extract",
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} layers "
                    "[{elapsed}{postfix}]")
            index = record.index
            if event == "start":
                if index in self._layers_done:  # laid out again (bytes redone)
                    self._layers_done.discard(index)
                    self._extract.update(-1)
                self._set_layer(index, 0, 0)
                if self._extract is None:
                    return
            elif event == "advance" and stats is not None:
                self._set_layer(index, stats.entries, stats.bytes)
                now = time.monotonic()
                if now - self._shown_at < REFRESH_SECONDS:
                    return
                self._shown_at = now
            elif event == "done" and stats is not None:
                self._set_layer(index, stats.entries, stats.bytes)
                self._layers_done.add(index)
                self._extract.update(1)
            elif event == "reused" and index not in self._layers_done:
                self._reused += 1
                self._layers_done.add(index)
                self._extract.update(1)
            self._extract.set_postfix_str(self._extract_note(), refresh=True)

    def _set_layer(self, index: int, entries: int, nbytes: int) -> None:
        old_entries, old_bytes = self._layer_stats.get(index, (0, 0))
        self._entries += entries - old_entries
        self._bytes += nbytes - old_bytes
        self._layer_stats[index] = (entries, nbytes)

    def _extract_note(self) -> str:
        note = (f"{self._entries:,} entr{'y' if self._entries == 1 else 'ies'}, "
                f"{self._tqdm.format_sizeof(self._bytes, 'B', 1024)}")
        if self._reused:
            note += f", {self._reused} already extracted"
        return note

    # ------------------------------------------------------------ the end

    def clear(self) -> None:
        """Take every bar off the screen (a failure or Ctrl-C: the error line comes next)."""
        with self._lock:
            self._close(leave=False)

    def close(self) -> None:
        """Replace the bars by their final lines (download, then extract); after clear(), nothing."""
        with self._lock:
            self._close(leave=True)

    def _close(self, leave: bool) -> None:
        if self._closed:
            return
        self._closed = True
        lines = []
        if leave and self._download is not None:
            lines.append(self._download_final or str(self._download))
        if leave and self._extract is not None:
            lines.append(str(self._extract))
        bars = [bar for bar in (self._download, self._extract) if bar is not None]
        bars += [bar for _row, bar in self._rows.values()]
        for bar in sorted(bars, key=lambda bar: abs(bar.pos), reverse=True):  # the top row last
            bar.leave = False
            bar.close()  # clears its line
        self._rows.clear()
        self._logging.close()
        if bars:
            # At the start of the top row: the final lines, or the error line, go there.
            self._stream.write("\r" + "".join(line + "\n" for line in lines))
            self._stream.flush()
