"""Router mode (several models per host) against one-model serving, side by side in one run.

Not a test. Boots one throwaway sandbox host with the real b11434 build and Gemma 3 270M, and
measures, each against its baseline on the same host in the same run:

* **chat** at 8 clients: the router's chat model vs today's one-model unit with the same context
  and slots (deployed in turn, ``ROUNDS`` times each, medians). The goal is 5 % overhead or less.
* **embeddings** (texts/s) at 1 and 8 clients: the router's embedding model vs a stock
  ``llama-server`` started by hand with exactly the router child's arguments, so the difference
  is the router's proxy hop.
* **cold start**: the first embeddings request to an unloaded on-demand model vs a warm one.
* **swap** with ``models_max = 1``: alternating requests to two chat models (each one unloads the
  other) vs repeated requests to one.
* **n-gram speculative decoding** (``spec_type: ngram-map-k``) at 1 client on a RAG-shaped prompt
  (the answer quotes the given context), greedy: tok/s vs the same model without it, and whether
  the outputs are identical.

The embedding model is Gemma itself with mean pooling (all-MiniLM-L6-v2 needs converting with torch:
test_router_embedding, behind its marker, does that).
Writes ``benchmarks/ROUTER.md`` and a JSON file beside it, whole, from this run.

    sudo .venv/bin/python -m benchmarks.router [ROUNDS]
    .venv/bin/python -m benchmarks.router --render benchmarks/router-DATE.json   # the page again, no host
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.machine import describe, machine, publish, render_or_run
from llamadeploy.bench import run_level
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.assets import MODEL_SHA256, gemma_model
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
GEMMA = {"path": str(gemma_model()), "sha256": MODEL_SHA256}
CTX, SLOTS = 4096, 8
CHAT = {**GEMMA, "alias": "chat", "ctx_size": CTX, "parallel": SLOTS}
EMBED = {**GEMMA, "alias": "embed", "kind": "embedding", "pooling": "mean", "load": "on_demand",
         "ctx_size": 2048, "parallel": SLOTS}
PLAIN = {**GEMMA, "alias": "plain", "load": "on_demand", "ctx_size": 2048, "parallel": 1}
SPEC = {**PLAIN, "alias": "spec", "spec_type": "ngram-map-k"}
STOCK_PORT = 8099
CONTEXT = ("The Haldor valve, introduced in 1987, regulates coolant flow in marine engines. It has three "
           "parts: the brass housing, the spring-loaded piston and the ceramic seat. Maintenance requires "
           "replacing the ceramic seat every 4,000 operating hours and checking the spring tension yearly.")
RAG_PROMPT = f"Context:\n{CONTEXT}\n\nQuote the context word for word, then list its three parts."
TEXTS = [f"Document {n}: the valve's ceramic seat is replaced every {n} hours." for n in range(64)]


def deploy(inv: Path) -> None:
    proc = subprocess.run([str(BIN / "pyinfra"), "-y", str(inv), "deploy.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"deploy {inv.name} failed:\n{proc.stderr[-3000:]}")


def chat_level(url: str, model: str, keepalive: bool = True) -> dict:
    level = asyncio.run(run_level(url, model, 8, 3, 64, {}, keepalive=keepalive))
    return {"tok_per_s": level.tok_per_s, "ttft_p50": level.ttft_p50, "ttft_p95": level.ttft_p95,
            "errors": sum(level.errors.values()), "error_kinds": level.errors}


def embed_rate(url: str, model: str, clients: int) -> dict[str, float]:
    """Texts per second that came back: ``clients`` clients over kept-alive connections, one text
    per request, all of TEXTS. A connection the server closed without an answer is counted as a
    drop (that text is not retried, and not counted as done)."""
    async def run() -> dict[str, float]:
        queue, done, drops = list(TEXTS), [0], [0]

        async def client() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120) as c:
                while queue:
                    text = queue.pop()
                    try:
                        r = await c.post("/v1/embeddings", json={"model": model, "input": text})
                    except httpx.RemoteProtocolError:
                        drops[0] += 1
                        continue
                    r.raise_for_status()
                    done[0] += 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return {"texts_per_s": round(done[0] / (time.perf_counter() - start), 2), "drops": drops[0]}

    return asyncio.run(run())


def timed_chat(url: str, model: str, prompt: str = "Hi", max_tokens: int = 1) -> tuple[float, dict]:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
        "model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()


def unload(url: str, model: str) -> None:
    httpx.post(f"{url}/models/unload", json={"model": model}, timeout=60)
    for _ in range(100):
        states = {m["id"]: m["status"]["value"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]}
        if states.get(model) == "unloaded":
            return
        time.sleep(0.2)


def child_args(host: SandboxHost, alias: str) -> list[str]:
    main = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
    for line in host.ssh(f"ps -o args= --ppid {main}").stdout.splitlines():
        args = line.split()
        if "--alias" in args and args[args.index("--alias") + 1] == alias:
            return args
    raise RuntimeError(f"no child for {alias}")


def page(result: dict, raw_name: str) -> str:
    """ROUTER.md from one run's raw JSON alone (``main`` and ``--render`` alike), so the page can be
    written again, and checked against its JSON, without a host."""
    res, rounds = result["runs"], result["rounds"]

    def med(key: str, field: str) -> float:
        return round(statistics.median(r[field] for r in res[key]), 3)

    s_tok, r_tok = med("single", "tok_per_s"), med("router", "tok_per_s")
    sf_tok, rf_tok = med("single_fresh", "tok_per_s"), med("router_fresh", "tok_per_s")

    def row(name: str, key: str) -> str:
        return (f"| {name} | {med(key, 'tok_per_s')} | {med(key, 'ttft_p50')} s | {med(key, 'ttft_p95')} s | "
                f"{sum(r['errors'] for r in res[key])} |")

    # JSON keys are text: the client counts as numbers again
    e_r, e_s = ({int(k): v for k, v in res[key].items()} for key in ("embed_router", "embed_stock"))
    sw, sp = res["swap"], res["spec"]
    return f"""# Router mode against one-model serving

