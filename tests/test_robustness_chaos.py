"""Robustness suite: chaos and stress, the real `tosi` against the real registry through the
fault-injecting proxy (tests/support/faultproxy.py).

Chaos: many small pulls (50 by default, 200 with --slow), each into its own
workdir through its own proxy, with random faults on the layer blobs (dropped
connections, 5xx, 429, stalls, flipped bytes; the mix is configurable, see
FAULT_MIX and TOSI_CHAOS_FAULTS) and, for some, a SIGKILL of the tosi process at
a random moment; a pull is flat (-extractto) or mounted (-mount) at random.
After each pull, every blob under its final name in the workdir matches its
digest; then a clean rerun (no faults) into a fresh target gives exactly the
tree a fault-free pull gives (tests.support.staging.snapshot). At least 90% of
the pulls that were not killed succeed.

Stress: 8 processes at once pull overlapping images (shared base layers) into
one workdir, half flat and half mounted, for several rounds on the same
workdir; every blob is downloaded once (GETs counted at the proxy) and every
tree is the model's.
"""

import concurrent.futures
import hashlib
import os
import random
import re
import subprocess
import sys

import pytest

from tests.conftest import BIN
from tests.support import layermodel
from tests.support.faultproxy import FaultProxy, Rule
from tests.support.images import file_entry, make_layer
from tests.support.robustness import examples
from tests.support.staging import snapshot
from tosi_tools import overlayfs

# Relative weights of the faults a chaos pull draws from; TOSI_CHAOS_FAULTS="drop,5xx,429,stall,flip"
# (names, or name=weight) replaces it.
FAULT_MIX = {"drop": 3, "5xx": 2, "429": 2, "stall": 2, "flip": 2}
KILL_SHARE = 0.25  # pulls that get a SIGKILL at a random moment
WORKERS = 3  # chaos pulls running at once (each has its own proxy and workdir)


def fault_mix():
    text = os.environ.get("TOSI_CHAOS_FAULTS")
    if not text:
        return dict(FAULT_MIX)
    mix = {}
    for item in text.split(","):
        name, _, weight = item.strip().partition("=")
        if name not in FAULT_MIX:
            raise ValueError(f"TOSI_CHAOS_FAULTS: unknown fault {name!r} (known: {', '.join(FAULT_MIX)})")
        mix[name] = float(weight) if weight else 1.0
    return mix


def tosi_cmd(*args):
    return [sys.executable, os.path.join(BIN, "tosi"), *map(str, args), "-progress=false"]


def without_root(tree):
    return {path: info for path, info in tree.items() if path != "."}


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bad_blobs(workdir):
    """Blobs under their final names in the workdir whose content does not hash to the name."""
    bad = []
    layers = os.path.join(workdir, "layers")
    for name in os.listdir(layers) if os.path.isdir(layers) else []:
        if re.fullmatch("[0-9a-f]{64}", name) and _sha256_file(os.path.join(layers, name)) != name:
            bad.append(f"layers/{name}")
    for sub in ("configs", "manifests"):
        for dirpath, _, filenames in os.walk(os.path.join(workdir, sub)):
            for name in filenames:
                m = re.fullmatch("sha256:([0-9a-f]{64})", name)
                if m and _sha256_file(os.path.join(dirpath, name)) != m.group(1):
                    bad.append(os.path.relpath(os.path.join(dirpath, name), workdir))
    return bad


def unmount_all(target):
    while overlayfs.mount_at(os.path.abspath(target)):
        overlayfs.unmount(os.path.abspath(target))


def lay_out(mode, ref, target, workdir, timeout=120):
    """A clean pull of `ref` laid out at `target`: (CompletedProcess, snapshot without the root or None)."""
    flag = "-extractto" if mode == "flat" else "-mount"
    proc = subprocess.run(tosi_cmd("-image", ref, flag, target, "-workdir", workdir),
                          capture_output=True, text=True, timeout=timeout)
    try:
        return proc, without_root(snapshot(str(target))) if proc.returncode == 0 else None
    finally:
        if mode == "mount":
            unmount_all(target)


# ---------------------------------------------------------------- chaos

def chaos_image_layers(rng):
    """Three layers: many small gzip'd files, then two uncompressed blobs of 60-250 KiB."""
    small = [file_entry(f"etc/f{i}", rng.randbytes(rng.randrange(10, 2000))) for i in range(rng.randrange(5, 40))]
    return [make_layer(small),
            make_layer([file_entry("bin/a", rng.randbytes(rng.randrange(60_000, 250_000)), mode=0o755)],
                       compression=None),
            make_layer([file_entry("usr/b", rng.randbytes(rng.randrange(60_000, 250_000)))], compression=None)]


