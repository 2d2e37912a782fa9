"""Soak: concurrent streaming chat against a deployed host for a long time. Not a test.

Boots a throwaway sandbox host, deploys the default model with ``deploy.py``, then runs
``CLIENTS`` streaming clients back to back for ``SECONDS`` (default 600) against it,
sampling the server's RSS over SSH every 15 s; then again with the prompt cache off
(:data:`VARIANTS`), so that the page tells the cache's RSS growth from the server's own. Reports requests, failures (must be 0),
keep-alive drops (counted apart: llama-server closes some kept-alive connections after a
stream), tok/s, TTFT and RSS over time. Writes ``benchmarks/SOAK.md`` and a JSON file.
Only test-host addresses are loaded.

    sudo .venv/bin/python -m benchmarks.soak [SECONDS]
    .venv/bin/python -m benchmarks.soak render benchmarks/soak-DATE.json   # SOAK.md again from a run's JSON
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

from benchmarks.machine import describe, failure_text, machine, raw_path, run_deploy
from llamadeploy.bench import SoakResult, soak
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
CLIENTS = 8


def rss_sampler(host: SandboxHost):
    def sample() -> int:
        pid = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
        return int(host.ssh(f"ps -o rss= -p {pid}").stdout.strip() or 0)
    return sample


#: the unit as deployed, then the same with the prompt cache off: RSS grows through the soak, and
#: the host-RAM prompt cache (``--cache-ram``, filled by every finished prompt up to its cap) is the
#: suspect; the second soak on the same host shows how much of the growth is the cache
VARIANTS: list[tuple[str, dict]] = [("the deployed unit", {}), ("llama_server.cache_ram = 0", {"cache_ram": 0})]


def main(seconds: float = 600) -> int:
    run = machine()
    host = SandboxHost("soak", 78, binds=dict(SHARED_BINDS))
    results = []
    try:
        host.boot()
        for label, server in VARIANTS:
            data = default_data()
            data["llama_server"] = {**data["llama_server"], **server}
            inv = write_inventory(Path("/tmp/llamactl-soak-inventory.py"), [host], data)
            deployed = run_deploy(inv)
            if deployed.rc != 0:
                raise RuntimeError(f"deploy ({label}) failed:\n{failure_text(deployed)}")
            pid = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
            argv = host.ssh(f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout.split()
            cache = argv[argv.index("--cache-ram") + 1] if "--cache-ram" in argv else "llama-server's default"
            result = soak(f"http://{host.address}:8080", CLIENTS, seconds, max_tokens=64,
                          sample_rss=rss_sampler(host), interval=15)
            results.append((label, cache, result))
    finally:
        host.stop()
    path = raw_path(OUT, "soak", run)
    path.write_text(json.dumps(
        {**run, "runs": [{"variant": label, "cache_ram": cache, **asdict(r)} for label, cache, r in results]},
        indent=1) + "\n")
    render(path)
    return 0 if not any(r.failures for _, _, r in results) else 1


def render(path: Path) -> None:
    """SOAK.md, written whole from one run's JSON (``path``)."""
    text = page(json.loads(path.read_text()), path.name)
    (OUT / "SOAK.md").write_text(text)
    print(text)


def page(data: dict, raw_name: str) -> str:
    """SOAK.md from one run's raw JSON alone (a run and ``render`` alike), so the page can be
    checked against that file (tests/unit/test_benchmark_pages)."""
    run = {k: v for k, v in data.items() if k != "runs"}
    stamp = str(run["date"])[:10]
    seconds = max(r["seconds"] for r in data["runs"])

    def row(r: dict) -> str:
        res = SoakResult(**{f.name: r[f.name] for f in fields(SoakResult)})
        warm, growth = res.rss_warm_kib, res.rss_growth  # the same two samples as the growth
        first_last = f"{warm[0] // 1024} → {warm[-1] // 1024} MiB" if len(warm) >= 2 else "-"
        cache = f"`--cache-ram {r['cache_ram']}`" if r["cache_ram"].isdigit() else r["cache_ram"]
        return (f"| {r['variant']} ({cache}) | {res.requests} | {res.ok} | {sum(res.failures.values())} {res.failures or ''} | "
                f"{res.keepalive_drops} | {res.tok_per_s:.1f} | {res.ttft_p50:.2f} s | {res.ttft_p95:.2f} s | "
                f"{first_last} | {f'{growth * 100:+.1f} %' if growth is not None else '-'} |")

    rows = "\n".join(row(r) for r in data["runs"])
    samples = "\n\n".join(f"RSS samples, {r['variant']} (s, MiB): " + ", ".join(f"{t:.0f}:{kib // 1024}" for t, kib in r["rss_kib"])
                          for r in data["runs"])
    return f"""# Soak: {CLIENTS} streaming clients for {seconds:.0f} s, twice ({stamp})

Written whole by `benchmarks/soak.py` {describe(run)}; raw: [`{raw_name}`]({raw_name}).

Gemma 3 270M Q4_K_M, llama.cpp b11434, one sandbox host on this machine's veth network, soaked
twice in one run: the unit `deploy.py` renders, then the same deploy with the host-RAM prompt
cache off (`llama_server.cache_ram = 0`, a restart). Each client sends requests back to back
(64 tokens each) over its own kept-alive connection, as an SDK client does; nothing is retried.
"Once warm" is the first sample after a tenth of the run, the growth's base.

| unit | requests | ok | failed | keep-alive drops | tok/s | TTFT p50 | TTFT p95 | RSS once warm → last | growth |
|---|---|---|---|---|---|---|---|---|---|
{rows}

{samples}

The prompt cache keeps the state of finished prompts in host memory, up to `--cache-ram` MiB, so
that a returning conversation skips its prefill: its share of the RSS grows with every distinct
prompt until the cap, then stays. The difference between the two rows' growth is what the cache
takes in {seconds:.0f} s; what the second row still grows is the server's own.

A keep-alive drop is a request that got no response at all because llama-server closed a
connection it had advertised as kept alive, right after a streamed reply; the request never
reached the server. They are counted here and never retried; behind the HAProxy front door
(docs/front-and-monitor.md), 500 requests of the OpenAI client over kept-alive connections see
no error (tests/e2e/test_front.py). Failed requests are every other kind of error: connect
failures, mid-stream aborts, streams without `[DONE]` or a `finish_reason`, HTTP errors.
"""


if __name__ == "__main__":
    if sys.argv[1:2] == ["render"]:
        render(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 600))
