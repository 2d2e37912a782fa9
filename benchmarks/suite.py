"""How long the test suite took, from the JUnit reports ``scripts/test`` keeps. Not a test.

``scripts/test`` runs three phases, each with its own report in ``test-results/``: the pure
tests, ``test_native`` (the compile) and the other e2e modules on pytest-xdist workers beside it.
This reads those reports and writes ``benchmarks/SUITE.md`` (or ``--page``) whole: per phase its tests, outcome
and wall time, per e2e module the time its tests took, and the ten slowest tests, with the
commit the suite ran at and the machine. ``--wall`` adds the whole ``.ci/run``'s time as
measured around it (``time ./.ci/run``), which no report holds.

    .venv/bin/python -m benchmarks.suite [TREE] [--wall SECONDS] [--caches TEXT] [--note TEXT] [--page NAME]
    .venv/bin/python -m benchmarks.suite --render benchmarks/suite-DATE-COMMIT.json --page NAME  # no reports

TREE is the checkout the suite ran in (default: this one); its ``test-results/`` is read and its
commit recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from benchmarks.machine import GIT_TIMEOUT, describe, machine, raw_path

OUT = Path(__file__).resolve().parent
PHASES = (("pure tests (unit, operation specs, package, Hub)", "junit-pure.xml"),
          ("tests/e2e/test_native.py (the compile; beside the next phase from its release on)", "junit-e2e-native.xml"),
          ("the other e2e modules (pytest-xdist workers)", "junit-e2e.xml"))


def read(report: Path) -> dict[str, object]:
    """One JUnit report: counts, pytest's wall time for the session, and each test's time."""
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None, f"{report}: no testsuite"
    cases = [{"name": f"{c.get('classname')}::{c.get('name')}", "time_s": float(c.get("time") or 0),
              "outcome": next((child.tag for child in c if child.tag in ("failure", "error", "skipped")), "passed")}
             for c in suite.iter("testcase")]
    return {"tests": int(suite.get("tests") or 0), "failures": int(suite.get("failures") or 0),
            "errors": int(suite.get("errors") or 0), "skipped": int(suite.get("skipped") or 0),
            "wall_s": float(suite.get("time") or 0), "cases": cases}


def module_of(name: str) -> str:
    """``tests.e2e.test_front::test_x`` -> ``tests/e2e/test_front.py``."""
    return name.split("::")[0].replace(".", "/") + ".py"


def page(results: dict, raw_name: str) -> str:
    """The page from one run's raw JSON alone (a run and ``--render`` alike), so it can be checked
    against that file (tests/unit/test_benchmark_pages)."""
    phases: dict[str, dict] = results["phases"]
    cases = [c for ph in phases.values() for c in ph["cases"]]
    modules: dict[str, float] = defaultdict(float)
    for c in cases:
        if c["name"].startswith("tests.e2e."):
            modules[module_of(c["name"])] += c["time_s"]
    slowest = sorted(cases, key=lambda c: c["time_s"], reverse=True)[:10]

    def outcome(ph: dict) -> str:
        passed = ph["tests"] - ph["failures"] - ph["errors"] - ph["skipped"]
        return f"{passed} passed, {ph['failures']} failed, {ph['errors']} errors, {ph['skipped']} skipped"

    phase_rows = "\n".join(f"| {label} | {outcome(ph)} | {ph['wall_s'] / 60:.1f} min |" for label, ph in phases.items())
    module_rows = "\n".join(f"| `{m}` | {s / 60:.1f} min |" for m, s in sorted(modules.items(), key=lambda kv: -kv[1]))
    slow_rows = "\n".join(f"| `{c['name'].split('.')[-1]}` | {c['time_s']:.0f} s |" for c in slowest)
    wall_s, caches, note = results.get("wall_s"), results.get("caches"), results.get("note")
    wall = f"**{wall_s / 60:.1f} min** for the whole `.ci/run` (setup, lint and the three phases)" if wall_s else \
        "the whole `.ci/run` was not timed"
    return f"""# The suite's time

Written whole by `benchmarks/suite.py` from the JUnit reports of one `./scripts/test` run,
{describe(results)}; {wall}. Raw: `{raw_name}`.{f" Caches when it began: {caches}." if caches else ""}
{f"{note}" + chr(10) if note else ""}
| phase | tests | wall time |
|---|---|---|
{phase_rows}

The e2e phases overlap: the other modules start once test_native's release is in the controller
cache. Per e2e module, the time of its tests (setup and teardown included; the workers run
modules side by side, so these add up to more than the wall time):

| module | its tests |
|---|---|
{module_rows}

The ten slowest tests:

| test | time |
|---|---|
{slow_rows}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.suite")
    p.add_argument("tree", nargs="?", default=str(OUT.parent))
    p.add_argument("--wall", type=float, help="seconds the whole .ci/run took (time ./.ci/run)")
    p.add_argument("--caches", default="", help="what the machine had cached when the run began (the controller "
                   "cache's releases, ccache, the rootfs trees): a cold run and a warm one differ by minutes")
    p.add_argument("--note", default="", help="one sentence the page adds, kept in the raw JSON too (how this run "
                   "relates to others: which page holds a cold run); no figure from another run")
    p.add_argument("--page", help="the page to write under benchmarks/ (default SUITE.md; a cold-cache run's "
                   "beside the warm one: SUITE-COLD.md; required with --render, which knows no page of its own)")
    p.add_argument("--render", metavar="RAW.json", help="write the page again from a run's raw JSON (no reports read)")
    a = p.parse_args(argv)
    if a.render and not a.page:
        p.error("--render needs --page: which page that raw file's run wrote (SUITE.md, SUITE-COLD.md)")
    md = OUT / Path(a.page or "SUITE.md").name
    if a.render:
        raw = Path(a.render)
        md.write_text(page(json.loads(raw.read_text()), raw.name))
        return 0
    tree = Path(a.tree)
    run = machine()
    run["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                                   check=True, timeout=GIT_TIMEOUT).stdout.strip()
    phases = {label: read(tree / "test-results" / name) for label, name in PHASES
              if (tree / "test-results" / name).exists()}
    results = {**run, "wall_s": a.wall, "caches": a.caches, "note": a.note, "phases": phases}
    raw = raw_path(OUT, "suite", run)
    raw.write_text(json.dumps(results, indent=1) + "\n")
    text = page(results, raw.name)
    md.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
