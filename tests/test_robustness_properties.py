"""Robustness suite, property-based (hypothesis): references, plans, and random layer stacks.

- Reference parsing: every reference the grammar allows parses to its parts and
  round-trips through its normalized text; any text at all is a Reference or one
  InvalidReference line, never another exception.
- The plan reader: a plan malformed, truncated or mistyped in any way is read or
  refused with one PlanError line, never another exception; plans naming paths
  outside the workdir are refused by the stage executables (exit 2, one line).
- Random trees of files, dirs, symlinks, hardlinks, devices and whiteouts over
  several layers, pulled by the real `tosi` flat and mounted, equal the reference
  model (tests/support/layermodel.py), with hypothesis drawing every choice of
  tests/test_layout_equivalence.py's stack maker so failures shrink.

Example counts are small by default and bigger with --slow (tests/support/robustness.py).
"""

import io
import json
import os
import re
import shutil
import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.support.images import file_entry, make_layer
from tests.support.robustness import hypothesis_settings
from tests.support.staging import fetched_plan, run_unpack, snapshot
from tests.test_layout_equivalence import _StackMaker, assert_all_agree, layouts  # noqa: F401 (fixture)
from tosi_tools import overlayfs
from tosi_tools.errors import InvalidReference, PlanError
from tosi_tools.plan import PlanReader
from tosi_tools.reference import Reference, parse_reference

pytestmark = pytest.mark.robustness("properties")

HEX = "0123456789abcdef"

# ---------------------------------------------------------------- references

path_component = st.from_regex(r"[a-z0-9]{1,6}(?:(?:\.|_|__|-{1,2})[a-z0-9]{1,4}){0,2}", fullmatch=True)
domain_component = st.from_regex(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,6}[a-zA-Z0-9])?", fullmatch=True)
port = st.integers(1, 65535).map(lambda p: f":{p}")
domains = st.one_of(
    st.none(),
    st.sampled_from(["docker.io", "index.docker.io", "registry-1.docker.io", "localhost",
                     "localhost:5000", "127.0.0.1:5000", "[::1]:5000", "quay.io"]),
    st.tuples(st.lists(domain_component, min_size=2, max_size=3), st.one_of(st.just(""), port)).map(
        lambda t: ".".join(t[0]) + t[1]),
    st.tuples(domain_component, port).map(lambda t: t[0] + t[1]),
)
tags = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
                 st.just("t" * 128))
digests = st.one_of(st.none(), st.text(HEX, min_size=64, max_size=64).map(lambda h: f"sha256:{h}"),
                    st.text(HEX, min_size=128, max_size=128).map(lambda h: f"sha512:{h}"))

# The distribution project's ReferenceRegexp (reference/regexp.go), ASCII as Go's \w is.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_GRAMMAR = re.compile(
    rf"(?:(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?/)?"
    rf"{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,})?")


@st.composite
def references(draw):
    """(text, expected registry, repository, tag, digest) of a valid reference."""
    domain = draw(domains)
    components = draw(st.lists(path_component, min_size=1, max_size=3))
    if domain is None and len(components) > 1:
        # a first component with a "." (or "localhost") would be read as a registry
        assume("." not in components[0] and components[0] != "localhost")
    assume(not (domain is None and len(components) == 1 and re.fullmatch("[a-f0-9]{64}", components[0])))
    tag, digest = draw(tags), draw(digests)
    path = "/".join(components)
    text = (f"{domain}/" if domain else "") + path + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    registry = "docker.io" if domain in (None, "index.docker.io", "registry-1.docker.io") else domain
    repository = f"library/{path}" if registry == "docker.io" and len(components) == 1 else path
    assume(len(f"{registry}/{repository}") <= 255)
    return text, registry, repository, tag or (None if digest else "latest"), digest


def _one_line_refusal(exc):
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)


@hypothesis_settings(200, 5000)
@given(references())
def test_valid_references_parse_to_their_parts_and_round_trip(robustness, case):
    robustness.add(cases=1)
    text, registry, repository, tag, digest = case
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    again = parse_reference(ref.normalized())
    assert again == ref and again.normalized() == ref.normalized()
    assert (again.registry, again.repository, again.tag, again.digest) == (registry, repository, tag, digest)


def _mutated_reference(draw):
    text = draw(references())[0]
    pos = draw(st.integers(0, len(text)))
    edit = draw(st.sampled_from(["insert", "delete", "replace"]))
    char = draw(st.one_of(st.sampled_from(list(":/@.-_[] \n\tAZ%\x00é")), st.characters()))
    if edit == "insert":
        return text[:pos] + char + text[pos:]
    if edit == "delete":
        return text[:pos] + text[pos + 1:]
    return text[:pos] + char + text[pos + 1:]


any_reference_text = st.one_of(st.text(max_size=80), st.text(string.printable, max_size=80),
                               st.composite(_mutated_reference)())


