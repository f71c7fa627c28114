"""A plan is checked once, when it is read, by every stage that reads it (issue 10,
point 4; issue 11, bad input): every known field has its JSON type, every digest its
algorithm, length and lower-case hex, a plan has one image record and no layer
beyond its layerCount, and the cache paths it names are the ones the stage derives
from the digest and its own workdir. A malformed plan is one line on stderr, exit 2,
and nothing written: no cache entry, no tree, no mount."""

import copy
import os
import stat
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import BIN
from tests.support.images import file_entry, make_layer
from tests.support.plans import parse_plan, records_text
from tests.support.staging import fetched_plan
from tosi_tools import overlayfs
from tosi_tools.digest import Digest
from tosi_tools.plan import PlanReader

HEX = "0123456789abcdef" * 4


class Staged:
    """One two-layer image, fetched and unpacked per layer into `workdir`: the plans
    `fetched` (what tosi-unpack and tosi-verify read) and `unpacked` (tosi-mount's)."""

    def __init__(self, workdir, fetched, unpacked):
        self.workdir = workdir
        self.fetched = fetched
        self.unpacked = unpacked


def run(cmd, *args, plan, timeout=60):
    """bin/<cmd> on the plan (text, or bytes as they are); its output as text."""
    env = dict(os.environ)
    env.pop("TOSI_DEBUG", None)
    binary = isinstance(plan, bytes)
    proc = subprocess.run([sys.executable, os.path.join(BIN, cmd), *map(str, args)], input=plan,
                          capture_output=True, text=not binary, env=env, timeout=timeout)
    if binary:
        proc.stdout, proc.stderr = (out.decode("utf-8", "surrogateescape")
                                    for out in (proc.stdout, proc.stderr))
    return proc


@pytest.fixture(scope="module")
def staged(pusher, registry, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("plan-validation") / "workdir")
    image = pusher.push_image("test/plan-validation", "v1", [
        make_layer([file_entry("bottom", b"bottom\n")]), make_layer([file_entry("top", b"top\n")])])
    text, fetched = fetched_plan(registry, image, workdir)
    proc = run("tosi-unpack", "--workdir", workdir, plan=text)
    assert proc.returncode == 0, proc.stderr
    return Staged(workdir, fetched, parse_plan(proc.stdout))


