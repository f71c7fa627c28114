"""The plan: the JSON-lines stream that flows between the stages (see tosi-plan(5)).

A plan is one image record followed by one record per layer, bottom layer first.
Every record is a JSON object on its own line with a "type" field. Stages read
the records they understand, add their own fields and pass every other field on
untouched, so a later version can add fields without breaking earlier readers.
Records are written and flushed one at a time so stages overlap across a pipe.
"""

import json

from .errors import PlanError, quoted

PLAN_VERSION = 1
IMAGE = "image"
LAYER = "layer"


def _decode(line, lineno, source):
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise PlanError(f"{source}: line {lineno} is not JSON ({getattr(exc, 'msg', exc)})") from None
    except RecursionError:
        raise PlanError(f"{source}: line {lineno} is not a plan record (nested too deeply)") from None
    if not isinstance(record, dict) or "type" not in record:
        raise PlanError(f"{source}: line {lineno} is not a plan record (no \"type\")")
    return record


class PlanReader:
    """Reads a plan from a text stream: `.image` at once, then the layers by iteration.

    Iterating stops with PlanError if the stream ends before the number of layers
    the image record announces, which is how a stage notices that the stage
    before it failed half way.
    """

    def __init__(self, stream, source="stdin"):
        self._stream = stream
        self._source = source
        self._lineno = 0
        first = self._next_record()
        if first is None:
            raise PlanError(f"{source}: empty plan (did the stage before this one fail?)")
        if first.get("type") != IMAGE:
            raise PlanError(f"{source}: a plan starts with an image record, not {quoted(first.get('type'))}")
        version = first.get("planVersion")
        if not isinstance(version, int) or version < 1:
            raise PlanError(f"{source}: image record has no valid planVersion")
        if version > PLAN_VERSION:
            raise PlanError(
                f"{source}: plan version {version} is newer than this tool's {PLAN_VERSION}"
            )
        if not isinstance(first.get("layerCount"), int):
            raise PlanError(f"{source}: image record has no layerCount")
        self.image = first

    def _next_record(self):
        for line in self._stream:
            self._lineno += 1
            if line.strip():
                return _decode(line, self._lineno, self._source)
        return None

    def __iter__(self):
        expected = self.image["layerCount"]
        seen = 0
        while True:
            record = self._next_record()
            if record is None:
                break
            kind = record.get("type")
            if kind != LAYER:
                # Unknown record kinds from newer stages are passed over, not fatal.
                continue
            if record.get("index") != seen:
                raise PlanError(
                    f"{self._source}: layer record {seen} has index {quoted(record.get('index'))}"
                )
            if not isinstance(record.get("digest"), str):
                raise PlanError(f"{self._source}: layer record {seen} has no digest")
            seen += 1
            yield record
        if seen != expected:
            raise PlanError(
                f"{self._source}: plan ended after {seen} of {expected} layers "
                "(did the stage before this one fail?)"
            )

    def layers(self):
        return list(self)


class PlanWriter:
    """Writes plan records to a text stream, one flushed line each."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, record):
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()

    def write_plan(self, image, layers):
        """The image record, then each layer record as the iterable yields it."""
        self.write(image)
        for layer in layers:
            self.write(layer)


def new_image_record(**fields):
    """An image record with the version and type set; callers add the rest."""
    record = {"type": IMAGE, "planVersion": PLAN_VERSION}
    record.update(fields)
    return record


def new_layer_record(index, descriptor, **fields):
    """A layer record: the OCI descriptor's fields verbatim plus tosi's own."""
    record = {"type": LAYER, "index": index}
    for key in ("mediaType", "digest", "size", "urls", "annotations"):
        if key in descriptor:
            record[key] = descriptor[key]
    record.update(fields)
    return record


def read_digest_list(lines, source="stdin"):
    """Digests from a plain list, one per line; blank lines and #comments are skipped."""
    from .digest import Digest
    from .errors import UsageError

    digests = []
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            digests.append(Digest(text))
        except UsageError as exc:
            raise PlanError(f"{source}: line {lineno}: {exc}") from None
    return digests