@hypothesis_settings(300, 10000)
@given(any_reference_text)
def test_any_text_is_a_reference_or_one_line_refusal(robustness, text):
    robustness.add(cases=1)
    try:
        ref = parse_reference(text)
    except InvalidReference as exc:
        _one_line_refusal(exc)
        return
    assert isinstance(ref, Reference)
    assert parse_reference(ref.normalized()) == ref


@hypothesis_settings(300, 10000)
@given(any_reference_text)
@example("img:\u00e9")
def test_accepted_references_follow_the_distribution_grammar(robustness, text):
    robustness.add(cases=1)
    try:
        parse_reference(text)
    except InvalidReference:
        return
    assert _GRAMMAR.fullmatch(text), text


# ---------------------------------------------------------------- the plan reader

# The documented type of each field a stage reads (man/tosi-plan.5).
IMAGE_FIELDS = {"planVersion": int, "layerCount": int, "reference": str, "registry": str,
                "endpoint": str, "repository": str, "digest": str, "mediaType": str, "size": int,
                "workdir": str, "config": dict, "platform": dict, "insecure": bool}
LAYER_FIELDS = {"index": int, "digest": str, "mediaType": str, "size": int, "path": str,
                "diffID": str, "urls": list, "annotations": dict}
# tosi-plan(5): an optional field that is null is absent; these may not be (an image
# record's digest may: plan.ImageRecord requires planVersion and layerCount alone).
REQUIRED_FIELDS = {"image": {"planVersion", "layerCount"}, "layer": {"index", "digest"}}

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


def _has_type(value, kind):
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


@st.composite
def plans(draw):
    """A valid plan's records: an image record and its layers (the fields tosi-fetch writes)."""
    count = draw(st.integers(0, 4))
    image = {"type": "image", "planVersion": 1, "reference": "127.0.0.1:5000/r:t", "registry": "127.0.0.1:5000",
             "endpoint": "http://127.0.0.1:5000", "repository": "r", "tag": "t",
             "digest": "sha256:" + "1" * 64, "mediaType": "application/vnd.oci.image.manifest.v1+json",
             "size": 500, "workdir": "/tmp/tosi", "layerCount": count, "insecure": False,
             "platform": {"os": "linux", "architecture": "amd64"},
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "2" * 64,
                        "size": 300, "path": "/tmp/tosi/configs/sha256:" + "2" * 64}}
    layers = []
    for i in range(count):
        hexd = draw(st.text(HEX, min_size=64, max_size=64))
        layers.append({"type": "layer", "index": i, "digest": f"sha256:{hexd}",
                       "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                       "size": draw(st.integers(0, 10**9)), "diffID": f"sha256:{hexd[::-1]}",
                       "path": f"/tmp/tosi/layers/{hexd}"})
    return [image, *layers]


def _text(records):
    return "".join(json.dumps(r) + "\n" for r in records)


@st.composite
def malformed_plans(draw):
    """Plan text broken in one of the ways a failing or hostile stage breaks it."""
    records = draw(plans())
    lines = _text(records).splitlines(keepends=True)
    how = draw(st.sampled_from(["truncate", "drop", "duplicate", "swap", "retype", "junk", "random",
                                "bytes", "nested", "unknown_record"]))
    if how == "truncate":
        text = "".join(lines)
        return text[:draw(st.integers(0, len(text)))]
    if how in ("drop", "duplicate", "swap", "junk", "unknown_record"):
        i = draw(st.integers(0, len(lines) - 1))
        if how == "drop":
            del lines[i]
        elif how == "duplicate":
            lines.insert(i, lines[i])
        elif how == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif how == "junk":
            lines.insert(i, draw(st.one_of(st.text(max_size=40), json_values.map(json.dumps))) + "\n")
        else:
            lines.insert(i, json.dumps({"type": draw(st.text(max_size=8)), "index": i}) + "\n")
        return "".join(lines)
    if how == "retype":
        record = draw(st.sampled_from(records))
        field = draw(st.sampled_from(sorted({*record, "type", "index", "digest", "layerCount"})))
        record[field] = draw(json_values)
        return _text(records)
    if how == "nested":
        depth = draw(st.integers(1, 5000))
        return "[" * depth + "]" * depth + "\n"
    if how == "bytes":
        return draw(st.binary(max_size=200)).decode("utf-8", "replace")
    return draw(st.text(max_size=200))


def _read(text):
    reader = PlanReader(io.StringIO(text))
    return reader.image, reader.layers()


@hypothesis_settings(400, 10000)
@given(malformed_plans())
def test_a_broken_plan_is_read_or_refused_in_one_line(robustness, text):
    robustness.add(cases=1)
    try:
        image, layers = _read(text)
    except PlanError as exc:
        _one_line_refusal(exc)
        return
    assert image["type"] == "image" and isinstance(image["layerCount"], int)
    assert [layer["index"] for layer in layers] == list(range(image["layerCount"]))


