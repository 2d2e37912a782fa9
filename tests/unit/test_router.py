"""Router mode's pure parts: the settings' rules, the preset a model set renders to, the memory
check for what can be loaded at once, and the gate's shell verdicts run on canned replies."""

from __future__ import annotations

import inspect
import json
import subprocess

import pytest
from pydantic import ValidationError

from llamadeploy.config import HostConfig, RouterModel
from llamadeploy.facts import CpuInfo
from llamadeploy.gguf_meta import ModelMeta
from llamadeploy.render import render
from llamadeploy.roles.health import operations as health_ops
from llamadeploy.roles.router.plan import (
    ROUTER_CACHE_RAM_MIB,
    ROUTER_OVERHEAD,
    check_args,
    instance,
    model_cfg,
    pairs,
    resident,
    resident_problem,
    router_args,
    with_cache_ram,
)
from llamadeploy.tuning import MIB, plan_memory, server_args, unknown_flags

GEMMA3_270M = ModelMeta("gemma3", 18, 32768, 1, 256, 256, 253_113_024, 512, has_chat_template=False,
                        marker_tokens=frozenset({"<start_of_turn>", "<end_of_turn>"}))
CPU = CpuInfo(logical=4, physical=2, sockets=1, numa_nodes=1)
GIB = 1 << 30
CHAT = {"path": "/m/gemma.gguf", "alias": "chat", "ctx_size": 4096, "parallel": 2}
EMBED = {"path": "/m/gemma.gguf", "alias": "embed", "kind": "embedding", "pooling": "mean", "load": "on_demand",
         "ctx_size": 2048, "parallel": 2}


def host(models=(CHAT, EMBED), **sections) -> HostConfig:
    return HostConfig.model_validate({"models": list(models), "server": {"host": "127.0.0.1"}, **sections})


def refused(**data) -> str:
    data.setdefault("server", {"host": "127.0.0.1"})
    with pytest.raises(ValidationError) as err:
        HostConfig.model_validate(data)
    return str(err.value)


# --- settings ---------------------------------------------------------------------------

def test_models_need_unique_aliases_and_at_least_two():
    assert "aliases must be unique; repeated: chat" in refused(models=[CHAT, {**EMBED, "alias": "chat"}])
    assert "llama_models needs two or more" in refused(models=[CHAT])
    assert "give llama_model (one model) or llama_models (several), not both" in refused(
        models=[CHAT, EMBED], model={"path": "/m/x.gguf"})


@pytest.mark.parametrize("entry, message", [
    ({"kind": "rerank"}, "a reranker needs pooling 'rank'"),
    ({"kind": "embedding", "pooling": "rank"}, "pooling 'rank' is a reranker's"),
    ({"kind": "chat", "pooling": "mean"}, "pooling is for embedding and rerank models"),
    ({"kind": "embedding", "spec_type": "ngram-simple"}, "spec_type is for chat models"),
    ({"alias": "org/model:q4"}, "String should match pattern"),
])
def test_a_model_entry_is_refused_with_what_is_allowed(entry, message):
    assert message in refused(models=[CHAT, {**EMBED, "pooling": None, **entry}])


@pytest.mark.parametrize("sections, field", [
    ({"build": {"backend": "cuda"}}, "router mode is not built for GPU hosts yet"),
    ({"mode": "docker", "server": {"host": "127.0.0.1", "gpu_layers": 20}}, "router mode is not built for GPU hosts yet"),
    ({"router": {"models_max": 1}, "models": [CHAT, {**EMBED, "load": "startup"}]}, "2 models load at startup"),
])
def test_what_router_mode_does_not_cover_is_refused(sections, field):
    assert field in refused(**{"models": [CHAT, EMBED], **sections})


def test_docker_mode_runs_the_router_listening_and_reading_inside_its_container():
    """Docker mode: the router binds the container's port and reads the preset and the key where
    the compose file mounts them (roles/router.planned passes these)."""
    cfg = host(mode="docker", server={"host": "127.0.0.1", "api_key": "sk-" + "a" * 30})
    args = router_args(cfg, "/etc/llama-router/models.ini", 2, 2, bind=("0.0.0.0", 8080), key_path="/run/secrets/api_key")
    assert args[:6] == ["--host", "0.0.0.0", "--port", "8080", "--models-preset", "/etc/llama-router/models.ini"]
    assert args[args.index("--api-key-file") + 1] == "/run/secrets/api_key"
    from llamadeploy.roles.router import preset_path

    assert preset_path(cfg) == "/etc/llama-server/router/models.ini"  # a directory the container mounts
    assert preset_path(host()) == "/etc/llama-server/models.ini"


def test_router_flags_are_the_schemas_in_extra_args():
    assert "llama_router.sleep_idle_seconds" in refused(models=[CHAT, EMBED], server={
        "host": "127.0.0.1", "extra_args": ["--sleep-idle-seconds", "5"]})