def tree_state(root):
    """{relative path: (type, size, mtime)} of everything under `root`."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            state[os.path.relpath(path, root)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return state


def one_error_line(proc, cmd):
    assert proc.returncode == 2, f"{cmd} exited {proc.returncode}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cmd}: error: "), proc.stderr
    assert "internal error" not in lines[0] and len(lines[0]) < 400, lines[0]
    # Per layer, tosi-unpack passes the image record on before the layers arrive; no
    # layer record of a refused plan goes on.
    assert all(record["type"] == "image" for record in parse_plan(proc.stdout)), proc.stdout
    return lines[0]


# ---------------------------------------------------------------- the stages and their effects

def every_stage(staged, tmp_path, fetched, unpacked):
    """Every plan-reading stage run on `fetched` (the staged plan as tosi-verify and
    tosi-unpack read it) or `unpacked` (tosi-mount's): [(command, CompletedProcess)]."""
    into, fresh, target = tmp_path / "rootfs", tmp_path / "fresh-overlays", tmp_path / "mnt"
    wd = ("--workdir", staged.workdir)
    return [
        ("tosi-fetch", run("tosi-fetch", *wd, "--progress", "never", plan=fetched)),
        ("tosi-verify", run("tosi-verify", *wd, plan=fetched)),
        ("tosi-unpack", run("tosi-unpack", *wd, "--into", into, plan=fetched)),
        ("tosi-unpack", run("tosi-unpack", *wd, "--overlaydir", fresh, plan=fetched)),
        ("tosi-mount", run("tosi-mount", *wd, target, plan=unpacked)),
    ]


def refused_by_every_stage(staged, tmp_path, mutate, edit=None):
    """Run every plan-reading stage on the staged plans changed by `mutate(records)`
    (then their bytes by `edit(data)`, if given); each must refuse in one line (exit 2)
    and write nothing. Returns the lines."""
    before = tree_state(staged.workdir)
    fetched = records_text(mutate(copy.deepcopy(staged.fetched)))
    unpacked = records_text(mutate(copy.deepcopy(staged.unpacked)))
    if edit is not None:
        fetched, unpacked = edit(fetched.encode()), edit(unpacked.encode())
    into, fresh, target = tmp_path / "rootfs", tmp_path / "fresh-overlays", tmp_path / "mnt"
    try:
        lines = [one_error_line(proc, cmd) for cmd, proc in every_stage(staged, tmp_path, fetched, unpacked)]
    finally:
        mounted = overlayfs.mount_at(str(target))
        while overlayfs.mount_at(str(target)):  # a stage that took the plan leaves no mount behind
            overlayfs.unmount(str(target))
    assert mounted is None
    assert not os.path.lexists(into)
    assert not os.path.lexists(fresh)
    for path in (target, f"{target}.upper", f"{target}.work"):
        assert not os.path.lexists(path)
    assert tree_state(staged.workdir) == before
    return lines


def image_field(name, value):
    def mutate(records):
        records[0][name] = value
        return records
    return mutate


def config_field(name, value):
    def mutate(records):
        records[0]["config"][name] = value
        return records
    return mutate


def layer_field(name, value, index=0):
    def mutate(records):
        records[1 + index][name] = value
        return records
    return mutate


def index_record(digest, path=None):
    def mutate(records):
        records[0]["index"] = {"mediaType": "application/vnd.oci.image.index.v1+json",
                               "digest": digest, "size": 100, "path": path}
        return records
    return mutate


WRONG_TYPES = [
    ("planVersion", image_field("planVersion", "1")),
    ("image-mediaType", image_field("mediaType", 7)),
    ("registry-list", image_field("registry", ["registry.example.com"])),
    ("registry-no-host", image_field("registry", "not a host")),
    ("endpoint-int", image_field("endpoint", 5)),
    ("endpoint-ftp", image_field("endpoint", "ftp://127.0.0.1:21")),
    ("endpoint-port", image_field("endpoint", "http://127.0.0.1:99999")),
    ("repository-list", image_field("repository", ["test", "app"])),
    ("tag-object", image_field("tag", {"v": 1})),
    ("image-size-string", image_field("size", "741")),
    ("image-size-negative", image_field("size", -1)),
    ("manifestPath-list", image_field("manifestPath", ["/tmp"])),
    ("index-string", image_field("index", "sha256:" + HEX)),
    ("platform-list", image_field("platform", ["linux", "amd64"])),
    ("config-string", image_field("config", "sha256:" + HEX)),
    ("config-size-bool", config_field("size", True)),
    ("workdir-int", image_field("workdir", 3)),
    ("layerCount-string", image_field("layerCount", "2")),
    ("insecure-string", image_field("insecure", "yes")),
    ("caFile-list", image_field("caFile", ["/etc/ssl"])),
    ("layer-index-string", layer_field("index", "0")),
    ("layer-mediaType-int", layer_field("mediaType", 1)),
    ("layer-size-float", layer_field("size", 1.5)),
    ("layer-urls-string", layer_field("urls", "http://127.0.0.1/blob")),
    ("layer-urls-entries", layer_field("urls", [1])),
    ("layer-annotations-list", layer_field("annotations", ["a"])),
    ("layer-path-list", layer_field("path", ["/etc/passwd"])),
    ("layer-overlay-int", layer_field("overlay", 1)),
    ("layer-link-int", layer_field("link", 2)),
    ("layer-applied-string", layer_field("applied", "true")),
]


@pytest.mark.parametrize("mutate", [m for _, m in WRONG_TYPES], ids=[i for i, _ in WRONG_TYPES])
def test_a_field_of_the_wrong_type_is_refused_by_every_stage(staged, tmp_path, mutate):
    refused_by_every_stage(staged, tmp_path, mutate)


def test_the_message_names_the_field_and_the_type(staged, tmp_path):
    lines = refused_by_every_stage(staged, tmp_path, image_field("mediaType", 7))
    assert all(line.endswith("stdin: image record: mediaType is an integer, not a string")
               for line in lines), lines
    lines = refused_by_every_stage(staged, tmp_path, layer_field("path", ["/etc/passwd"]))
    assert all(line.endswith("stdin: layer record 0: path is an array, not a string")
               for line in lines), lines


BAD_DIGESTS = [
    ("algorithm", "md5:" + HEX[:32]),
    ("short", "sha256:" + HEX[:63]),
    ("upper-case", "sha256:" + HEX.upper()),
    ("not-hex", "sha256:" + "g" * 64),
]
DIGEST_FIELDS = [
    ("image", lambda d: image_field("digest", d)),
    ("config", lambda d: config_field("digest", d)),
    ("layer", lambda d: layer_field("digest", d)),
    ("diffID", lambda d: layer_field("diffID", d)),
    ("index", lambda d: index_record(d)),
]


@pytest.mark.parametrize("field,make", DIGEST_FIELDS, ids=[f for f, _ in DIGEST_FIELDS])
@pytest.mark.parametrize("digest", [d for _, d in BAD_DIGESTS], ids=[i for i, _ in BAD_DIGESTS])
def test_a_malformed_digest_is_refused_by_every_stage(staged, tmp_path, field, make, digest):
    lines = refused_by_every_stage(staged, tmp_path, make(digest))
    assert all("invalid digest" in line for line in lines), lines


@pytest.mark.parametrize("digest", ["sha512:" + HEX, HEX, "sha256:" + HEX + "0", "sha256:" + HEX + "\n"])
def test_a_digest_of_the_wrong_length_or_without_algorithm_is_refused(staged, tmp_path, digest):
    lines = refused_by_every_stage(staged, tmp_path, layer_field("digest", digest))
    assert all("invalid digest" in line for line in lines), lines


def test_a_long_bad_value_is_quoted_in_80_characters_at_most(staged, tmp_path):
    junk = "sha256:" + "x" * 1_000_000
    for line in refused_by_every_stage(staged, tmp_path, layer_field("digest", junk)):
        # errors.quoted: the first and last 40 characters, and the length
        assert "x" * 41 not in line and "x" * 33 in line and "(1000007 characters)" in line
        assert len(line) < 300


# ---------------------------------------------------------------- the bytes of a plan
#
# One rule for every stage (plan.plan_line): UTF-8 only, each line that is not named
# with the byte at fault; a byte order mark skipped at the very start, refused elsewhere.

BOM = b"\xef\xbb\xbf"


def on_line(number, edit):
    """A change of a plan's bytes: `edit(line)` of its line `number` (1: the first)."""
    def change(data):
        lines = data.splitlines(keepends=True)
        lines[number - 1] = edit(lines[number - 1])
        return b"".join(lines)
    return change


def unchanged(records):
    return records


def with_a_byte_that_is_not_utf8(line):
    """The line's record with an unknown field whose string holds byte 0xff, at column 13."""
    assert line.startswith(b'{"type": ')
    return b'{"x-note": "\xff", ' + line[1:]


def test_a_byte_order_mark_at_the_start_of_a_plan_is_skipped_by_every_stage(staged, tmp_path, mounts):
    mounts.append(tmp_path / "mnt")
    fetched, unpacked = (BOM + records_text(records).encode() for records in (staged.fetched, staged.unpacked))
    for cmd, proc in every_stage(staged, tmp_path, fetched, unpacked):
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
        assert proc.stdout.startswith('{"type":"image"'), f"{cmd}: {proc.stdout[:80]!r}"
        assert len(parse_plan(proc.stdout)) == 3, cmd


def test_a_byte_order_mark_at_the_start_of_a_later_line_is_refused_by_every_stage(staged, tmp_path):
    for line in refused_by_every_stage(staged, tmp_path, unchanged, on_line(2, lambda line: BOM + line)):
        assert line.endswith(": error: stdin: line 2 starts with a byte order mark (U+FEFF), which "
                             "only the start of the input may have"), line


@pytest.mark.parametrize("number", [1, 2])
def test_a_plan_that_is_not_utf8_is_refused_by_every_stage_naming_the_line(staged, tmp_path, number):
    lines = refused_by_every_stage(staged, tmp_path, unchanged, on_line(number, with_a_byte_that_is_not_utf8))
    for line in lines:
        assert line.endswith(f": error: stdin: line {number} is not UTF-8 (byte 0xff at column 13)"), line


def test_a_digest_list_may_start_with_a_byte_order_mark_too(staged):
    digest = staged.fetched[1]["digest"]
    proc = run("tosi-verify", "--workdir", staged.workdir, plan=BOM + f"{digest}\n".encode())
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{digest}\n", "")


def test_a_digest_list_that_is_not_utf8_is_refused_naming_the_line(staged):
    digest = staged.fetched[1]["digest"].encode()
    proc = run("tosi-verify", "--workdir", staged.workdir, plan=digest + b"\n# \xc3(\n" + digest + b"\n")
    assert one_error_line(proc, "tosi-verify") == \
        "tosi-verify: error: stdin: line 2 is not UTF-8 (byte 0xc3 at column 3)"
    assert proc.stdout == ""


# ---------------------------------------------------------------- one image, layerCount layers

def second_image_record(records):
    return records + [dict(records[0])]


def layer_beyond_the_count(records):
    return records + [dict(records[-1], index=len(records) - 1)]


def count_below_the_layers(records):
    records[0]["layerCount"] = 1
    return records


@pytest.mark.parametrize("mutate", [second_image_record, layer_beyond_the_count, count_below_the_layers])
def test_a_plan_with_more_than_it_announces_is_refused_before_anything_is_applied(staged, tmp_path,
                                                                                   mutate):
    lines = refused_by_every_stage(staged, tmp_path, mutate)
    assert all("second image record" in line or "beyond the" in line for line in lines), lines


def test_a_second_image_record_before_the_layers_is_refused(staged, tmp_path):
    lines = refused_by_every_stage(staged, tmp_path, lambda r: [r[0], dict(r[0])] + r[1:])
    assert all("line 2 is a second image record" in line for line in lines), lines


def test_records_of_unknown_kinds_are_still_passed_over(staged, tmp_path):
    records = copy.deepcopy(staged.fetched)
    records.insert(1, {"type": "signature", "by": "a later version"})
    records[1 + 1]["x-later-field"] = [1, 2]
    proc = run("tosi-unpack", "--workdir", staged.workdir, "--into", tmp_path / "rootfs",
               plan=records_text(records))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "rootfs")) == ["bottom", "top"]
    assert parse_plan(proc.stdout)[1]["x-later-field"] == [1, 2]


