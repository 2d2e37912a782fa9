"""End to end, for real: several models behind one llama-server (router mode) on a booted host.

The chat and the embedding model are the same real GGUF (Gemma 3 270M) run as two instances:
one chats, one pools its hidden states into sentence vectors (``--embedding --pooling mean``).
A real embedding model (all-MiniLM-L6-v2, converted with torch from its PyPI wheel) is
test_router_embedding's, behind the embedding_model marker; no rerank model can be had here
(docs/router.md). Here the router, the preset, the gate per kind and the rollback of a model set
are what is under test. Checks go
through the official OpenAI client, the router's own ``/models`` and ssh, never the deploy code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox.assets import MODEL_SHA256, gemma_model
from llamadeploy.sandbox.inventory import write_inventory
from tests.conftest import cli, host_state, merged_data, run_deploy, veth_bytes, wait_for
from tests.e2e import native_checks

pytestmark = pytest.mark.e2e

GEMMA = {"path": str(gemma_model()), "sha256": MODEL_SHA256}
CHAT = {**GEMMA, "alias": "chat", "kind": "chat", "ctx_size": 4096, "parallel": 2}
EMBED = {**GEMMA, "alias": "embed", "kind": "embedding", "pooling": "mean", "load": "on_demand",
         "ctx_size": 2048, "parallel": 2}
CHAT2 = {**GEMMA, "alias": "chat-b", "kind": "chat", "load": "on_demand", "ctx_size": 2048, "parallel": 1}
#: Gemma 3 270M's hidden size (GGUF ``gemma3.embedding_length``)
EMBED_DIM = 640


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("rt6", 6)


def inventory(host, tmp_path: Path, name: str, models: list[dict], **sections) -> Path:
    data = merged_data(**{"llama_router": {"models_max": 2}, **sections})
    data.pop("llama_model")
    data["llama_models"] = models
    return write_inventory(tmp_path / f"{name}.py", [host], data)


def router_models(host) -> dict[str, str]:
    """The router's own view: alias -> status (loaded, unloaded, loading...)."""
    reply = httpx.get(f"http://{host.address}:8080/models", timeout=30).json()
    return {m["id"]: m["status"]["value"] for m in reply["data"]}


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture(scope="module")
def deployed(host, tmp_path_factory) -> Path:
    inv = inventory(host, tmp_path_factory.mktemp("inv"), "router", [CHAT, EMBED])
    result = run_deploy(inv)
    assert result.rc == 0, result.stderr[-5000:]
    # the gate asked each model what its kind serves, and unloaded the on-demand one again
    for asked in ("One chat completion answered by chat", "Embeddings that make sense from embed",
                  "embed unloaded again"):
        assert ran(result.report, asked) == [host.address], asked
    return inv


def ran(report: dict, name: str) -> list[str]:
    """Hosts on which the operation whose name holds ``name`` ran commands and succeeded."""
    return sorted(h for op in report["results"]["operations"] if any(name in n for n in op["names"])
                  for h in op["success"])


def test_one_host_serves_chat_and_embeddings_through_the_openai_client(host, deployed):
    from openai import OpenAI

    # each request on its own connection: llama-server may close a kept-alive one between requests
    # (counted by the benchmarks and the soak, never retried); no retries hide a real failure
    one_shot = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=120)
    client = OpenAI(base_url=f"http://{host.address}:8080/v1", api_key="unused", max_retries=0,
                    http_client=one_shot)
    assert {m.id for m in client.models.list()} == {"chat", "embed"}
    # the gate asked the on-demand model once and unloaded it again; the startup one stays
    assert router_models(host) == {"chat": "loaded", "embed": "unloaded"}

    reply = client.chat.completions.create(model="chat", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "Name a colour."}])
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
    assert reply.model == "chat"

    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Quarterly tax filings are due in April."]
    vectors = [d.embedding for d in client.embeddings.create(model="embed", input=texts).data]
    assert [len(v) for v in vectors] == [EMBED_DIM] * 3
    similar, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert similar > unrelated, (similar, unrelated)
    assert router_models(host) == {"chat": "loaded", "embed": "loaded"}  # loaded by its first request


