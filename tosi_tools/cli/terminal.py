"""What the plan-reading stages do when a person, not a pipe, is at one end.

stdin a terminal: the stage would wait for a plan the user never types, so it
says what it reads and how it is used, and exits 2 (`refuse_terminal_stdin`).
stdout a terminal: the plan (JSON lines for the next stage) is no reading for a
person, so the stage writes one line saying what it did once it is done, after
its progress bars (`PlanOutput`); a pipe or a file gets the plan, byte for byte
as ever.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..plan import ImageRecord, LayerRecord

# describe(image record, layer records) -> the line a terminal gets instead of the plan.
Describe = Callable[["ImageRecord", "list[LayerRecord]"], str]


def refuse_terminal_stdin(prog: str, reads: str, example: str) -> None:
    """UsageError (exit 2) when stdin is a terminal: `prog` reads `reads` there, as in `example`."""
    stdin = sys.stdin
    if stdin is not None and stdin.isatty():
        raise UsageError(f"stdin is a terminal: {prog} reads {reads} from a pipe, e.g. {example}")


class PlanOutput:
    """A stage's stdout: the plan (plan.PlanWriter) to a pipe or a file; on a terminal,
    the records are kept and `finish()` writes one line, `describe(image, layers)`."""

    def __init__(self, stream: IO[str], describe: Describe) -> None:
        from ..plan import PlanWriter

        self._stream = stream
        self._describe = describe
        self.terminal = stream.isatty()
        self._writer = None if self.terminal else PlanWriter(stream)
        self._image: ImageRecord | None = None
        self._layers: list[LayerRecord] = []

    def write(self, record: Mapping[str, Any]) -> None:
        """One record, as plan.PlanWriter.write (the image record first)."""
        if self._writer is not None:
            self._writer.write(record)
            return
        from ..plan import ImageRecord, LayerRecord

        if self._image is None:
            self._image = ImageRecord.of(record)
        else:
            self._layers.append(LayerRecord.of(record))

    def write_plan(self, image: Mapping[str, Any], layers: Iterable[Mapping[str, Any]]) -> None:
        self.write(image)
        for layer in layers:
            self.write(layer)

    def finish(self) -> None:
        """On a terminal, the line saying what was done (call it once the stage succeeded
        and its progress bars are closed); nothing more to a pipe."""
        if self._writer is None and self._image is not None:
            self._stream.write(self._describe(self._image, self._layers) + "\n")
            self._stream.flush()


def image_name(image: "ImageRecord") -> str:
    """The image as a person names it, with the start of its digest: alpine:3.20 (sha256:0123456789ab)."""
    name = image.reference or image.repository or "image"
    digest = image.digest
    return f"{name} ({digest.algorithm}:{digest.hex[:12]})" if digest is not None else name


def count(number: int, what: str) -> str:
    return f"{number} {what}{'' if number == 1 else 's'}"


def human_size(nbytes: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{nbytes} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def next_stage(command: str) -> str:
    """The end of a summary line: where the plan would have gone."""
    return f"; the plan goes to stdout when it is a pipe (| {command})"