# ---------------------------------------------------------------- cache paths

def other_layers(field):
    """Layer 0's `field` set to layer 1's."""
    def mutate(records):
        records[1][field] = records[2].get(field) or os.path.join(
            os.path.dirname(records[2]["path"]), "..", "overlays", Digest(records[2]["digest"]).hex)
        return records
    return mutate


OUTSIDE = [
    ("layer-path", layer_field("path", "/etc/shadow")),
    ("layer-path-of-another-layer", other_layers("path")),
    ("layer-path-relative", layer_field("path", "layers/" + HEX)),
    ("config-path", config_field("path", "/etc/passwd")),
    ("config-savedConfig", config_field("savedConfig", "/etc/shadow")),
    ("manifestPath", image_field("manifestPath", "/etc/passwd")),
    ("index-path", index_record("sha256:" + HEX, "/etc/passwd")),
    ("overlay", layer_field("overlay", "/etc")),
    ("overlay-of-another-layer", other_layers("overlay")),
    ("link-absolute", layer_field("link", "/etc")),
    ("link-up", layer_field("link", "..")),
    ("link-with-slash", layer_field("link", "../../etc")),
]


@pytest.mark.parametrize("mutate", [m for _, m in OUTSIDE], ids=[i for i, _ in OUTSIDE])
def test_a_cache_path_that_is_not_the_derived_one_is_refused_by_every_stage(staged, tmp_path, mutate):
    refused_by_every_stage(staged, tmp_path, mutate)


