"""The benchmark loop shared by bench/run and bench/unpack.

For each image: generate it (or take it from the cache), push it to a throwaway
docker-registry on 127.0.0.1, then for each round measure every competitor on
every filesystem under test, alternating the commands so that a slow phase of
the machine hits them all alike. A competitor whose tool is missing is reported
"not-installed"; one that fails is reported "failed" with its error and not
retried. The results are plain dicts, ready for report.py and JSON.
"""

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from tests.support.images import Pusher
from tests.support.registry import Registry

from . import ROOT, imagegen, measure, profile, report, tools
from .competitors import Target, python
from .measure import CommandFailed, summary
from .report import log
from .scratch import DISK, EXT4, KINDS, TMPFS, remove_tree, scratch_space


@dataclass
class ImageSpec:
    key: str            # "a", "b", ...: the name for it
    name: str           # short name, also the repository name
    make: object        # make(directory) -> BuiltImage
    cache_key: str = None  # generated once into bench/.cache/images/<cache_key>; None: per run


def common_flags(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="small synthetic images, one run, nothing installed (the test suite's mode)")
    parser.add_argument("--runs", type=int, default=None, help="measurements per command (default 3; 1 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="write the results here (default bench/results/<time>.json)")
    parser.add_argument("--fs", type=filesystems, default=[TMPFS, EXT4],
                        help=f"comma-separated filesystems to measure on, of {', '.join(KINDS)} "
                        f"(default {TMPFS},{EXT4}; 'both' is {TMPFS},{DISK})")
    parser.add_argument("--tmpfs-size", default=None, help="size of the tmpfs (default 10g; 1g with --quick)")
    parser.add_argument("--ext4-size", default=None,
                        help="size of the loop-mounted ext4 (default 16g; 2g with --quick)")
    parser.add_argument("--images", default=None, help="comma-separated image keys to run (default all)")
    parser.add_argument("--commands", default=None,
                        help="comma-separated rows to measure (e.g. tosi-extractto-cold,tar-xzf; default all)")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    parser.add_argument("--profile", metavar="DIR",
                        help="afterwards, run each tosi command once more under py-spy on the first "
                        "filesystem; raw samples go to DIR, a summary to the table and JSON")
    return parser


def filesystems(value):
    kinds = [TMPFS, DISK] if value == "both" else value.split(",")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds or len(set(kinds)) != len(kinds):
        raise argparse.ArgumentTypeError(f"{value!r}: a comma-separated list of {', '.join(KINDS)}")
    return kinds


def _terminate_cleanly(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def machine():
    info = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            info["memKiB"] = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return info


def compile_package():
    """Byte-compile tosi_tools as installing it would: with PYTHONDONTWRITEBYTECODE
    (or a read-only checkout) every measured run would compile it from source again."""
    # Not checked: a module that cannot be compiled (or written) is timed as before.
    subprocess.run([python(), "-m", "compileall", "-q", os.path.join(ROOT, "tosi_tools")],
                   stdout=subprocess.DEVNULL)


def run_benchmark(name, specs, competitors, args, needed_tools):
    """Measure every competitor on every image; returns the results dict."""
    signal.signal(signal.SIGTERM, _terminate_cleanly)
    compile_package()
    runs = args.runs or (1 if args.quick else 3)
    kinds = args.fs
    wanted = set(args.images.split(",")) if args.images else None
    specs = [s for s in specs if wanted is None or s.key in wanted or s.name in wanted]
    if args.commands:
        chosen = set(args.commands.split(","))
        competitors = [c for c in competitors if chosen & set(c.rows)]
    found = tools.ensure(needed_tools, install=not (args.quick or args.no_install))
    results = {
        "benchmark": name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": bool(args.quick),
        "runs": runs,
        "filesystems": kinds,
        "machine": machine(),
        "rssSource": measure.rss_source(),
        "tools": {n: {"installed": p is not None, "version": p and tools.version(p)} for n, p in found.items()},
        "images": {},
        "rows": [],
        "profiles": [],
    }
    tmpfs_size = args.tmpfs_size or ("1g" if args.quick else "10g")
    ext4_size = args.ext4_size or ("2g" if args.quick else "16g")
    with scratch_space(kinds, tmpfs_size, ext4_size=ext4_size) as (base, spaces):
        registry = Registry(os.path.join(base, "registry")).start()
        try:
            pusher = Pusher(registry.url)
            for spec in specs:
                try:
                    image = _build(spec, base)
                except (RuntimeError, OSError) as exc:  # debootstrap without a mirror, a full disk
                    log(f"image ({spec.key}) {spec.name} could not be built: {exc}")
                    results["images"][spec.key] = {"name": spec.name, "error": str(exc)[:2000]}
                    continue
                results["images"][spec.key] = {"name": spec.name, **image.summary()}
                imagegen.push(pusher, f"bench/{spec.name}", "latest", image)
                log(f"image ({spec.key}) {spec.name}: {image.description}, "
                    f"{image.entries:,} entries, {image.blob_bytes / 2**20:,.1f} MiB of blobs")
                targets = [Target(spec.key, image, registry, f"bench/{spec.name}", "latest", spaces[k])
                           for k in kinds]
                results["rows"] += _measure_image(targets, competitors, runs, found)
                if args.profile:
                    results["profiles"] += _profile_image(targets[0], competitors, results["rows"],
                                                          args.profile, name)
                for space in spaces.values():
                    _empty(space.root)
        finally:
            registry.stop()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return results


def _build(spec, base):
    if spec.cache_key:
        return imagegen.cached(spec.cache_key, spec.make)
    directory = os.path.join(base, "images", spec.name)
    os.makedirs(directory)
    return spec.make(directory)


def _empty(root):
    for name in os.listdir(root):
        remove_tree(os.path.join(root, name))


def _measure_image(targets, competitors, runs, found):
    samples = {}    # (fs, row) -> [Sample]
    status = {}     # (fs, competitor index) -> None | ("failed"|"not-installed", why)
    for index, competitor in enumerate(competitors):
        missing = [n for n in competitor.needs if not found.get(n) and not shutil.which(n)]
        for target in targets:
            status[(target.scratch.kind, index)] = ("not-installed", ", ".join(missing)) if missing else None
    for round_ in range(runs):
        # Each round starts with another command: the first after the last filesystem was
        # emptied pays for memory the VM handed back (see the README), not always the same one.
        order = list(enumerate(competitors))
        order = order[round_ % len(order):] + order[:round_ % len(order)]
        for target in targets:
            for index, competitor in order:
                key = (target.scratch.kind, index)
                if status[key] is not None:
                    continue
                what = f"({target.image_key}) {target.scratch.kind} round {round_ + 1}/{runs}: " \
                       f"{', '.join(competitor.rows)}"
                try:
                    if round_ == 0:
                        competitor.setup(target)
                    # Each command starts with no dirty pages of the ones before it (the
                    # image push, the blob copies, the last tree) for the kernel to write back.
                    os.sync()
                    measured = competitor.measure(target)
                except CommandFailed as exc:
                    log(f"{what}: FAILED: {exc}")
                    status[key] = ("failed", str(exc))
                    continue
                for row, sample in measured.items():
                    samples.setdefault((target.scratch.kind, row), []).append(sample)
                log(f"{what}: " + ", ".join(f"{s.seconds:.2f}s" for s in measured.values()))
    rows = []
    for target in targets:
        kind = target.scratch.kind
        for index, competitor in enumerate(competitors):
            for row, label in competitor.rows.items():
                record = {"image": target.image_key, "fs": kind, "command": row, "label": label}
                state = status[(kind, index)]
                if (kind, row) in samples and state is None:
                    record.update(status="ok", **summary(samples[(kind, row)]))
                else:
                    record.update(status=state[0] if state else "failed", error=state[1] if state else None)
                rows.append(record)
    return rows


def _profile_image(target, competitors, rows, directory, name):
    if not profile.py_spy():
        log("no py-spy (pip install py-spy): nothing profiled")
        return []
    os.makedirs(directory, exist_ok=True)
    measured = {(r["fs"], r["command"]) for r in rows if r["image"] == target.image_key and r["status"] == "ok"}
    out = []
    for competitor in competitors:
        for row in competitor.rows:
            if not competitor.profiled or (target.scratch.kind, row) not in measured:
                continue
            raw = os.path.join(directory, f"{name}-{target.image_key}-{target.scratch.kind}-{row}.txt")
            try:
                sample = competitor.measure(target, wrap=profile.wrapper(raw))[row]
            except CommandFailed as exc:
                log(f"profiling {row} on ({target.image_key}) failed: {exc}")
                continue
            log(f"profiled {row} on ({target.image_key}) {target.scratch.kind}: {sample.seconds:.2f}s, {raw}")
            out.append({"image": target.image_key, "fs": target.scratch.kind, "command": row,
                        "seconds": round(sample.seconds, 3), "raw": raw, **profile.summarize(raw)})
    return out


def main(name, specs, competitors, ratio_specs, rss_limits, args, needed_tools):
    """Run, print the table, write the JSON; exit status 0 unless the run itself broke."""
    try:
        results = run_benchmark(name, specs, competitors, args, needed_tools)
    except KeyboardInterrupt:
        log("interrupted; everything mounted or made was removed")
        return 130
    results["ratios"] = report.ratios(results, ratio_specs)
    results["rss"] = report.rss_checks(results, rss_limits)
    path = report.write_json(results, args.json, name)
    sys.stdout.write(report.table(results))
    log(f"results written to {path}")
    return 0
