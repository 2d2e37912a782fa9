"""Multi-turn chat through the front: leastconn vs affinity. Not a test.

Two llama-server backends and one HAProxy front on sandbox hosts. ``CONVERSATIONS`` chats
run side by side for ``TURNS`` turns each; every turn resends the whole history plus a new
question, as chat clients do. With leastconn a turn may land on the backend that has never
seen the conversation and evaluates the whole history again; with affinity
(``balance = "affinity"``, consistent hashing on ``X-Session-Id`` with bounded load) it goes
back to the backend whose slots hold its prefix. Measured per request from llama-server's own
``timings`` (``prompt_n``: prompt tokens evaluated, ``cache_n``: reused) and the client's time
to first token (streaming). Same run, same hosts, leastconn first then affinity. Writes
``benchmarks/AFFINITY.md`` and a JSON file.

    sudo .venv/bin/python -m benchmarks.affinity
    .venv/bin/python -m benchmarks.affinity --render benchmarks/affinity-DATE.json   # the page again, no host
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.machine import DEPLOY_TIMEOUT, describe, machine, publish, render_or_run
from llamadeploy.bench import wait_healthy
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
CONVERSATIONS = 8
TURNS = 6
QUESTIONS = ["Name a planet.", "Why that one?", "How far is it?", "What is it made of?", "Any moons?",
             "Summarize our chat."]


def write(path: Path, servers, front, balance: str) -> Path:
    def entry(h, **extra):
        name, conn = h.inventory_entry()
        return (name, {**conn, **default_data(), **extra})

    one_core = {"llama_server": {**default_data().get("llama_server", {}), "threads": 1, "threads_batch": 1}}
    path.write_text(f"servers = {[entry(h, **one_core) for h in servers]!r}\n"
                    f"front = {[entry(front, llama_role='front', llama_front={'balance': balance})]!r}\n")
    return path


def conversation(base: str, cid: int, session: bool, out: list[dict]) -> None:
    history: list[dict] = [{"role": "system", "content": f"You are assistant number {cid}. " + "Be brief. " * 40}]
    headers = {"X-Session-Id": f"conv-{cid}"} if session else {}
    with httpx.Client(timeout=120) as c:
        for turn in range(TURNS):
            history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            t0 = time.monotonic()
            ttft, text, timings = None, "", {}
            try:
                with c.stream("POST", f"{base}/v1/chat/completions", headers=headers,
                              json={"messages": history, "max_tokens": 24, "stream": True}) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                        if delta and ttft is None:
                            ttft = time.monotonic() - t0
                        text += delta or ""
                        timings = chunk.get("timings", timings)
            except httpx.HTTPError as exc:  # counted, never retried: the front must not lose requests
                out.append({"conv": cid, "turn": turn, "error": f"{type(exc).__name__}: {exc}",
                            "at": round(time.monotonic() - t0, 3)})
                history.pop()
                continue
            history.append({"role": "assistant", "content": text})
            out.append({"conv": cid, "turn": turn, "ttft": ttft, "prompt_n": timings.get("prompt_n"),
                        "cache_n": timings.get("cache_n")})


def run_all(base: str, session: bool) -> list[dict]:
    out: list[dict] = []
    threads = [threading.Thread(target=conversation, args=(base, i, session, out)) for i in range(CONVERSATIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def summary(rows: list[dict]) -> dict:
    errors = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    later = [r for r in rows if r["turn"] > 0]  # turn 0 has no history to reuse
    ttfts = sorted(r["ttft"] for r in later if r["ttft"] is not None)
    return {
        "requests": len(rows),
        "prompt_tokens_evaluated": sum(r["prompt_n"] or 0 for r in later),
        "prompt_tokens_reused": sum(r["cache_n"] or 0 for r in later),
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[max(0, int(round(0.95 * len(ttfts))) - 1)],
        "errors": [e["error"] for e in errors],
    }


def main() -> int:
    # each backend on a core of its own with one thread: two llama-servers spinning on the same
    # cores slow each other down many times over, which would measure this machine, not the front
    hosts = [SandboxHost(f"aff{i}", 90 + i, binds=dict(SHARED_BINDS), cpus=str(i - 1) if i < 3 else None)
             for i in range(1, 4)]
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-affinity-"))
    run = machine()
    result: dict[str, dict] = {}
    try:
        for h in hosts:
            h.boot()
        servers, front = hosts[:2], hosts[2]
        base = f"http://{front.address}:8080"
        for balance in ("leastconn", "affinity"):
            inv = write(tmp / f"{balance}.py", servers, front, balance)
            subprocess.run([str(BIN / "pyinfra"), "-y", "--parallel", "1", str(inv), "deploy.py"], cwd=REPO,
                           check=True, capture_output=True, timeout=DEPLOY_TIMEOUT)
            for h in servers:  # a cold prompt cache for both runs
                h.ssh("systemctl restart llama-server")
            wait_healthy(base)
            time.sleep(5)  # both backends pass the front's checks again
            since = front.ssh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
            result[balance] = summary(run_all(base, session=(balance == "affinity")))
            # HAProxy's own account of every request that did not end in a complete 200 (termination state)
            log = front.ssh(f"journalctl -u haproxy --since '{since}' --no-pager -o cat").stdout.splitlines()
            result[balance]["front_log_not_ok"] = [ln for ln in log if " 200 " not in ln and "llama_api" in ln]
        # aggregate tok/s at 16 clients through the front: one backend (the other in maintenance) vs two
        from llamadeploy.bench import bench

        sock = "/run/haproxy/admin.sock"
        for label, state in (("one_backend", "maint"), ("two_backends", "ready")):
            cmd = f"set server llama_servers/{servers[1].address} state {state}"
            front.ssh(f"echo '{cmd}' | socat stdio {sock}")
            time.sleep(3)
            report = bench(base, [16], per_client=2, max_tokens=64)
            result[label] = {"tok_per_s": report.levels[0].tok_per_s, "errors": report.levels[0].errors}
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    publish(OUT / "AFFINITY.md", "affinity", run, {**run, "conversations": CONVERSATIONS, "turns": TURNS, **result},
            page)
    return 0


def page(results: dict, raw_name: str) -> str:
    """AFFINITY.md from one run's raw JSON alone (``main`` and ``--render`` alike), so the page can
    be written again, and checked, without a host."""
    stamp = str(results["date"])[:10]
    lc, af = results["leastconn"], results["affinity"]
    conversations, turns = conversation_shape(results)
    text = f"""# Multi-turn chat through the front: leastconn vs affinity ({stamp})