Written whole by `benchmarks/router.py` {describe(result)}, one sandbox host, Gemma 3 270M
Q4_K_M (the embedding model is the same GGUF with mean pooling). Raw: `{raw_name}`.

## Chat at 8 clients (3 requests each, 64 tokens; {rounds} rounds, alternating, medians)

Each client either keeps its connection alive between requests, as the OpenAI SDK does, or
opens a new one per request. Both runs of each server are in the same round.

| server, connections | tok/s | p50 TTFT | p95 TTFT | failed requests |
|---|---|---|---|---|
{row('one-model unit (baseline), kept alive', 'single')}
{row('router, its chat model, kept alive', 'router')}
{row('one-model unit (baseline), one per request', 'single_fresh')}
{row('router, its chat model, one per request', 'router_fresh')}

Router / one-model, kept-alive connections: **{r_tok / s_tok:.3f}x** tok/s; one connection per
request: **{rf_tok / sf_tok:.3f}x** (the goal: 0.95 or more). Failed requests by kind, kept alive:
one-model {[r['error_kinds'] for r in res['single']]}, router {[r['error_kinds'] for r in res['router']]};
one per request: one-model {[r['error_kinds'] for r in res['single_fresh']]}, router
{[r['error_kinds'] for r in res['router_fresh']]}. tok/s counts answered requests only: a request
that a kept-alive drop ends yields no tokens, so the first ratio includes the drops and the second
is the router's own speed.

## Embeddings ({len(TEXTS)} texts, one per request)

| clients | router (texts/s) | stock llama-server, same arguments (texts/s) | ratio |
|---|---|---|---|
| 1 | {e_r[1]['texts_per_s']} | {e_s[1]['texts_per_s']} | {e_r[1]['texts_per_s'] / e_s[1]['texts_per_s']:.3f}x |
| 8 | {e_r[8]['texts_per_s']} | {e_s[8]['texts_per_s']} | {e_r[8]['texts_per_s'] / e_s[8]['texts_per_s']:.3f}x |

Kept-alive connections the server closed without an answer (counted, not retried): router
{e_r[1]['drops'] + e_r[8]['drops']}, stock {e_s[1]['drops'] + e_s[8]['drops']}, of {2 * len(TEXTS)} requests each. texts/s counts
answered texts only; a dropped request ends at once, so with drops the ratio is not a clean
comparison of the two.

Cold start of the on-demand embedding model (first request after an unload): {res['embed_cold_s']} s;
the next request: {res['embed_warm_s']} s.

## Swap (`models_max = 1`, two chat models, 1-token replies, medians)

Same model again: {sw['same_model_s']} s. The other model (unloads this one, loads that one):
{sw['swap_s']} s, **{sw['swap_s'] / sw['same_model_s']:.1f}x**.

## n-gram speculative decoding (1 client, RAG-shaped prompt, 160 tokens, greedy, 3 runs, medians)