@st.composite
def mistyped_plans(draw):
    """A valid plan with one documented field of one record given a JSON value of another type."""
    records = draw(plans())
    record = draw(st.sampled_from(records))
    fields = IMAGE_FIELDS if record["type"] == "image" else LAYER_FIELDS
    field = draw(st.sampled_from(sorted(fields)))
    value = draw(json_values.filter(lambda v: not _has_type(v, fields[field])
                                    and (v is not None or field in REQUIRED_FIELDS[record["type"]])))
    record[field] = value
    return _text(records), record["type"], field, value


@hypothesis_settings(200, 5000)
@given(mistyped_plans())
def test_a_plan_with_a_mistyped_field_is_refused_in_one_line(robustness, case):
    robustness.add(cases=1)
    text, kind, field, value = case
    with pytest.raises(PlanError) as refused:
        _read(text)
    _one_line_refusal(refused.value)


# ---------------------------------------------------------------- plans naming paths outside the workdir

@pytest.fixture
def staged(pusher, registry, repo_name, workdir, tmp_path):
    """A pushed one-layer image fetched into `workdir`: (plan records, outside dir)."""
    image = pusher.push_image(repo_name, "v1", [make_layer([file_entry("from-the-image", b"i")])])
    _, records = fetched_plan(registry, image, workdir)
    outside = tmp_path / "outside"
    outside.mkdir()
    return records, outside


def assert_refused_as_bad_input(proc, prog):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "internal error" not in lines[0]


@pytest.mark.parametrize("mode", ["into", "per-layer"])
def test_unpack_refuses_a_layer_path_outside_the_workdir(robustness, staged, workdir, tmp_path, mode):
    records, outside = staged
    robustness.add(cases=1)
    copy = outside / "blob"
    shutil.copy(records[1]["path"], copy)
    records[1]["path"] = str(copy)
    target = tmp_path / "rootfs"
    args = ["--workdir", workdir] + (["--into", target] if mode == "into" else [])
    proc = run_unpack(_text(records), *args)
    assert not (target / "from-the-image").exists()
    assert_refused_as_bad_input(proc, "tosi-unpack")


@pytest.mark.parametrize("field", ["overlay", "link"])
def test_mount_refuses_an_overlay_dir_outside_the_workdir(robustness, tool, staged, workdir, tmp_path, mounts,
                                                          field):
    records, outside = staged
    robustness.add(cases=1)
    proc = run_unpack(_text(records), "--workdir", workdir)
    assert proc.returncode == 0, proc.stderr
    unpacked = [json.loads(line) for line in proc.stdout.splitlines()]
    planted = outside / "planted"
    planted.mkdir()
    (planted / "not-from-the-image").write_bytes(b"host")
    unpacked[1].pop("link", None)
    unpacked[1]["overlay" if field == "overlay" else "link"] = str(planted)
    if field == "link":
        unpacked[1]["overlay"] = str(outside / "missing")
    target = str(tmp_path / "mnt")
    mounts.append(target)
    proc = tool("tosi-mount", "--workdir", workdir, target, input=_text(unpacked))
    mounted = overlayfs.mount_at(target)
    seen = os.path.exists(os.path.join(target, "not-from-the-image"))
    while overlayfs.mount_at(target):
        overlayfs.unmount(target)
    assert not mounted and not seen
    assert_refused_as_bad_input(proc, "tosi-mount")


@pytest.mark.parametrize("stage", ["tosi-fetch", "tosi-verify"])
def test_fetch_and_verify_write_nothing_at_a_plan_path_outside_the_workdir(robustness, tool, staged, workdir,
                                                                            stage):
    # Both use the cache's own names; a plan's paths are output, never where they write.
    records, outside = staged
    robustness.add(cases=1)
    records[0]["config"]["path"] = str(outside / "config")
    records[1]["path"] = str(outside / "layer")
    before = snapshot(str(outside), with_dir_mtimes=True)
    proc = tool(stage, "--workdir", workdir, input=_text(records))
    assert snapshot(str(outside), with_dir_mtimes=True) == before
    if proc.returncode != 0:
        assert_refused_as_bad_input(proc, stage)


# ---------------------------------------------------------------- random layer stacks, flat and mounted

@hypothesis_settings(3, 25)
@given(st.randoms(use_true_random=False))
def test_random_stacks_flat_and_mounted_equal_the_model(robustness, layouts, rng):  # noqa: F811
    maker = _StackMaker(0)
    maker.rng = rng  # every choice the stack maker makes is drawn by hypothesis (and shrinks)
    layers = maker.stack()
    robustness.add(cases=1)
    assert_all_agree(layouts, layers)