def test_the_message_says_where_the_blob_belongs(staged, tmp_path):
    digest = staged.fetched[1]["digest"]
    for line in refused_by_every_stage(staged, tmp_path, layer_field("path", "/etc/shadow")):
        assert line.endswith(f"stdin: layer record 0: path '/etc/shadow' is not where a workdir "
                             f"keeps {digest}; plans name cache paths only inside their workdir"), line


def in_another_workdir(field, other):
    """Layer 0's `field` set to where the workdir `other` would keep it."""
    def mutate(records):
        hexname = Digest(records[1]["digest"]).hex
        records[1][field] = os.path.join(other, "layers" if field == "path" else "overlays", hexname)
        return records
    return mutate


def test_a_stage_reads_a_blob_only_from_its_own_workdir(staged, tmp_path):
    other = str(tmp_path / "other")
    records = records_text(in_another_workdir("path", other)(copy.deepcopy(staged.fetched)))
    for cmd, args in (("tosi-verify", []), ("tosi-unpack", ["--into", tmp_path / "rootfs"]),
                      ("tosi-unpack", ["--overlaydir", tmp_path / "fresh"])):
        line = one_error_line(run(cmd, "--workdir", staged.workdir, *args, plan=records), cmd)
        assert line.startswith(f"{cmd}: error: stdin: layer record 0: path '{other[:40]}")
        assert line.endswith(f" is not where the workdir {staged.workdir} keeps "
                             f"{staged.fetched[1]['digest']}; plans name cache paths only inside "
                             "their workdir"), line
    assert not os.path.lexists(tmp_path / "rootfs") and not os.path.lexists(tmp_path / "fresh")


