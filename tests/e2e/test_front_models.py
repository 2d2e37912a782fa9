"""The front door over servers with different model sets (router mode), on real hosts: HAProxy
(Debian's 2.6) reads each request's ``model`` and sends it to a server that serves it.

Three hosts booted once for the module, on one LAN, deployed in one pyinfra run: ``fm1`` serves
chat and embeddings, ``fm2`` chat and a second chat model, ``fmf`` is the front. Checks go to the
front over HTTP (the official OpenAI client where a user would use it), and which server answered
is read from HAProxy's own exporter, per model backend.
"""

from __future__ import annotations

import re

import httpx
import pytest

from llamadeploy.sandbox.assets import MODEL_SHA256, gemma_model
from tests.conftest import merged_data, run_deploy

pytestmark = pytest.mark.e2e

GEMMA = {"path": str(gemma_model()), "sha256": MODEL_SHA256}
CHAT = {**GEMMA, "alias": "chat", "ctx_size": 2048, "parallel": 2}
EMBED = {**GEMMA, "alias": "embed", "kind": "embedding", "pooling": "mean", "ctx_size": 2048, "parallel": 2}
CHAT2 = {**GEMMA, "alias": "chat-b", "ctx_size": 2048, "parallel": 2}


@pytest.fixture(scope="module")
def hosts(testhosts):
    return {"fm1": testhosts("fm1", 81, lan="models"), "fm2": testhosts("fm2", 82, lan="models"),
            "fmf": testhosts("fmf", 83, lan="models")}


@pytest.fixture(scope="module")
def fleet(hosts, tmp_path_factory):
    def server(h, models):
        name, conn = h.inventory_entry()
        data = merged_data(llama_router={"models_max": 2})
        data.pop("llama_model")
        return (name, {**conn, **data, "llama_models": models})

    name, conn = hosts["fmf"].inventory_entry()
    front = (name, {**conn, **merged_data(), "llama_role": "front",
                    "llama_front": {"check_interval": 1, "metrics_allow_from": [f"{hosts['fmf'].gateway}/32"]}})
    servers = [server(hosts["fm1"], [CHAT, EMBED]), server(hosts["fm2"], [CHAT, CHAT2])]
    inv = tmp_path_factory.mktemp("front-models") / "inv.py"
    inv.write_text(f"servers = {servers!r}\nfront = {[front]!r}\n")
    result = run_deploy(inv)
    assert result.rc == 0, (result.stdout + result.stderr)[-5000:]
    return inv


def front(hosts) -> str:
    return f"http://{hosts['fmf'].address}:8080"


def answered(hosts, model: str) -> dict[str, int]:
    """2xx responses per server of the model's backend, from HAProxy's exporter."""
    text = httpx.get(f"http://{hosts['fmf'].address}:8405/metrics", timeout=10).text
    pattern = rf'^haproxy_server_http_responses_total\{{proxy="model_{re.escape(model)}",server="([^"]+)",code="2xx"\}} (\d+)'
    return {m.group(1): int(m.group(2)) for m in re.finditer(pattern, text, re.M)}


def test_the_fronts_model_list_is_the_union_of_the_fleets(hosts, fleet):
    from openai import OpenAI

    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    assert sorted(m.id for m in client.models.list()) == ["chat", "chat-b", "embed"]


def test_each_request_reaches_a_server_that_serves_its_model(hosts, fleet):
    from openai import OpenAI

    client = OpenAI(base_url=f"{front(hosts)}/v1", api_key="unused", max_retries=0, timeout=120)
    fm1, fm2 = hosts["fm1"].address, hosts["fm2"].address
    for _ in range(6):  # only fm1 has embed, only fm2 has chat-b: a wrong route would answer 400
        vectors = client.embeddings.create(model="embed", input=["a cat", "a kitten"]).data
        assert len(vectors) == 2 and len(vectors[0].embedding) == 640
        reply = client.chat.completions.create(model="chat-b", max_tokens=2,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.model == "chat-b"
    for _ in range(8):
        client.chat.completions.create(model="chat", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert set(answered(hosts, "embed")) == {fm1} and answered(hosts, "embed")[fm1] >= 6
    assert set(answered(hosts, "chat-b")) == {fm2} and answered(hosts, "chat-b")[fm2] >= 6
    chat = answered(hosts, "chat")
    assert chat.get(fm1, 0) > 0 and chat.get(fm2, 0) > 0, chat  # both serve chat: both get some


def test_an_unknown_model_gets_404_from_the_front_in_openais_format(hosts, fleet):
    reply = httpx.post(f"{front(hosts)}/v1/chat/completions", timeout=30,
                       json={"model": "nope", "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "not_found_error"
