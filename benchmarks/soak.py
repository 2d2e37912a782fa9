"""Soak: concurrent streaming chat against a deployed host for a long time. Not a test.

Boots a throwaway sandbox host, deploys the default model with ``deploy.py``, then runs
``CLIENTS`` streaming clients back to back for ``SECONDS`` (default 600) against it,
sampling the server's RSS over SSH every 15 s. Reports requests, failures (must be 0),
keep-alive drops (counted apart: llama-server closes some kept-alive connections after a
stream), tok/s, TTFT and RSS over time. Writes ``benchmarks/SOAK.md`` and a JSON file.
Only test-host addresses are loaded.

    sudo .venv/bin/python -m benchmarks.soak [SECONDS]
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.machine import DEPLOY_TIMEOUT, describe, machine
from llamadeploy.bench import soak
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
CLIENTS = 8


def rss_sampler(host: SandboxHost):
    def sample() -> int:
        pid = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
        return int(host.ssh(f"ps -o rss= -p {pid}").stdout.strip() or 0)
    return sample


def main(seconds: float = 600) -> int:
    run = machine()
    host = SandboxHost("soak", 78, binds=dict(SHARED_BINDS))
    try:
        host.boot()
        inv = write_inventory(Path("/tmp/llamactl-soak-inventory.py"), [host], default_data())
        subprocess.run([str(Path(sys.executable).with_name("pyinfra")), "-y", str(inv), "deploy.py"],
                       cwd=REPO, check=True, capture_output=True, timeout=DEPLOY_TIMEOUT)
        result = soak(f"http://{host.address}:8080", CLIENTS, seconds, max_tokens=64,
                      sample_rss=rss_sampler(host), interval=15)
    finally:
        host.stop()
    stamp = str(run["date"])[:10]
    (OUT / f"soak-{stamp}.json").write_text(json.dumps({**run, **asdict(result)}, indent=1) + "\n")
    rss = result.rss_kib
    growth = result.rss_growth
    text = f"""# Soak: {CLIENTS} streaming clients for {result.seconds:.0f} s ({stamp})

Written whole by `benchmarks/soak.py` {describe(run)}.

Gemma 3 270M Q4_K_M, llama.cpp b11434, the tuned unit from `deploy.py`, one sandbox host on
this machine's veth network; each client sends requests back to back (64 tokens each) over
its own kept-alive connection, as an SDK client does; nothing is retried.

| requests | ok | failed | keep-alive drops | tok/s | TTFT p50 | TTFT p95 | RSS first warm → last | growth |
|---|---|---|---|---|---|---|---|---|
| {result.requests} | {result.ok} | {sum(result.failures.values())} {result.failures or ''} | {result.keepalive_drops} | {result.tok_per_s:.1f} | {result.ttft_p50:.2f} s | {result.ttft_p95:.2f} s | {rss[1][1] // 1024 if len(rss) > 1 else '-'} → {rss[-1][1] // 1024 if rss else '-'} MiB | {f"{growth * 100:+.1f} %" if growth is not None else '-'} |

RSS samples (s, MiB): {", ".join(f"{t:.0f}:{kib // 1024}" for t, kib in rss)}

A keep-alive drop is a request that got no response at all because llama-server closed a
connection it had advertised as kept alive, right after a streamed reply; the request never
reached the server. They are counted here and never retried; behind the HAProxy front door
(docs/front-and-monitor.md), 500 requests of the OpenAI client over kept-alive connections see
no error (tests/e2e/test_front.py). Failed requests are every other kind of error: connect
failures, mid-stream aborts, streams without `[DONE]` or a `finish_reason`, HTTP errors.
"""
    (OUT / "SOAK.md").write_text(text)
    print(text)
    return 0 if not result.failures else 1


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 600))
