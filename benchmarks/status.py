"""How long ``llamadeploy status`` takes on 1, 3 and 10 hosts, against the implementation before
it was made fast, side by side in one run. Not a test.

Boots ten throwaway sandbox hosts, deploys the test model on all of them, then times
``llamadeploy status INVENTORY --json`` on the first 1, 3 and 10 hosts, ``ROUNDS`` times each
(median reported), alternating:

* **baseline**: the status of commit ``BASELINE`` (one host after the other, one SSH command per
  read: about seven per host), run from a tree exported from git, in the layout the wheel has;
* **now**: this checkout's (all hosts at once, two commands per host).

Both must exit 0 and print the same rows: a faster status that says something else is no
status. Writes ``benchmarks/STATUS.md`` and a JSON file. Only test-host addresses are used.

    sudo .venv/bin/python -m benchmarks.status [ROUNDS]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import COMMAND_TIMEOUT, DEPLOY_TIMEOUT, describe, machine, raw_path
from llamadeploy.sandbox import SandboxHost
from llamadeploy.sandbox.inventory import SHARED_BINDS, SHARED_OVERLAYS, default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
#: the last commit whose status asked each host in turn, one command per read
BASELINE = "e6a7342"
SIZES = (1, 3, 10)


def export(commit: str, dest: Path) -> Path:
    """``commit``'s package as the wheel lays it out (roles/ and templates/ inside llamadeploy/), so
    that ``python -m llamadeploy.cli`` run with it first on the path imports nothing of this
    checkout."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit, "llamadeploy", "roles", "templates"], cwd=REPO,
                             capture_output=True, check=True, timeout=COMMAND_TIMEOUT).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=COMMAND_TIMEOUT)
    for part in ("roles", "templates"):
        shutil.move(str(dest / part), str(dest / "llamadeploy" / part))
    return dest


def status(tree: Path, inventory: Path, cache: Path) -> tuple[float, list[dict]]:
    """Seconds for one ``status --json`` run with ``tree`` first on the path and ``cache`` as the
    controller's cache (model headers and hashes), and its rows."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "llamadeploy.cli", "status", str(inventory), "--json"],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                         "LLAMADEPLOY_CACHE": str(cache)},
                          capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"status from {tree} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return took, json.loads(proc.stdout)


def imported_from(tree: Path) -> str:
    """Where ``llamadeploy.roles`` comes from with ``tree`` first on the path (the check that the
    baseline runs its own code)."""
    proc = subprocess.run([sys.executable, "-c", "import llamadeploy.roles.release as r; print(r.__file__)"],
                          cwd=tree, env={"PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True,
                          timeout=COMMAND_TIMEOUT)
    return proc.stdout.strip()


def main(rounds: int = 3) -> int:
    hosts = [SandboxHost(f"stb{i}", 160 + i, binds=dict(SHARED_BINDS),
                         overlays=dict(SHARED_OVERLAYS)) for i in range(1, max(SIZES) + 1)]
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-status-"))
    results: dict[str, object] = {**machine(), "rounds": rounds, "baseline": BASELINE}
    rows: list[dict] = []
    try:
        base = export(BASELINE, tmp / "baseline")
        where = imported_from(base)
        if not where.startswith(str(base)):
            raise RuntimeError(f"the baseline imports {where}, not its own tree")
        for h in hosts:
            h.boot()
        everything = write_inventory(tmp / "all.py", hosts, default_data())
        proc = subprocess.run([str(BIN / "pyinfra"), "-y", str(everything), "deploy.py"], cwd=REPO,
                              capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"deploy failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        trees = {"baseline": base, "now": REPO}
        # a first run on an empty controller cache reads the model's GGUF header once (what an
        # operator's first status pays); each side gets its own, then keeps it warm for the rounds
        caches = {label: tmp / f"cache-{label}" for label in trees}
        one = write_inventory(tmp / "hosts-1.py", hosts[:1], default_data())
        results["cold_1_host_s"] = {label: status(tree, one, caches[label])[0] for label, tree in trees.items()}
        print(results["cold_1_host_s"], flush=True)
        for n in SIZES:
            inv = write_inventory(tmp / f"hosts-{n}.py", hosts[:n], default_data())
            runs: dict[str, list[float]] = {"baseline": [], "now": []}
            for _ in range(rounds):
                for label, tree in trees.items():
                    took, got = status(tree, inv, caches[label])
                    runs[label].append(took)
                    if label == "baseline":
                        expected = got
                    elif got != expected:
                        raise RuntimeError(f"{n} hosts: the rows differ\nbaseline: {expected}\nnow: {got}")
            row = {"hosts": n, **{k: {"median_s": statistics.median(v), "runs_s": v} for k, v in runs.items()}}
            row["ratio"] = row["baseline"]["median_s"] / row["now"]["median_s"]
            rows.append(row)
            print(row, flush=True)
        results["rows"] = rows
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    raw = raw_path(OUT, "status", results)
    raw.write_text(json.dumps(results, indent=1) + "\n")

    def cell(r: dict, k: str) -> str:
        return f"{r[k]['median_s']:.1f} s ({', '.join(f'{x:.1f}' for x in r[k]['runs_s'])})"

    cold = results["cold_1_host_s"]
    table = "\n".join(f"| {r['hosts']} | {cell(r, 'baseline')} | {cell(r, 'now')} | {r['ratio']:.1f}x |" for r in rows)
    text = f"""# `llamadeploy status`: 1, 3 and 10 hosts

Written whole by `benchmarks/status.py` {describe(results)}. Raw runs: `{raw.name}`.

Ten sandbox hosts on this machine's veth network, each serving Gemma 3 270M Q4_K_M (llama.cpp
b11434, deployed by `deploy.py`). `llamadeploy status INVENTORY --json` on the first N hosts, the
whole command as an operator runs it (Python start, inventory, validation, SSH connects, reads,
drift); median of {rounds} runs, each run in brackets, baseline and now alternating. Both
printed the same rows in every run.

- **baseline**: commit `{BASELINE}`: one host after the other, one SSH command per read;
- **now**: this commit: every host at once on pyinfra's pool, two commands per host (what the
  deploy left, then the running release's service and health).

| hosts | baseline | now | baseline / now |
|---|---|---|---|
{table}

The first run on an empty controller cache (1 host; it reads the model's GGUF header once, as an
operator's first `status` does): baseline {cold['baseline']:.1f} s, now {cold['now']:.1f} s. The rounds above
start after it, each side on its own warm cache.
"""
    (OUT / "STATUS.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:])))
