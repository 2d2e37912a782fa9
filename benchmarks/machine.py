"""What every benchmark records beside its numbers: the commit, the date and the machine.

A number is true of the code and the machine it was measured on; each benchmark writes
:func:`machine` into its JSON and :func:`describe` into its page, read from this machine at run
time, never a machine assumed in the text.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: pyinfra of the interpreter running this (the project's venv, or a controller tree's)
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
#: seconds for ``git rev-parse``
GIT_TIMEOUT = 60
#: seconds for one deploy a benchmark runs: a first one compiles llama.cpp (about 10 minutes on 2
#: cores); an hour means it hangs, and the benchmark fails instead of waiting forever
DEPLOY_TIMEOUT = 3600
#: seconds for a short local command (``tc``, ``nvidia-smi``)
COMMAND_TIMEOUT = 120


def _commit() -> str:
    """The checkout's short commit, with "+changes" when tracked files differ from it (a page must
    not claim a commit its code was not); "unknown" without git or outside a checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=GIT_TIMEOUT).stdout.strip()
    except OSError:
        return "unknown"
    return (head + ("+changes" if dirty else "")) or "unknown"


def _proc_value(path: str, key: str) -> str | None:
    """The value of the first ``key:`` line of a /proc file (``/proc/meminfo``, ``/proc/cpuinfo``)."""
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def machine() -> dict[str, object]:
    """commit, date (UTC, ISO 8601), cores (``os.cpu_count()``), memory_gib (MemTotal), cpu (its
    model name), kernel."""
    mem_kib = int((_proc_value("/proc/meminfo", "MemTotal") or "0 kB").split()[0])
    return {"commit": _commit(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cores": os.cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "cpu": _proc_value("/proc/cpuinfo", "model name") or platform.machine() or "unknown",
            "kernel": f"{platform.system()} {platform.release()}"}


def describe(m: Mapping[str, object]) -> str:
    """How a page states the run: ``at commit ea00c51, 2026-12-03T10:20:00+00:00, on 2 cores /
    7.8 GiB (AMD EPYC 7B13, Linux 6.8.0)``; the CPU and kernel where recorded."""
    detail = ", ".join(str(m[k]) for k in ("cpu", "kernel") if m.get(k))
    return (f"at commit {m['commit']}, {m['date']}, on {m['cores']} cores / {m['memory_gib']} GiB"
            + (f" ({detail})" if detail else ""))


def raw_path(out: Path, prefix: str, run: Mapping[str, object]) -> Path:
    """Where a run's raw JSON goes: ``<prefix>-<date>.json``; when a file of that name is there
    from another commit (an earlier run of the same day), ``<prefix>-<date>-<commit>.json``, so a
    second run never overwrites the raw file an earlier page or doc quotes."""
    date, commit = str(run["date"])[:10], str(run["commit"])
    path = out / f"{prefix}-{date}.json"
    if not path.exists():
        return path
    try:
        d = json.loads(path.read_text())
        earlier = d.get("commit") or (d.get("machine") or {}).get("commit")
    except (OSError, ValueError, AttributeError):
        earlier = None  # unreadable: not this run's to overwrite either
    return path if earlier == commit else out / f"{prefix}-{date}-{commit.replace('+', '-')}.json"


def committed(path: Path) -> str:
    """The last commit that changed ``path``, and its date: what a page rendered from a raw file
    names when the file records no commit of its own (a device run's JSON); refused for a file
    git does not have, whose numbers no commit backs."""
    out = subprocess.run(["git", "log", "-1", "--format=%h, %cs", "--", path.name], cwd=path.parent,
                         capture_output=True, text=True, check=True, timeout=GIT_TIMEOUT).stdout.strip()
    if not out:
        raise SystemExit(f"{path} is not committed: commit the run's raw file before rendering its page")
    return out


@dataclass
class DeployResult:
    rc: int
    report: dict | None
    stdout: str
    stderr: str

    @property
    def changed(self) -> int:
        """Operation/host pairs that ran commands (pyinfra's own 'success' count)."""
        assert self.report is not None, self.stderr[-3000:]
        return self.report["results"]["totals"]["success"]


def failure_text(result: DeployResult, tail: int = 3000) -> str:
    """What a failed deploy said: every line that names an error, with the two lines before it
    (pyinfra prints a host's error far above the end of a long run), then the end of the output."""
    lines = (result.stdout + result.stderr).splitlines()
    picked = [n for n, ln in enumerate(lines) if "Error" in ln or "error:" in ln]
    errors = [lines[k] for n in picked for k in range(max(n - 2, 0), n + 1)]
    return "\n".join(errors[-60:]) + "\n--- end of output ---\n" + (result.stdout + result.stderr)[-tail:]


def run_deploy(inventory: Path, *extra: str, env: dict[str, str] | None = None,
               timeout: float = DEPLOY_TIMEOUT, deploy: str = "deploy.py") -> DeployResult:
    """``pyinfra -y --json INVENTORY deploy.py``, as an operator runs it (``deploy``: another
    deploy file, e.g. one that calls a single role)."""
    proc = subprocess.run(
        [PYINFRA, "-y", "--json", str(inventory), deploy, *extra],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout,
    )
    report = None
    if proc.returncode == 0:
        report = json.loads(proc.stdout)
    return DeployResult(proc.returncode, report, proc.stdout, proc.stderr)


def publish(md: Path, prefix: str, run: Mapping[str, object], results: dict,
            page: Callable[[dict, str], str]) -> str:
    """A run's end, the same for every writer: its raw JSON beside the page (``raw_path``: never
    over another commit's file), then the page from those results, naming that file; printed."""
    raw = raw_path(md.parent, prefix, run)
    raw.write_text(json.dumps(results, indent=1) + "\n")
    text = page(results, raw.name)
    md.write_text(text)
    print(text)
    return text


def render_or_run(md: Path, page: Callable[[dict, str], str], run: Callable[[], int]) -> int:
    """A writer's command line: ``--render RAW.json`` writes ``md`` again from a run's raw JSON,
    no host booted (what tests/unit/test_benchmark_pages checks); anything else is a run."""
    if sys.argv[1:2] == ["--render"]:
        raw = Path(sys.argv[2])
        md.write_text(page(json.loads(raw.read_text()), raw.name))
        return 0
    return run()