| setting | tok/s |
|---|---|
| off (baseline) | {sp['off']} |
| `spec_type: ngram-map-k` | {sp['ngram_map_k']} |

Speed-up: **{sp['ngram_map_k'] / sp['off']:.2f}x** (the goal: 1.3x or more). Identical output across all runs
and both settings: {'yes' if sp['identical'] else 'NO'}.
"""


def main(rounds: int = 2) -> int:
    host = SandboxHost("rtb", 92, binds=dict(SHARED_BINDS))
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-router-bench-"))
    url = f"http://{host.address}:8080"
    res: dict = {"single": [], "router": [], "single_fresh": [], "router_fresh": []}
    try:
        host.boot()
        base = default_data()
        single = write_inventory(tmp / "single.py", [host], {
            **base, "llama_server": {**base["llama_server"], "ctx_size": CTX, "parallel": SLOTS}})
        routed_data = {k: v for k, v in base.items() if k != "llama_model"}
        router = write_inventory(tmp / "router.py", [host], {
            **routed_data, "llama_models": [CHAT, EMBED, PLAIN, SPEC], "llama_router": {"models_max": 2}})
        swap = write_inventory(tmp / "swap.py", [host], {
            **routed_data, "llama_models": [{**CHAT, "load": "on_demand"}, PLAIN], "llama_router": {"models_max": 1}})
        for _ in range(rounds):  # alternating, so that drift of the machine hits both alike
            deploy(single)
            timed_chat(url, "gemma-3-270m", max_tokens=8)  # warm
            res["single"].append(chat_level(url, "gemma-3-270m"))
            res["single_fresh"].append(chat_level(url, "gemma-3-270m", keepalive=False))
            deploy(router)
            timed_chat(url, "chat", max_tokens=8)
            res["router"].append(chat_level(url, "chat"))
            res["router_fresh"].append(chat_level(url, "chat", keepalive=False))

        # embeddings: the router's instance vs the same arguments run stock, beside it
        unload(url, "embed")
        t0 = time.perf_counter()
        httpx.post(f"{url}/v1/embeddings", json={"model": "embed", "input": TEXTS[0]}, timeout=300).raise_for_status()
        res["embed_cold_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        httpx.post(f"{url}/v1/embeddings", json={"model": "embed", "input": TEXTS[1]}, timeout=300).raise_for_status()
        res["embed_warm_s"] = round(time.perf_counter() - t0, 3)
        res["embed_router"] = {c: embed_rate(url, "embed", c) for c in (1, 8)}
        args = child_args(host, "embed")
        args[args.index("--host") + 1], args[args.index("--port") + 1] = "0.0.0.0", str(STOCK_PORT)
        host.ssh("systemd-run --unit=stock-embed --property=User=llama " + " ".join(args))
        stock = f"http://{host.address}:{STOCK_PORT}"
        for _ in range(120):
            try:
                if httpx.get(f"{stock}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        res["embed_stock"] = {c: embed_rate(stock, "embed", c) for c in (1, 8)}
        host.ssh("systemctl stop stock-embed", check=False)
        res["stock_embed_args"] = args[1:]

        # speculative decoding: the same model with and without n-gram drafts, one client, greedy
        spec: dict = {}
        for alias in ("plain", "spec"):
            runs, outputs = [], []
            timed_chat(url, alias, RAG_PROMPT, 8)
            for _ in range(3):
                wall, reply = timed_chat(url, alias, RAG_PROMPT, 160)
                runs.append(reply["usage"]["completion_tokens"] / wall)
                outputs.append(reply["choices"][0]["message"]["content"])
            spec[alias] = {"tok_per_s": round(statistics.median(runs), 1), "outputs": outputs}
        res["spec"] = {"off": spec["plain"]["tok_per_s"], "ngram_map_k": spec["spec"]["tok_per_s"],
                       "identical": len(set(spec["plain"]["outputs"] + spec["spec"]["outputs"])) == 1}

        # swap: models_max 1, two chat models; each request to the other model unloads this one
        deploy(swap)
        timed_chat(url, "chat")
        same = [timed_chat(url, "chat")[0] for _ in range(4)]
        swaps = [timed_chat(url, alias)[0] for alias in ("plain", "chat") * 3]
        res["swap"] = {"same_model_s": round(statistics.median(same), 3), "swap_s": round(statistics.median(swaps), 3)}
    finally:
        host.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    result = {**machine(), "rounds": rounds, "runs": res}
    publish(OUT / "ROUTER.md", "router", result, result, page)
    print((OUT / "ROUTER.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "ROUTER.md", page, lambda: main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)))