def draw_faults(rng, layers, mix):
    """[(kind, Rule)] for one pull: one to three faults on its layer blobs."""
    kinds, weights = zip(*mix.items())
    faults = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choices(kinds, weights)[0]
        lay = rng.choice(layers)
        path, size = f"/blobs/{lay.digest}", len(lay.data)
        if kind == "drop":
            rule = Rule("drop", path=path, after=rng.randrange(size), times=1)
        elif kind == "5xx":
            rule = Rule("status", path=path, status=rng.choice((500, 502, 503, 504)), times=rng.randint(1, 2))
        elif kind == "429":
            rule = Rule("status", path=path, status=429, headers={"Retry-After": rng.choice(("0", "1"))}, times=1)
        elif kind == "stall":
            rule = Rule("stall", path=path, after=rng.randrange(size), seconds=rng.uniform(0.2, 1.5), times=1)
        else:
            rule = Rule("corrupt", path=path, at=rng.randrange(size), times=1)
        faults.append((kind, rule))
    return faults


class Pull:
    def __init__(self, number):
        self.number = number
        self.killed = False
        self.returncode = None
        self.stderr = ""
        self.faults = {}  # kind: times applied
        self.problems = []  # what must never happen: bad blobs, a failed or different clean rerun

    @property
    def flipped(self):
        return self.faults.get("flip", 0) > 0

    @property
    def succeeded(self):
        return not self.killed and self.returncode == 0


