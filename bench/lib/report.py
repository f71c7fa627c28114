"""Progress lines on stderr, the results table on stdout, the results as JSON."""

import sys
import time

_START = time.monotonic()


def log(message):
    print(f"[{time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- goals

class Ratio:
    """median(numerator) / median(denominator) per image and filesystem, against a goal."""

    def __init__(self, numerator, denominator, label, goal=None, images=None):
        self.numerator = numerator
        self.denominator = denominator
        self.label = label
        self.goal = goal          # a number, {image key: number}, or None (shown, not judged)
        self.images = images      # image keys it applies to; None: all

    def goal_for(self, image):
        return self.goal.get(image) if isinstance(self.goal, dict) else self.goal


class RssLimit:
    """Peak RSS of the given rows stays under `mib` on the given images."""

    def __init__(self, commands, mib, images=None, label=None):
        self.commands = commands
        self.mib = mib
        self.images = images
        self.label = label or f"peak RSS of {', '.join(commands)}"


def _ok_rows(results):
    return {(r["image"], r["fs"], r["command"]): r for r in results["rows"] if r["status"] == "ok"}


def _places(results, spec):
    """(image, filesystem) pairs a goal applies to."""
    for image, built in results["images"].items():
        if "error" not in built and (spec.images is None or image in spec.images):
            for fs in results["filesystems"]:
                yield image, fs


def ratios(results, specs):
    rows = _ok_rows(results)
    out = []
    for spec in specs:
        for image, fs in _places(results, spec):
            num = rows.get((image, fs, spec.numerator))
            den = rows.get((image, fs, spec.denominator))
            goal = spec.goal_for(image)
            value = num["median"] / den["median"] if num and den and den["median"] > 0 else None
            out.append({
                "image": image, "fs": fs, "label": spec.label,
                "numerator": spec.numerator, "denominator": spec.denominator,
                "ratio": value, "goal": goal,
                "met": None if value is None or goal is None else value <= goal,
            })
    return out


def rss_checks(results, limits):
    rows = _ok_rows(results)
    out = []
    for limit in limits:
        for image, fs in _places(results, limit):
            peaks = [rows[(image, fs, c)]["maxRssKiB"] for c in limit.commands if (image, fs, c) in rows]
            peak = max(peaks) / 1024 if peaks else None
            out.append({"image": image, "fs": fs, "label": limit.label, "commands": limit.commands,
                        "peakMiB": None if peak is None else round(peak, 1), "limitMiB": limit.mib,
                        "met": None if peak is None else peak < limit.mib})
    return out


# ---------------------------------------------------------------- output

def write_json(results, path, name):
    import json
    import os

    from . import RESULTS
    if path is None:
        os.makedirs(RESULTS, exist_ok=True)
        path = os.path.join(RESULTS, f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _mib(n):
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"


def _cell(row):
    if row is None:
        return ["", "", ""]
    if row["status"] != "ok":
        return [row["status"], "", ""]
    return [f"{row['median']:.3f}s", f"{row['min']:.2f}-{row['max']:.2f}", f"{row['maxRssKiB'] / 1024:.0f} MiB"]


def _yes_no(met):
    return "-" if met is None else ("yes" if met else "NO")


def _format(lines, widths):
    return "".join(
        "  " + "".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in
                       enumerate(zip(line, widths))).rstrip() + "\n"
        for line in lines)


def _check_lines(checks, image, fss, field, show_goal, show_value, goal_field="goal"):
    """One table line per check label: label, goal, then value and met? per filesystem."""
    by_label = {}
    for r in checks:
        if r["image"] == image:
            by_label.setdefault(r["label"], {})[r["fs"]] = r
    lines = []
    for label, per_fs in by_label.items():
        line = [label, show_goal(next(iter(per_fs.values()))[goal_field])]
        for fs in fss:
            r = per_fs.get(fs)
            value = r and r[field]
            line += [show_value(value) if value is not None else "n/a", _yes_no(r and r["met"])]
        lines.append(line)
    return lines


def table(results):
    """The human-readable results: per image, times per filesystem, then ratios and goals."""
    fss = results["filesystems"]
    rows = {(r["image"], r["fs"], r["command"]): r for r in results["rows"]}
    out = [f"{results['benchmark']}: {results['runs']} run(s) per command, median and min-max spread; "
           f"{results['machine'].get('cpus')} CPUs\n"]
    for key, image in results["images"].items():
        if "error" in image:
            out.append(f"\n({key}) {image['name']}: not built: {image['error']}\n")
            continue
        out.append(f"\n({key}) {image['name']}: {image['description']}; {image['layers']} layers, "
                   f"{image['entries']:,} entries, {_mib(image['unpackedBytes'])} of files, "
                   f"{_mib(image['blobBytes'])} of blobs\n")
        labels = {}
        for r in results["rows"]:
            if r["image"] == key:
                labels.setdefault(r["command"], r["label"])
        head = ["command"] + [h for fs in fss for h in (f"{fs} median", "spread", "peak RSS")]
        body = [[labels[c]] + [cell for fs in fss for cell in _cell(rows.get((key, fs, c)))] for c in labels]
        out.append(_format([head] + body, [44] + [14, 13, 11] * len(fss)))
        failures = [r for r in results["rows"] if r["image"] == key and r["status"] == "failed"]
        for r in failures:
            out.append(f"    {r['fs']}: {r['label']}: {r.get('error')}\n")
        checks = _check_lines(results.get("ratios", []), key, fss, "ratio",
                              lambda goal: f"<= {goal}x" if goal is not None else "(info)",
                              lambda value: f"{value:.2f}x")
        checks += _check_lines(results.get("rss", []), key, fss, "peakMiB",
                               lambda limit: f"< {limit} MiB", lambda value: f"{value:.0f} MiB", "limitMiB")
        if checks:
            head = ["ratio (tosi / other)", "goal"] + [h for fs in fss for h in (fs, "met")]
            out.append("\n" + _format([head] + checks, [44, 10] + [11, 5] * len(fss)))
        for prof in results.get("profiles", []):
            if prof["image"] == key:
                out.append(f"\n  profile of {prof['command']} on {prof['fs']} ({prof['seconds']:.2f}s under py-spy, "
                           f"{prof['samples']} samples of busy threads), self time:\n")
                out += [f"    {p['percent']:5.1f}%  {p['function']}\n" for p in prof["self"][:8]]
    return "".join(out)