Written whole by `benchmarks/affinity.py` {describe(results)}. Raw: `{raw_name}`.

Two backends (Gemma 3 270M Q4_K_M, llama.cpp b11434, the tuned unit with one thread), one HAProxy
front, sandbox hosts on this machine: each backend pinned to a core of its own
(`--cpu-affinity`), the front and this client on both. {conversations} conversations side by side, {turns} turns each, every
turn resending the history (a ~90-token system prompt, the questions and answers); turns after
the first counted. Same run, leastconn first, then affinity (`X-Session-Id` per conversation);
backends restarted (cold prompt caches) before each.

| | leastconn | affinity | affinity / leastconn |
|---|---|---|---|
| prompt tokens evaluated | {lc['prompt_tokens_evaluated']} | {af['prompt_tokens_evaluated']} | {af['prompt_tokens_evaluated'] / max(1, lc['prompt_tokens_evaluated']):.2f} |
| prompt tokens reused from cache | {lc['prompt_tokens_reused']} | {af['prompt_tokens_reused']} | |
| TTFT p50 | {lc['ttft_p50']:.3f} s | {af['ttft_p50']:.3f} s | {af['ttft_p50'] / lc['ttft_p50']:.2f} |
| TTFT p95 | {lc['ttft_p95']:.3f} s | {af['ttft_p95']:.3f} s | {af['ttft_p95'] / lc['ttft_p95']:.2f} |
| failed requests (counted, never retried) | {len(lc['errors'])} | {len(af['errors'])} | |
"""
    one, two = results["one_backend"]["tok_per_s"], results["two_backends"]["tok_per_s"]
    text += f"""
## Aggregate tok/s at 16 clients through the front: 1 backend vs 2

| 1 backend (the other in maintenance) | 2 backends | ratio |
|---|---|---|
| {one:.1f} tok/s | {two:.1f} tok/s | **{two / one:.2f}x** |

Each backend has one core of this machine's {results['cores']} to itself (cores 0 and 1); the front, the load
generator and the kernel may run on every core, theirs included, so the second backend need not get
a whole core's worth of extra work done.
Failed requests at 16 clients: {sum(results['one_backend']['errors'].values())} with 1 backend, {sum(results['two_backends']['errors'].values())} with 2.
"""
    return text


def conversation_shape(results: dict) -> tuple[int, int]:
    """Conversations and turns: recorded since the page names its raw file; a run before that
    kept only the requests, so its shape is this script's CONVERSATIONS x TURNS (unchanged since
    296c7d3, 2026-11-26), checked against its request count (answered + failed, per balance)."""
    if "conversations" in results:
        return int(results["conversations"]), int(results["turns"])
    for balance in ("leastconn", "affinity"):
        sent = results[balance]["requests"] + len(results[balance]["errors"])
        if sent != CONVERSATIONS * TURNS:
            raise SystemExit(f"{balance}: {sent} requests, not {CONVERSATIONS} x {TURNS}: "
                             "this run's conversations and turns are not recorded")
    return CONVERSATIONS, TURNS


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "AFFINITY.md", page, lambda: main()))
