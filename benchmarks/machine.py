"""What every benchmark records beside its numbers: the commit, the date and the machine.

A number is true of the code and the machine it was measured on; each benchmark writes
:func:`machine` into its JSON and :func:`describe` into its page, read from this machine at run
time, never a machine assumed in the text.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def committed(path: Path) -> str:
    """The last commit that changed ``path``, and its date: what a page rendered from a raw file
    names when the file records no commit of its own (a device run's JSON); refused for a file
    git does not have, whose numbers no commit backs."""
    out = subprocess.run(["git", "log", "-1", "--format=%h, %cs", "--", path.name], cwd=path.parent,
                         capture_output=True, text=True, check=True, timeout=GIT_TIMEOUT).stdout.strip()
    if not out:
        raise SystemExit(f"{path} is not committed: commit the run's raw file before rendering its page")
    return out