# --- the preset -------------------------------------------------------------------------

def instances(cfg: HostConfig, memory: int = 8 * GIB):
    out = []
    for m in cfg.models:
        mcfg = model_cfg(cfg, m)
        plan = plan_memory(mcfg, GEMMA3_270M, memory, CPU)
        path = f"/var/lib/llama-server/models/{m.alias}.gguf"
        out.append(instance(m, path, server_args(mcfg, CPU, plan, path, m.alias), plan))
    return out


def test_each_model_gets_its_own_section_and_the_router_only_what_all_share():
    cfg = host()
    chat, embed = instances(cfg)
    keys = dict(chat.options)
    assert keys["model"] == "/var/lib/llama-server/models/chat.gguf"
    assert (keys["ctx-size"], keys["parallel"], keys["chat-template"], keys["no-jinja"]) == ("4096", "2", "gemma", "true")
    assert keys["load-on-startup"] == "true" and keys["stop-timeout"] == "10"
    # what the router sets for every child never reaches a section (command line > section)
    assert not {"host", "port", "alias", "threads", "metrics", "api-key-file"} & set(keys)
    e = dict(embed.options)
    assert (e["embedding"], e["pooling"], e["load-on-startup"]) == ("true", "mean", "false")
    args = router_args(cfg, "/etc/llama-server/models.ini", 2, 2)
    assert args[:8] == ["--host", "127.0.0.1", "--port", "8080", "--models-preset", "/etc/llama-server/models.ini",
                        "--models-max", "4"]
    assert "--model" not in args and "--ctx-size" not in args


def test_the_preset_renders_as_the_router_reads_it():
    text = render("router/models.ini.j2", release_key="b11434-x",
                  sections=[(i.alias, i.options) for i in instances(host())])
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "version = 1"
    assert lines[1] == "[chat]" and "[embed]" in lines
    assert all(" = " in line for line in lines if not line.startswith("["))


def test_every_preset_key_is_checked_against_the_binary_as_a_flag():
    cfg = host()
    flags = check_args(instances(cfg))
    assert "--embedding" in flags and "--pooling" in flags and "--ctx-size" in flags
    assert "--load-on-startup" not in flags and "--model" not in flags  # preset-only keys, and the path
    assert unknown_flags(flags, frozenset({"--ctx-size"})) != []


def test_every_kind_renders_flags_the_b11434_binary_knows():
    """Chat with an n-gram draft, embedding, rerank, and a router that sleeps idle models: every
    preset key and router flag is one the real b11434 ``--help`` lists (a key it does not know
    would stop the router at start, after the switch)."""
    from pathlib import Path

    from llamadeploy.facts import parse_help_flags

    help_text = (Path(__file__).parent / "data" / "llama-server-b11434-help.txt").read_text().splitlines()
    known = parse_help_flags(help_text)
    rerank = {"path": "/m/gemma.gguf", "alias": "rr", "kind": "rerank", "pooling": "rank", "load": "on_demand"}
    cfg = host(models=({**CHAT, "spec_type": "ngram-mod"}, EMBED, rerank), router={"sleep_idle_seconds": 300})
    insts = instances(cfg)
    options = {i.alias: dict(i.options) for i in insts}
    assert options["chat"]["spec-type"] == "ngram-mod" and options["rr"]["rerank"] == "true"
    assert options["rr"]["pooling"] == "rank" and options["embed"]["embedding"] == "true"
    args = router_args(cfg, "/etc/llama-server/models.ini", 2, 2)
    assert args[args.index("--sleep-idle-seconds") + 1] == "300"
    assert unknown_flags(args + check_args(insts), known) == []
    assert unknown_flags(["--spec-type", "x", "--not-a-flag"], known) == ["--not-a-flag"]  # the check bites


def test_pairs_reads_an_argument_vector_as_preset_lines():
    assert pairs(["--ctx-size", "4096", "--swa-full", "--numa", "distribute", "--kv-unified"]) == [
        ("ctx-size", "4096"), ("swa-full", "true"), ("numa", "distribute"), ("kv-unified", "true")]
    with pytest.raises(ValueError):
        pairs(["-c", "4096"])


# --- memory ---------------------------------------------------------------------------------

def test_the_largest_models_max_models_must_fit_together():
    cfg = host([CHAT, EMBED, {**CHAT, "alias": "big", "load": "on_demand", "ctx_size": 16384}],
               router={"models_max": 2})
    insts = with_cache_ram(instances(cfg))
    assert [i.alias for i in resident(insts, 2)] == ["big", "chat"]
    need = ROUTER_OVERHEAD + sum(i.plan.total + ROUTER_CACHE_RAM_MIB * MIB for i in resident(insts, 2))
    assert resident_problem(insts, 2, need) is None
    why = resident_problem(insts, 2, need - 1)
    assert why is not None and "2 model(s) can be loaded at once (llama_router.models_max = 2): big" in why
    assert f"+ prompt cache {ROUTER_CACHE_RAM_MIB} MiB" in why
    assert "llama_router.models_max = 1, or" in why and f"llama_limits.memory >= {-(-need // MIB)}M" in why
    # no limit on the count: all three at once
    assert len(resident(insts, 0)) == 3


