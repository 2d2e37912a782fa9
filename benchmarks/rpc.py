"""RPC: tok/s of the head alone, head + 1 worker, head + 2 workers. Not a test.

Three throwaway sandbox hosts on one LAN bridge (``vz-rpcbench``); the test model; ``bench``
(64 tokens, 4 requests per client, 1 and 4 clients) against the head after each deploy:

* the head alone (no workers, no memory limit);
* the head with ``llama_rpc.workers_group`` = one worker, then two (layers split by the
  members' memory limits, 2G each here).

On one machine the "network" is a bridge in memory and every host shares the same cores,
so RPC can only cost here: it pays when the model does not fit one host at all. Writes
``benchmarks/RPC.md`` and a JSON file.

    sudo .venv/bin/python -m benchmarks.rpc
    .venv/bin/python -m benchmarks.rpc --render benchmarks/rpc-DATE.json   # the page again, no host
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import DEPLOY_TIMEOUT, describe, machine, publish, render_or_run
from llamadeploy.bench import bench
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
LEVELS = [1, 4]


def deploy(inv: Path) -> None:
    proc = subprocess.run([str(BIN / "pyinfra"), "-y", "--parallel", "1", str(inv), "deploy.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"deploy failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def inventory(path: Path, head: SandboxHost, workers: list[SandboxHost]) -> Path:
    data = default_data()
    head_data = {**data, "llama_limits": {"memory": "2G"}} if workers else data
    if workers:
        head_data["llama_rpc"] = {"workers_group": "rpc_workers"}
    w_data = {**data, "llama_role": "rpc_worker", "llama_limits": {"memory": "2G"}}
    heads = [(head.inventory_entry()[0], {**head.inventory_entry()[1], **head_data})]
    ws = [(w.inventory_entry()[0], {**w.inventory_entry()[1], **w_data}) for w in workers]
    path.write_text(f"heads = {heads!r}\nrpc_workers = {ws!r}\n")
    return path


def main() -> int:
    hosts = [SandboxHost(n, i, binds=dict(SHARED_BINDS), lan="rpcbench") for n, i in
             (("rbh", 171), ("rbw1", 172), ("rbw2", 173))]
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-rpc-"))
    run = machine()
    results: dict[str, dict] = {}
    try:
        for h in hosts:
            h.boot()
        head = hosts[0]
        for label, workers in (("head alone", []), ("head + 1 worker", hosts[1:2]), ("head + 2 workers", hosts[1:])):
            deploy(inventory(tmp / "inv.py", head, workers))
            unit = head.ssh("cat /etc/systemd/system/llama-server.service").stdout
            split = re.search(r"--tensor-split (\S+)", unit)
            report = bench(f"http://{head.address}:8080", LEVELS, per_client=4, max_tokens=64)
            results[label] = {"split": split.group(1) if split else None,
                              "tok_per_s": {lv.clients: round(lv.tok_per_s, 1) for lv in report.levels},
                              "errors": {lv.clients: lv.errors for lv in report.levels}}
            print(label, results[label], flush=True)
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    data = {**run, "setups": results}
    publish(OUT / "RPC.md", "rpc", run, data, page)
    return 0


def errors_text(errors: dict) -> str:
    """``{1: {}, 4: {"keep-alive drop": 2}}`` -> ``none at 1 client; keep-alive drop x2 at 4 clients``."""
    parts = []
    for clients, kinds in errors.items():
        n = f"{clients} client{'s' if int(clients) != 1 else ''}"
        parts.append(f"none at {n}" if not kinds else ", ".join(f"{k} x{v}" for k, v in kinds.items()) + f" at {n}")
    return "; ".join(parts)


def page(data: dict, raw_name: str) -> str:
    """RPC.md from one run's raw JSON alone (``main`` and ``--render`` alike), so the page can be
    written again, and checked, without a host: the machine's keys and ``setups``; a JSON from
    before the machine was recorded holds the setups alone, its date only in its name."""
    results: dict[str, dict] = data.get("setups", data)
    recorded = "commit" in data
    stamp = str(data["date"])[:10] if recorded else raw_name.removeprefix("rpc-")[:10]
    measured = (f"Written whole by `benchmarks/rpc.py` {describe(data)}." if recorded
                else "The machine of this run was not recorded.") + f" Raw: `{raw_name}`."
    cores = f"this machine's {data['cores']} cores" if recorded else "this machine's cores"
    base = results["head alone"]["tok_per_s"]
    rows = "\n".join(
        f"| {label} | {r['split'] or '-'} | " + " | ".join(
            f"{v} ({v / base[c]:.2f}x)" for c, v in r["tok_per_s"].items()) + " |"
        for label, r in results.items())
    errors = "\n".join(f"- {label}: {errors_text(r['errors'])}" for label, r in results.items())
    return f"""# RPC workers: head alone vs head + workers ({stamp})

{measured}

Gemma 3 270M Q4_K_M (18 layers), llama.cpp b11434, three sandbox hosts on one LAN bridge of
this machine; `bench` (64 tokens, 4 requests per client) against the head after each
deploy; tok/s and the ratio to the head alone. "layers on workers" is the `--tensor-split` the
head ran with (llama.cpp also puts the output layer on the last worker; the head keeps the
first blocks).

| setup | layers on workers | 1 client tok/s | 4 clients tok/s |
|---|---|---|---|
{rows}

Errors, counted by `bench` and never retried:
{errors}

Slower is the expected result here: every host shares {cores} and every token
crosses the RPC link once per worker. RPC pays when the model does not fit one host at all
(`tests/e2e/test_rpc.py`: a head that the preflight refuses alone serves with two workers);
upstream measured 63 -> 42 t/s through one remote server on 1 GbE (llama.cpp PR #6829).
"""


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "RPC.md", page, main))
