"""No-op runs and rollouts, and the artifact cache: how long a fleet operation takes. Not a test.

Boots three throwaway sandbox hosts, deploys the test model on them, then measures, each
``ROUNDS`` times (median reported), with the same input (nothing to change):

* ``pyinfra -y INVENTORY deploy.py`` on 1 host and on 3 hosts (a no-op deploy);
* ``llamadeploy rollout`` on 1 and 3 hosts (a no-op rollout: one pyinfra run per batch);
* a fresh rollout of a new release to 3 hosts with an empty controller cache (one host
  compiles, two receive) vs with the artifact already cached (none compiles).

Writes ``benchmarks/NOOP.md`` and a JSON file. Only test-host addresses are used.

    sudo .venv/bin/python -m benchmarks.noop [ROUNDS]
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent


def timed(*cmd: str, env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return took


def median(f, rounds: int) -> tuple[float, list[float]]:
    runs = [f() for _ in range(rounds)]
    return statistics.median(runs), runs


def main(rounds: int = 3) -> int:
    hosts = [SandboxHost(f"nop{i}", 80 + i, binds=dict(SHARED_BINDS)) for i in range(1, 4)]
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-noop-"))
    results: dict[str, object] = {"rounds": rounds}
    try:
        for h in hosts:
            h.boot()
        one = write_inventory(tmp / "one.py", hosts[:1], default_data())
        three = write_inventory(tmp / "three.py", hosts, default_data())
        # --parallel 1: sandbox hosts share one apt archive (and its lock)
        results["first_deploy_3_hosts_s"] = timed(str(BIN / "pyinfra"), "-y", "--parallel", "1", str(three), "deploy.py")
        for name, inv in (("1", one), ("3", three)):
            results[f"noop_deploy_{name}_host_s"] = median(
                lambda inv=inv: timed(str(BIN / "pyinfra"), "-y", str(inv), "deploy.py"), rounds)
            results[f"noop_rollout_{name}_host_s"] = median(
                lambda inv=inv: timed(str(BIN / "llamadeploy"), "rollout", str(inv), "--batch", "100%"), rounds)
        # a new release (other flags) to 3 hosts: empty controller cache vs cached artifact
        for label, cache in (("empty_cache", tmp / "cache-empty"), ("cached", None)):
            data = default_data()
            data["llama_build"] = {**data["llama_build"], "cmake_args": {"GGML_OPENMP": "ON", "NOOP_BENCH": label}}
            inv = write_inventory(tmp / f"new-{label}.py", hosts, data)
            env = {"LLAMADEPLOY_CACHE": str(cache)} if cache else None
            results[f"new_release_rollout_3_hosts_{label}_s"] = timed(
                str(BIN / "llamadeploy"), "rollout", str(inv), "--batch", "100%", env=env)
    finally:
        for h in hosts:
            h.stop()
    stamp = datetime.date.today().isoformat()
    (OUT / f"noop-{stamp}.json").write_text(json.dumps(results, indent=1) + "\n")

    def cell(key: str) -> str:
        v = results[key]
        return f"{v[0]:.1f} s ({', '.join(f'{x:.1f}' for x in v[1])})" if isinstance(v, tuple) else f"{v:.1f} s"

    text = f"""# No-op runs, rollouts and the artifact cache ({stamp})

Gemma 3 270M Q4_K_M (253 MB), llama.cpp b11434, sandbox hosts on this machine (2 cores);
median of {rounds} runs (each run in brackets). Same input every time: nothing changes.

| what | 1 host | 3 hosts |
|---|---|---|
| no-op `pyinfra -y INV deploy.py` | {cell('noop_deploy_1_host_s')} | {cell('noop_deploy_3_host_s')} |
| no-op `llamadeploy rollout` (one batch) | {cell('noop_rollout_1_host_s')} | {cell('noop_rollout_3_host_s')} |

| a new release to 3 hosts (`rollout --batch 100%`) | time |
|---|---|
| empty controller cache: one host compiles (ccache warm), two receive the tarball | {cell('new_release_rollout_3_hosts_empty_cache_s')} |
| artifact cached on the controller: nobody compiles | {cell('new_release_rollout_3_hosts_cached_s')} |

First deploy of the 3 hosts (build once + model transfer): {cell('first_deploy_3_hosts_s')}.
"""
    (OUT / "NOOP.md").write_text(text + (OUT / "NOOP-notes.md").read_text() if (OUT / "NOOP-notes.md").exists() else text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