def test_chat_models_keep_a_fixed_prompt_cache_that_adding_a_model_does_not_change():
    two = with_cache_ram(instances(host()))
    chat, embed = two
    assert dict(chat.options)["cache-ram"] == str(ROUTER_CACHE_RAM_MIB) and dict(embed.options)["cache-ram"] == "0"
    assert list(dict(chat.options))[-2:] == ["load-on-startup", "stop-timeout"]  # preset-only keys stay last
    three = with_cache_ram(instances(host([CHAT, EMBED, {**CHAT, "alias": "other", "load": "on_demand"}])))
    assert three[0].options == chat.options  # the router would reload a model whose section changed
    assert dict(with_cache_ram(instances(host()), given=200)[0].options)["cache-ram"] == "200"


def test_model_cfg_is_the_hosts_settings_for_one_instance():
    cfg = host(server={"host": "127.0.0.1", "extra_args": ["--no-webui"], "api_key": "k" * 20})
    mcfg = model_cfg(cfg, cfg.models[1])
    assert isinstance(mcfg.model, RouterModel) and mcfg.model.alias == "embed"
    assert mcfg.server.ctx_size == 2048 and mcfg.server.extra_args == [] and mcfg.server.api_key is None
    assert mcfg.models == []


# --- the gate's verdicts, on canned replies ---------------------------------------------------

def verdict(op, reply: dict, **kwargs) -> subprocess.CompletedProcess:
    """Run the operation's shell with curl's reply in place (no server: only the check)."""
    (command,) = list(inspect.unwrap(op)(url="http://h/x", alias="m", timeout=5, unit="llama-server", **kwargs))
    check = command.split("if [", 1)[1]
    script = f'out=$(mktemp); cat > "$out" <<"JSON"\n{json.dumps(reply, indent=1)}\nJSON\ncode=200; if [' + check
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def embeddings(*vectors: list[float]) -> dict:
    return {"data": [{"embedding": v, "index": n, "object": "embedding"} for n, v in enumerate(vectors)]}


def test_embeddings_must_tell_similar_from_unrelated():
    ok = verdict(health_ops.embeddings_answer, embeddings([1, 0.1, 0], [0.9, 0.2, 1e-3], [0, 1, 1]))
    assert ok.returncode == 0 and ok.stdout.startswith("3 dimensions, similar 0.99"), ok
    backwards = verdict(health_ops.embeddings_answer, embeddings([0, 1, 0], [1, 0.2, 0], [0, 1, 0]))
    assert backwards.returncode == 1 and "similar 0.196, unrelated 1.000" in backwards.stderr
    assert verdict(health_ops.embeddings_answer, embeddings([0, 0], [0, 0], [0, 0])).returncode == 1  # zeros
    assert verdict(health_ops.embeddings_answer, embeddings([1, 0], [1, 0, 0], [0, 1])).returncode == 1  # dims
    assert verdict(health_ops.embeddings_answer, {"error": {"code": 400}}).returncode == 1


def test_embeddings_must_have_the_models_dimension():
    alike = embeddings([1, 0.1, 0], [0.9, 0.2, 1e-3], [0, 1, 1])
    assert verdict(health_ops.embeddings_answer, alike, dimensions=3).returncode == 0
    wrong = verdict(health_ops.embeddings_answer, alike, dimensions=384)
    assert wrong.returncode == 1 and "3 dimensions, the model has 384" in wrong.stderr, wrong
    assert verdict(health_ops.embeddings_answer, alike, dimensions=None).returncode == 0  # unknown: any one length


def test_rerank_must_put_the_answering_document_first():
    good = {"results": [{"index": 0, "relevance_score": -3.1}, {"index": 1, "relevance_score": 5.2},
                        {"index": 2, "relevance_score": -0.01}]}
    ok = verdict(health_ops.rerank_answers, good)
    assert ok.returncode == 0 and ok.stdout.strip() == "best document 1 (score 5.2)", ok
    wrong = {"results": [{"relevance_score": 5.2, "index": 2}, {"index": 1, "relevance_score": 1.0},
                         {"index": 0, "relevance_score": 0.5}]}
    assert verdict(health_ops.rerank_answers, wrong).returncode == 1
    assert verdict(health_ops.rerank_answers, {"results": good["results"][1:2]}).returncode == 1  # one of three