def test_mount_uses_only_the_overlay_dirs_of_its_own_overlay_dir(staged, tmp_path):
    records = in_another_workdir("overlay", str(tmp_path / "other"))(copy.deepcopy(staged.unpacked))
    proc = run("tosi-mount", "--workdir", staged.workdir, tmp_path / "mnt", plan=records_text(records))
    assert "is not where the overlay dir" in one_error_line(proc, "tosi-mount")
    assert not os.path.lexists(tmp_path / "mnt")


def test_a_plan_resolved_into_one_workdir_is_fetched_into_another(registry, pusher, repo_name, tmp_path):
    """Fetch opens none of the plan's paths: those of the workdir resolve used pass."""
    image = pusher.push_image(repo_name, "v1", [make_layer([file_entry("f", b"f\n")])])
    first, second = str(tmp_path / "resolved"), str(tmp_path / "fetched")
    resolved = run("tosi-resolve", "--workdir", first, f"{registry.host}/{image.repo}:v1", plan=None)
    assert resolved.returncode == 0, resolved.stderr
    fetched = run("tosi-fetch", "--workdir", second, "--progress", "never", plan=resolved.stdout)
    assert fetched.returncode == 0, fetched.stderr
    unpacked = run("tosi-unpack", "--workdir", second, "--into", tmp_path / "rootfs", plan=fetched.stdout)
    assert unpacked.returncode == 0, unpacked.stderr
    assert os.listdir(tmp_path / "rootfs") == ["f"]


def test_the_same_path_spelled_differently_is_accepted(staged, tmp_path):
    records = copy.deepcopy(staged.fetched)
    head, tail = os.path.split(records[1]["path"])
    records[1]["path"] = head + "//./" + tail
    proc = run("tosi-unpack", "--workdir", staged.workdir, "--into", tmp_path / "rootfs",
               plan=records_text(records))
    assert proc.returncode == 0, proc.stderr


def rebased(staged, workdir):
    """The fetched plan as if fetched into `workdir` (whose cache holds none of its blobs)."""
    text = records_text(staged.fetched).replace(staged.workdir, workdir)
    records = parse_plan(text)
    for record in records[1:]:
        record["diffID"] = None  # not even the diffID would stop a host tar
    return records


def host_tar(path):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("from-the-host")
        info.size = 0
        tar.addfile(info)


@pytest.mark.parametrize("shaped", [False, True], ids=["any-file", "shaped-as-a-cache-path"])
@pytest.mark.parametrize("into", [False, True], ids=["per-layer", "into"])
def test_a_host_tar_named_by_path_is_never_read_nor_cached(staged, tmp_path, into, shaped):
    workdir = str(tmp_path / "workdir")
    os.makedirs(os.path.join(workdir, "layers"))
    records = rebased(staged, workdir)
    hexname = Digest(records[1]["digest"]).hex
    tar = str(tmp_path / "elsewhere" / "layers" / hexname) if shaped else str(tmp_path / "host.tar")
    os.makedirs(os.path.dirname(tar), exist_ok=True)
    host_tar(tar)
    records[1]["path"] = tar
    target = tmp_path / "rootfs"
    proc = run("tosi-unpack", "--workdir", workdir, *(["--into", target] if into else []),
               plan=records_text(records))
    assert "path" in one_error_line(proc, "tosi-unpack")
    assert not os.path.lexists(target)
    assert not os.path.lexists(os.path.join(workdir, "overlays", hexname))
    assert os.listdir(os.path.join(workdir, "layers")) == []