def test_the_router_runs_the_rendered_presets(host, deployed):
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    assert [(m.alias, m.kind, m.on_demand) for m in manifest.models] == [
        ("chat", "chat", False), ("embed", "embedding", True)]
    # the gate asked the embedding model for vectors of its header's length, as recorded here
    assert [m.dimensions for m in manifest.models] == [None, EMBED_DIM]
    assert "--model" not in manifest.args and manifest.args[manifest.args.index("--models-preset") + 1] == \
        "/etc/llama-server/models.ini"
    preset = host.ssh("cat /etc/llama-server/models.ini").stdout
    sha = host.ssh("sha256sum /etc/llama-server/models.ini").stdout.split()[0]
    assert sha == manifest.preset_sha256
    sections = preset.split("\n[")
    chat = next(s for s in sections if s.startswith("chat]"))
    embed = next(s for s in sections if s.startswith("embed]"))
    assert "ctx-size = 4096" in chat and "load-on-startup = true" in chat and "chat-template = gemma" in chat
    assert "embedding = true" in embed and "pooling = mean" in embed and "cache-ram = 0" in embed
    # each model is its own child process of the unit, with its section's flags
    children = host.ssh("ps -o args= --ppid $(systemctl show -p MainPID --value llama-server)").stdout
    assert "--alias chat" in children and "--ctx-size 4096" in children, children
    assert host.ssh("systemd-analyze verify /etc/systemd/system/llama-server.service").returncode == 0


def test_second_deploy_changes_nothing(host, deployed):
    before = host_state(host)
    result = run_deploy(deployed)
    assert result.rc == 0, result.stderr[-3000:]
    assert result.changed == 0
    assert host_state(host) == before


def test_a_router_whose_start_systemd_refuses_is_rolled_back(host, deployed, tmp_path):
    """test_native's refused start, in router mode, where the same change also adds a model, so
    the presets change too: their re-read must not run against the server that did not start (it
    would fail the host before its gate and fallback), and the release that served is reinstated
    with its own model set."""
    native_checks.refused_start_rolled_back(
        host, tmp_path, deployed, inventory(host, tmp_path, "threads7", [CHAT, EMBED, CHAT2], llama_server={"threads": 7}))
    assert set(router_models(host)) == {"chat", "embed"}


def test_preflight_refuses_models_that_cannot_be_loaded_together(host, tmp_path):
    before = host_state(host)
    inv = inventory(host, tmp_path, "small", [CHAT, EMBED], llama_router={"models_max": 0},
                    llama_limits={"memory": "1500M"})
    result = run_deploy(inv)
    assert result.rc != 0
    assert f"preflight refused host {host.address}: 2 model(s) can be loaded at once" in result.stderr, \
        result.stderr[-3000:]
    assert "does not fit the memory limit of 1500 MiB" in result.stderr
    assert "llama_router.models_max = 1" in result.stderr
    assert host_state(host) == before


def pids(host) -> dict[str, str]:
    """The router's PID and each loaded model's child PID (by its ``--alias``)."""
    main = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
    out = {"router": main}
    for line in host.ssh(f"ps -o pid=,args= --ppid {main} || true").stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "--alias " in args:
            out[args.split("--alias ", 1)[1].split()[0]] = pid
    return out


def stream_chats(host, spans: list, stop) -> None:
    """Streamed chat replies back to back until ``stop`` is set: for each, (sent, finished, finish
    reason, chunks); each on its own connection, nothing retried."""
    import time

    from openai import OpenAI

    client = OpenAI(base_url=f"http://{host.address}:8080/v1", api_key="unused", max_retries=0,
                    http_client=httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=300))
    while not stop.is_set():
        sent, chunks, finish = time.time(), 0, None
        for chunk in client.chat.completions.create(model="chat", max_tokens=200, temperature=0, stream=True,
                                                    messages=[{"role": "user", "content": "Tell a long story."}]):
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        spans.append((sent, time.time(), finish, chunks))


