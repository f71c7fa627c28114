"""The robustness suite's shared pieces: example counts, hypothesis settings, counters.

Tests of the suite carry `pytest.mark.robustness("<area>")` (areas: properties,
fuzz, chaos, stress) and report what they did through the `robustness` fixture:

    def test_x(robustness):
        robustness.add(cases=1, faults=3, killed=1, corrupted=2, failures=0)

tests/conftest.py adds those counters up per area, prints one line per area at the
end of the run, and writes them as JSON with `--robustness-report FILE`
(scripts/robustness reads it to print its summary).

Default runs keep example counts small; `--slow` (conftest sets SLOW before the
test modules are imported) makes them bigger and draws new random examples
instead of the same derandomized ones.
"""

import collections

SLOW = False

AREAS = ("properties", "fuzz", "chaos", "stress")
COUNTERS = ("cases", "faults", "killed", "corrupted", "failures")


def examples(default, slow):
    """How many examples (or rounds) a test runs: `default`, or `slow` with --slow."""
    return slow if SLOW else default


def hypothesis_settings(default, slow, **extra):
    """hypothesis.settings for a test of the suite: `default` examples (the same ones each
    run) or, with --slow, `slow` random ones; no example database in the source tree."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=examples(default, slow), deadline=None, database=None,
                    derandomize=not SLOW, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.filter_too_much],
                    **extra)


class Counters:
    """Per-area counters of one session (see the module docstring)."""

    def __init__(self):
        self.areas = collections.defaultdict(collections.Counter)

    def add(self, area, **counts):
        unknown = set(counts) - set(COUNTERS)
        if unknown:
            raise ValueError(f"unknown robustness counters {sorted(unknown)}")
        self.areas[area].update(counts)


class AreaCounters:
    """What the `robustness` fixture gives a test: Counters bound to the test's area."""

    def __init__(self, counters, area):
        self._counters, self.area = counters, area

    def add(self, **counts):
        self._counters.add(self.area, **counts)


def summary_lines(areas, outcomes):
    """One line per area: `area: tests ...; N cases, N faults injected, ...`.

    `areas` {area: {counter: n}}; `outcomes` {area: {"passed"|"failed"|"xfailed"|...: n}}.
    """
    lines = []
    for area in [a for a in AREAS if a in areas or a in outcomes] + sorted(
            (set(areas) | set(outcomes)) - set(AREAS)):
        c = collections.Counter(areas.get(area, {}))
        o = collections.Counter(outcomes.get(area, {}))
        tests = f"{o['passed']} passed, {o['failed']} failed" + (
            f", {o['xfailed']} xfailed" if o["xfailed"] else "")
        lines.append(f"{area}: tests {tests}; {c['cases']} cases, {c['faults']} faults injected, "
                     f"{c['killed']} processes killed, {c['corrupted']} bytes corrupted, "
                     f"{c['failures'] + o['failed']} failures")
    return lines


def main(argv):
    """`python -m tests.support.robustness REPORT`: the summary of a --robustness-report file,
    a line per area, then `N passed, M failed` (scripts/robustness)."""
    import json

    try:
        with open(argv[1]) as f:
            report = json.load(f)
    except (OSError, ValueError):
        print("robustness: no report (pytest stopped before the end of the run)")
        return 1
    outcomes = report.get("outcomes", {})
    print("robustness summary")
    for line in summary_lines(report.get("areas", {}), outcomes):
        print(f"  {line}")
    passed = sum(o.get("passed", 0) for o in outcomes.values())
    failed = sum(o.get("failed", 0) for o in outcomes.values())
    print(f"{passed} passed, {failed} failed")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv))