def test_a_fifo_named_by_path_is_never_opened(staged, tmp_path):
    # Opening a FIFO nobody writes to blocks: a stage that opened it would time out.
    workdir = str(tmp_path / "workdir")
    fifo = str(tmp_path / "blob.fifo")
    os.mkfifo(fifo)
    records = rebased(staged, workdir)
    records[1]["path"] = fifo
    for args in ([], ["--into", tmp_path / "rootfs"]):
        proc = run("tosi-unpack", "--workdir", workdir, *args, plan=records_text(records), timeout=30)
        one_error_line(proc, "tosi-unpack")


def test_a_host_directory_named_by_overlay_is_never_mounted(staged, tmp_path):
    host = tmp_path / "host"
    (host / "dir").mkdir(parents=True)
    (host / "dir" / "host-file").write_text("host\n")
    records = copy.deepcopy(staged.unpacked)
    for record in records[1:]:
        record["overlay"] = str(host / "dir")
        del record["link"]
    target = tmp_path / "mnt"
    proc = run("tosi-mount", "--workdir", staged.workdir, "--read-only", target, plan=records_text(records))
    assert "overlay" in one_error_line(proc, "tosi-mount")
    assert sorted(os.listdir(host)) == ["dir"]  # no .tosi-empty beside it
    assert not os.path.lexists(target) and overlayfs.mount_at(str(target)) is None


def test_a_link_leading_to_another_layers_dir_is_refused(staged, tmp_path):
    records = copy.deepcopy(staged.unpacked)
    records[1]["link"], records[2]["link"] = records[2]["link"], records[1]["link"]
    target = tmp_path / "mnt"
    proc = run("tosi-mount", "--workdir", staged.workdir, target, plan=records_text(records))
    line = one_error_line(proc, "tosi-mount")
    assert f"does not lead to {records[2]['digest']}'s overlay dir" in line
    assert not os.path.lexists(target) and overlayfs.mount_at(str(target)) is None


def test_mount_takes_the_overlay_dir_from_the_flag_or_the_workdir_not_from_the_plan(staged, tmp_path):
    records = copy.deepcopy(staged.unpacked)
    proc = run("tosi-mount", "--workdir", staged.workdir, "--overlaydir", tmp_path / "elsewhere",
               tmp_path / "mnt", plan=records_text(records))
    assert "is not where the overlay dir" in one_error_line(proc, "tosi-mount")


# ---------------------------------------------------------------- the reader itself

def test_the_reader_keeps_unknown_fields_and_gives_the_records_unchanged(staged):
    records = copy.deepcopy(staged.unpacked)
    records[0]["x-new"] = {"any": ["thing"]}
    reader = PlanReader(iter(records_text(records).splitlines()))
    assert [reader.image, *reader.layers()] == records


def test_the_reader_sees_the_end_of_the_plan_before_giving_the_last_layer(staged):
    lines = records_text(layer_beyond_the_count(copy.deepcopy(staged.fetched))).splitlines()
    reader = PlanReader(iter(lines))
    layers = iter(reader)
    assert next(layers)["index"] == 0
    with pytest.raises(Exception, match="beyond the 2 the image record announces"):
        next(layers)


@pytest.mark.parametrize("junk", ["z" * 5_000_000, "sha256:" + "z" * 5_000_000, "{" + "z" * 5_000_000])
def test_verify_quotes_at_most_80_characters_of_a_junk_line(staged, junk):
    proc = run("tosi-verify", "--workdir", staged.workdir, plan=junk + "\n")
    line = one_error_line(proc, "tosi-verify")
    assert "z" * 81 not in line, line[:300]