def test_a_third_model_is_added_during_a_stream_then_removed_without_a_restart(host, deployed, tmp_path):
    """Adding and removing a model re-reads the preset: the router and the chat model keep their
    processes (no restart, no reload of the chat model), and a running stream completes."""
    import threading
    import time

    before = pids(host)
    assert set(before) >= {"router", "chat"}
    # two readers, staggered, stream back to back through the whole deploy: at any moment one of
    # them is mid-stream, so one is when the new preset is written and re-read
    spans: list = []
    stop = threading.Event()
    readers = [threading.Thread(target=stream_chats, args=(host, spans, stop)) for _ in range(2)]
    readers[0].start()
    time.sleep(2)
    readers[1].start()
    try:
        result = run_deploy(inventory(host, tmp_path, "three", [CHAT, EMBED, CHAT2]))
    finally:
        stop.set()
        for r in readers:
            r.join(300)
    assert result.rc == 0, result.stderr[-5000:]
    written = float(host.ssh("stat -c %.9Y /etc/llama-server/models.ini").stdout)
    assert any(sent < written < done for sent, done, _, _ in spans), (written, spans)
    assert spans and all(finish in ("length", "stop") and chunks > 0 for _, _, finish, chunks in spans), spans
    assert set(router_models(host)) == {"chat", "embed", "chat-b"}
    reply = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=120,
                       json={"model": "chat-b", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "chat-b" and reply.json()["choices"][0]["message"]["content"], reply.text
    after = pids(host)
    assert (after["router"], after["chat"]) == (before["router"], before["chat"])

    result = run_deploy(deployed)  # back to two models: the first release again
    assert result.rc == 0, result.stderr[-5000:]
    assert set(router_models(host)) == {"chat", "embed"}
    gone = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=60,
                      json={"model": "chat-b", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert gone.status_code in (400, 404) and "chat-b" in gone.text, gone.text
    again = pids(host)
    assert (again["router"], again["chat"]) == (before["router"], before["chat"])


def test_a_removed_model_comes_back_by_rollback_with_no_transfer(host, deployed):

    sent = veth_bytes(host)
    proc = cli("rollback", str(deployed))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(router_models(host)) == {"chat", "embed", "chat-b"}
    assert "[chat-b]" in host.ssh("cat /etc/llama-server/models.ini").stdout
    reply = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=120,
                       json={"model": "chat-b", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    assert veth_bytes(host) - sent < 5_000_000  # the model (253 MB) never travelled again

    # status shows every model with the router's word on it, and the inventory's two as drift
    proc = cli("status", str(deployed), "--json")
    (row,) = json.loads(proc.stdout)
    states = {m["alias"]: (m["kind"], m["sha256"], m["state"]) for m in row["models"]}
    assert states["chat"] == ("chat", MODEL_SHA256[:12], "loaded") and states["chat-b"][2] == "loaded"
    assert states["embed"][:2] == ("embedding", MODEL_SHA256[:12])
    assert row["drift"] == ["model chat-b to be removed"] and row["health"] == "ok"


def test_with_models_max_1_alternating_requests_swap_the_models(host, tmp_path):
    """Two on-demand chat models and room for one: each request to the other model unloads this
    one (the router's LRU), and both keep answering."""
    router = pids(host)["router"]
    inv = inventory(host, tmp_path, "swap", [{**CHAT, "load": "on_demand"}, CHAT2], llama_router={"models_max": 1})
    result = run_deploy(inv)
    assert result.rc == 0, result.stderr[-5000:]
    assert pids(host)["router"] != router  # a host-wide setting (models_max) restarts the router
    assert router_models(host) == {"chat": "unloaded", "chat-b": "unloaded"}  # the gate unloaded both
    for alias, other in (("chat", "chat-b"), ("chat-b", "chat"), ("chat", "chat-b")):
        reply = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=120, json={
            "model": alias, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200, reply.text
        states = router_models(host)
        assert (states[alias], states[other]) == ("loaded", "unloaded"), states


def test_ngram_drafts_and_idle_sleep_take_effect_and_a_redeploy_wakes_nothing(host, tmp_path):
    """Two router options the benchmark alone deployed before, shown on the host.

    * ``spec_type`` (per model): the chat instance drafts tokens by n-grams. llama-server's reply
      ``timings`` has ``draft_n`` only when speculative decoding ran for the request.
    * ``sleep_idle_seconds`` (host-wide): an idle instance goes to sleep; the router says
      ``sleeping``, and ``llamadeploy status`` shows it. A re-deploy with the same input changes
      nothing and wakes nothing. The next request wakes it in the same process (sleep frees the
      weights, not the child)."""
    # the benchmark's RAG-shaped prompt (benchmarks/router.py): the reply quotes the context, which
    # the n-gram drafts predict
    context = ("The Haldor valve, introduced in 1987, regulates coolant flow in marine engines. It has three "
               "parts: the brass housing, the spring-loaded piston and the ceramic seat. Maintenance requires "
               "replacing the ceramic seat every 4,000 operating hours and checking the spring tension yearly.")
    prompt = f"Context:\n{context}\n\nQuote the context word for word, then list its three parts."
    inv = inventory(host, tmp_path, "sleepy", [{**CHAT, "spec_type": "ngram-map-k"}, EMBED],
                    llama_router={"models_max": 2, "sleep_idle_seconds": 30})
    result = run_deploy(inv)
    assert result.rc == 0, result.stderr[-5000:]
    wait_for(lambda: router_models(host)["chat"] == "sleeping", 90, "the idle chat instance to sleep")
    asleep = pids(host)

    (row,) = json.loads(cli("status", str(inv), "--json").stdout)
    assert {m["alias"]: m["state"] for m in row["models"]} == {"chat": "sleeping", "embed": "unloaded"}, row
    again = run_deploy(inv)
    assert again.rc == 0, again.stderr[-3000:]
    # a wake-up by the status or the re-deploy (seconds each) would show: the idle time to fall asleep
    # again is 30 s
    assert router_models(host)["chat"] == "sleeping"
    assert again.changed == 0, again.stderr[-3000:]
    reply = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=120, json={
        "model": "chat", "max_tokens": 160, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    assert reply.status_code == 200, reply.text
    timings = reply.json()["timings"]
    assert "--spec-type ngram-map-k" in host.ssh(f"ps -o args= -p {asleep['chat']}").stdout
    assert timings.get("draft_n", 0) > 0 and timings.get("draft_n_accepted", 0) > 0, timings
    assert pids(host)["chat"] == asleep["chat"], "the sleeping instance woke in its own process"


def test_a_repinned_model_reloads_alone(host, deployed, tmp_path):
    """A changed model entry (the embedding model's context) re-reads the preset: that model comes
    back with its new flags, the router and the chat model keep their processes."""
    result = run_deploy(deployed)
    assert result.rc == 0, result.stderr[-5000:]
    httpx.post(f"http://{host.address}:8080/v1/embeddings", timeout=120, json={"model": "embed", "input": "x"})
    before = pids(host)
    assert set(before) >= {"router", "chat", "embed"}, before
    result = run_deploy(inventory(host, tmp_path, "repinned", [CHAT, {**EMBED, "ctx_size": 1024}]))
    assert result.rc == 0, result.stderr[-5000:]
    reply = httpx.post(f"http://{host.address}:8080/v1/embeddings", timeout=120, json={"model": "embed", "input": "x"})
    assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) == EMBED_DIM, reply.text
    after = pids(host)
    assert (after["router"], after["chat"]) == (before["router"], before["chat"])
    assert after["embed"] != before["embed"]
    children = host.ssh(f"ps -o args= --ppid {after['router']}").stdout
    embed_args = next(line for line in children.splitlines() if "--alias embed" in line)
    assert "--ctx-size 1024" in embed_args, embed_args


def test_a_new_file_for_the_first_model_reloads_it_alone(host, deployed, tmp_path):
    """The chat model, the preset's first, pinned to another file (the same bytes under another
    name): the unit does not change (it names no model in router mode), the preset does; the
    router keeps its process, and chat comes back from the new file."""
    import shutil

    result = run_deploy(deployed)
    assert result.rc == 0, result.stderr[-5000:]
    httpx.post(f"http://{host.address}:8080/v1/embeddings", timeout=120, json={"model": "embed", "input": "x"})
    before = pids(host)
    assert set(before) >= {"router", "chat", "embed"}, before
    unit = host.ssh("md5sum /etc/systemd/system/llama-server.service").stdout
    again = tmp_path / "gemma-again.gguf"
    shutil.copyfile(gemma_model(), again)
    result = run_deploy(inventory(host, tmp_path, "chat-file", [{**CHAT, "path": str(again)}, EMBED]))
    assert result.rc == 0, result.stderr[-5000:]
    assert host.ssh("md5sum /etc/systemd/system/llama-server.service").stdout == unit
    reply = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=120,
                       json={"model": "chat", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    after = pids(host)
    # the router kept its process (no restart); the embedding model is on demand, so the gate
    # unloaded it after its check, as after any deploy
    assert after["router"] == before["router"], (before, after)
    assert after["chat"] != before["chat"]
    chat_args = host.ssh(f"ps -o args= -p {after['chat']}").stdout
    assert "gemma-again.gguf" in chat_args, chat_args


def test_one_model_to_several_and_back_by_rollback(host, tmp_path):
    """A host switches from today's single-model unit to router mode as one release, and a
    rollback brings the single-model server back: no preset, its one model answering."""

    single = merged_data()
    result = run_deploy(write_inventory(tmp_path / "single.py", [host], single))
    assert result.rc == 0, result.stderr[-5000:]
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    assert "--model" in manifest.args and "--models-preset" not in manifest.args and not manifest.models
    result = run_deploy(inventory(host, tmp_path, "several", [CHAT, EMBED]))
    assert result.rc == 0, result.stderr[-5000:]
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    assert "--models-preset" in manifest.args and [m.alias for m in manifest.models] == ["chat", "embed"]
    assert set(router_models(host)) == {"chat", "embed"}
    proc = cli("rollback", str(tmp_path / "several.py"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    assert "--model" in manifest.args and "--models-preset" not in manifest.args and not manifest.models
    unit_args = host.ssh("ps -o args= -p $(systemctl show -p MainPID --value llama-server)").stdout
    assert "--models-preset" not in unit_args and "--model " in unit_args, unit_args
    reply = httpx.post(f"http://{host.address}:8080/v1/chat/completions", timeout=120,
                       json={"max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"], reply.text