def chaos_pull(number, seed, registry, image, expected, base, mix):
    rng = random.Random(seed)
    pull = Pull(number)
    workdir = os.path.join(base, f"w{number}")
    mode = rng.choice(("flat", "mount"))
    target = os.path.join(base, f"t{number}")
    with FaultProxy(registry.url) as proxy:
        faults = draw_faults(rng, image.layers, mix)
        for _, rule in faults:
            proxy.add(rule)
        ref = f"{proxy.url.split('://', 1)[1]}/{image.repo}:{image.tag}"
        kill_at = rng.uniform(0.05, 2.0) if rng.random() < KILL_SHARE else None
        proc = subprocess.Popen(tosi_cmd("-image", ref, "-extractto" if mode == "flat" else "-mount", target,
                                         "-workdir", workdir),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            if kill_at is not None:
                try:
                    proc.wait(kill_at)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    pull.killed = True
            _, pull.stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if mode == "mount":
                unmount_all(target)
        pull.returncode = proc.returncode
        for kind, rule in faults:
            if rule.applied:
                pull.faults[kind] = pull.faults.get(kind, 0) + rule.applied
        pull.problems += [f"bad blob {b}" for b in bad_blobs(workdir)]
        proxy.clear()
        rerun, tree = lay_out(mode, ref, os.path.join(base, f"clean{number}"), workdir)
    if rerun.returncode != 0:
        pull.problems.append(f"clean rerun failed: {rerun.stderr.strip()}")
    elif tree != expected:
        diff = sorted(p for p in {*tree, *expected} if tree.get(p) != expected.get(p))
        pull.problems.append(f"clean rerun ({mode}) differs from a fault-free pull at {diff}")
    return pull


@pytest.fixture(scope="module")
def chaos_campaign(request, registry, pusher, tmp_path_factory):
    """Runs every chaos pull once; the tests below judge the results."""
    count = examples(50, 200)
    base = str(tmp_path_factory.mktemp("chaos"))
    rng = random.Random(11)
    images = []
    for i in range(5):
        images.append(pusher.push_image("robustness/chaos", f"i{i}", chaos_image_layers(rng)))
    expected = {}
    for image in images:  # what a fault-free pull gives, flat
        proc, tree = lay_out("flat", f"{registry.host}/{image.repo}:{image.tag}",
                             os.path.join(base, f"expected-{image.tag}"), os.path.join(base, "expected-workdir"))
        assert proc.returncode == 0, proc.stderr
        expected[image.tag] = tree
    mix = fault_mix()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        pulls = list(pool.map(
            lambda n: chaos_pull(n, 1000 + n, registry, images[n % 5], expected[images[n % 5].tag], base, mix),
            range(count)))
    request.config._tosi_robustness.add(
        "chaos", cases=len(pulls), faults=sum(sum(p.faults.values()) for p in pulls),
        killed=sum(p.killed for p in pulls), corrupted=sum(p.faults.get("flip", 0) for p in pulls),
        failures=sum(not p.killed and p.returncode != 0 for p in pulls) + sum(bool(p.problems) for p in pulls))
    return pulls


pytestmark_chaos = pytest.mark.robustness("chaos")


def _success_share(pulls):
    judged = [p for p in pulls if not p.killed]
    return sum(p.succeeded for p in judged) / max(len(judged), 1), [
        f"pull {p.number} ({p.faults}): {p.stderr.strip().splitlines()[-1:]}" for p in judged if not p.succeeded]


@pytestmark_chaos
def test_chaos_pulls_leave_only_good_blobs_and_a_clean_rerun_gives_the_exact_tree(chaos_campaign):
    assert len(chaos_campaign) >= 50
    assert [f"pull {p.number}: {m}" for p in chaos_campaign for m in p.problems] == []


@pytestmark_chaos
def test_chaos_pulls_without_flipped_bytes_succeed_at_least_90_percent_of_the_time(chaos_campaign):
    share, failed = _success_share([p for p in chaos_campaign if not p.flipped])
    assert share >= 0.9, failed


@pytestmark_chaos
def test_chaos_flipped_bytes_are_retried(chaos_campaign):
    assert any(p.flipped for p in chaos_campaign), "no pull had a flipped byte: set TOSI_CHAOS_FAULTS"
    share, failed = _success_share(chaos_campaign)
    assert share >= 0.9, failed


# ---------------------------------------------------------------- stress

class StressRun:
    def __init__(self):
        self.problems = []  # failed processes, trees unlike the model's
        self.layer_gets = {}  # digest: GETs of it over all rounds
        self.config_gets = {}
        self.processes = 0


@pytest.fixture(scope="module")
def stress_run(request, registry, pusher, tmp_path_factory):
    """Rounds of 8 tosi processes at once on one workdir: 4 images sharing base layers (one of
    them shared by every round), each pulled flat by one process and mounted by another."""
    rng = random.Random(5)
    base = tmp_path_factory.mktemp("stress")
    workdir = str(base / "workdir")
    shared = make_layer([file_entry("base/os", rng.randbytes(300_000))], compression=None)
    run = StressRun()
    with FaultProxy(registry.url) as proxy:
        proxy.add(Rule("delay", path="/blobs/", seconds=0.2))  # the processes overlap for certain
        host = proxy.url.split("://", 1)[1]
        for round_ in range(examples(2, 6)):
            middle = [make_layer([file_entry(f"mid/{k}", rng.randbytes(50_000))]) for k in range(2)]
            images = []
            for k in range(4):
                own = make_layer([file_entry(f"own/{k}", rng.randbytes(rng.randrange(1000, 80_000)))],
                                 compression=rng.choice(("gzip", "zstd", None)))
                images.append(pusher.push_image("robustness/stress", f"r{round_}-{k}", [shared, middle[k % 2], own]))
            procs = []
            for i in range(8):
                image, mode = images[i % 4], ("-mount" if i >= 4 else "-extractto")
                target = str(base / f"r{round_}-p{i}")
                procs.append((image, mode, target, subprocess.Popen(
                    tosi_cmd("-image", f"{host}/{image.repo}:{image.tag}", mode, target, "-workdir", workdir),
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
            for image, mode, target, proc in procs:
                try:
                    _, err = proc.communicate(timeout=180)
                    if proc.returncode != 0:
                        run.problems.append(f"round {round_} {mode} {image.tag}: {err.strip()}")
                        continue
                    expected = without_root(layermodel.snapshot(layermodel.rootfs(image.layers)))
                    if without_root(snapshot(target)) != expected:
                        run.problems.append(f"round {round_} {mode} {image.tag}: not the model's tree")
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    if mode == "-mount":
                        unmount_all(target)
            run.processes += len(procs)
            for image in images:
                for lay in image.layers:
                    run.layer_gets[lay.digest] = proxy.count("GET", f"/blobs/{lay.digest}")
                config = "sha256:" + hashlib.sha256(image.config).hexdigest()
                run.config_gets[config] = proxy.count("GET", f"/blobs/{config}")
    request.config._tosi_robustness.add("stress", cases=run.processes, failures=len(run.problems))
    return run


pytestmark_stress = pytest.mark.robustness("stress")


@pytestmark_stress
def test_eight_processes_pulling_overlapping_images_all_succeed_with_the_model_trees(stress_run):
    assert stress_run.processes >= 16
    assert stress_run.problems == []


@pytestmark_stress
def test_eight_processes_pulling_overlapping_images_download_every_layer_blob_once(stress_run):
    assert {d: n for d, n in stress_run.layer_gets.items() if n != 1} == {}


@pytestmark_stress
def test_eight_processes_pulling_overlapping_images_download_every_config_blob_once(stress_run):
    assert {d: n for d, n in stress_run.config_gets.items() if n != 1} == {}
