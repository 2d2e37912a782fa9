"""The shipped acceptance suite: is this host really serving the OpenAI chat API?

Runs against any inventory host (see conftest.py for options). Each test looks
at the host through testinfra (systemd, sockets, files) or through real HTTP;
none of it goes through the deploy code.
"""

from __future__ import annotations

import json
import re

import pytest

from llamadeploy.tuning import KV_TYPE_BYTES

CHAT = {"messages": [{"role": "user", "content": "Name one colour."}], "max_tokens": 12, "temperature": 0}


def test_service_active_and_enabled(host, manifest):
    if manifest.mode == "docker":
        with host.sudo():
            status = host.check_output(
                f"docker ps --filter label=com.docker.compose.service={manifest.compose_service} --format '{{{{.Status}}}}'"
            )
        assert status.startswith("Up"), status
        assert host.service("docker").is_enabled
        return
    svc = host.service(manifest.unit)
    assert svc.is_running
    assert svc.is_enabled


def test_runs_as_unprivileged_user(host, manifest):
    procs = host.process.filter(comm="llama-server")
    assert procs, "no llama-server process"
    assert all(p.user != "root" for p in procs)


def test_weights_locked_when_planned(host, manifest):
    """With ``--load-mode ...mlock`` every weight page is resident and locked.

    llama.cpp only warns when mlock fails (e.g. a too small LimitMEMLOCK), so a
    host can serve while silently unlocked; this is where that shows.
    """
    mode = manifest.memory_plan.load_mode or ""
    if "mlock" not in mode:
        pytest.skip(f"load mode {mode or 'llama-server auto'}: nothing locked")
    pid = int(host.check_output(f"systemctl show -p MainPID --value {manifest.unit}"))
    with host.sudo():
        status = host.file(f"/proc/{pid}/status").content_string
    locked_kib = int(re.search(r"^VmLck:\s+(\d+) kB", status, re.M).group(1))
    model_bytes = manifest.memory_plan.model_bytes
    assert locked_kib * 1024 >= model_bytes, f"VmLck {locked_kib} kB < model {model_bytes} bytes"


def test_port_listening(host, manifest):
    assert host.socket(f"tcp://{manifest.host}:{manifest.port}").is_listening


def test_health(http):
    r = http.get("/health")
    assert r.status_code == 200, r.text
    assert r.json().get("status") == "ok"


def test_models_lists_alias(api, manifest):
    r = api.get("/v1/models")
    assert r.status_code == 200, r.text
    ids = [m["id"] for m in r.json()["data"]]
    assert manifest.alias in ids


def test_chat_completion_non_streaming(api, manifest):
    r = api.post("/v1/chat/completions", json={**CHAT, "model": manifest.alias})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_streaming(api, manifest):
    events = []
    with api.stream("POST", "/v1/chat/completions", json={**CHAT, "model": manifest.alias, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text, "stream carried no content"


def _predicted_total(api) -> float:
    r = api.get("/metrics")
    assert r.status_code == 200, r.text
    m = re.search(r"^llamacpp:tokens_predicted_total\s+([0-9.e+]+)$", r.text, re.M)
    assert m, "no llamacpp:tokens_predicted_total in /metrics"
    return float(m.group(1))


def test_metrics_count_completions(api, manifest):
    before = _predicted_total(api)
    r = api.post("/v1/chat/completions", json={**CHAT, "model": manifest.alias})
    assert r.status_code == 200
    after = _predicted_total(api)
    assert after >= before + r.json()["usage"]["completion_tokens"]


def test_api_key_enforced(http, api_key, manifest):
    if api_key is None:
        r = http.get("/v1/models")
        assert r.status_code == 200, "no key configured, yet /v1/models refused"
        return
    assert http.get("/v1/models").status_code == 401
    wrong = {"Authorization": "Bearer not-the-key-000000"}
    assert http.post("/v1/chat/completions", json=CHAT, headers=wrong).status_code == 401


def test_api_key_never_exposed(host, manifest, api_key):
    if api_key is None:
        return
    key_file = host.file(manifest.api_key_file)
    assert key_file.mode & 0o077 == 0, oct(key_file.mode)
    assert key_file.user != "root"
    with host.sudo():
        assert api_key not in host.check_output("ps -eo args")
        if manifest.mode == "docker":
            project = manifest.compose_project
            assert api_key not in host.file(f"{project}/docker-compose.yml").content_string
            assert api_key not in host.check_output(
                f"docker logs $(docker ps -q --filter label=com.docker.compose.service={manifest.compose_service}) 2>&1"
            )
        else:
            assert api_key not in host.file(f"/etc/systemd/system/{manifest.unit}.service").content_string
            assert api_key not in host.check_output(f"journalctl -u {manifest.unit} --no-pager -o cat")


#: control tokens of the common chat-template families; a reply carrying one as text was
#: rendered with a template whose markers the model's vocabulary does not have (a Gemma base
#: model under llama-server's ChatML fallback answers "...<|im_end|>\n<|im_start|>user ...")
CONTROL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|start_header_id|>",
    "<|eot_id|>", "<|user|>", "<|assistant|>", "<|end|>", "[INST]", "[/INST]", "<|endoftext|>",
)


def test_reply_carries_no_foreign_control_tokens(api, manifest):
    """Replies are plain text under the chat template the deploy chose (manifest: chat_template)."""
    question = {"messages": [{"role": "user", "content": "Write two short sentences about the sea."}],
                "max_tokens": 96, "temperature": 0}
    r = api.post("/v1/chat/completions", json={**question, "model": manifest.alias})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    leaked = [t for t in CONTROL_TOKENS if t in text]
    assert not leaked, f"reply carries {leaked} (chat template {manifest.chat_template or 'the model own'}): {text!r}"


# --- GPU hosts (skipped where the manifest lists no GPU) ---------------------------------------

MIB = 1 << 20
#: the share of the weights and KV cache known to be on the GPUs that nvidia-smi must show at
#: least: token embeddings stay in host memory (a few percent of a model's weights; a model with
#: tied embeddings gets an output copy of them on the GPU instead), and the CUDA context and
#: compute buffers come on top (H200, Gemma 3 270M, every layer: 1480 MiB held for 235 MiB of
#: weights and 576 MiB of KV cache, benchmarks/GPU.md)
GPU_SHARE = 0.9


def _option(args: list[str], *names: str) -> str | None:
    """The last value of an option in an argument vector (``-ctk q8_0``), None when not given."""
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]
    return values[-1] if values else None


def kv_on_gpu_mib(manifest, ctx: int) -> float:
    """MiB of KV cache a server with every layer on the GPUs holds there, where the manifest tells
    it exactly, else 0 (never more than is there): the plan's per-token size (f16 K and V, every
    layer at full length) scaled to the cache types in the arguments, for ``ctx`` tokens. 0 with
    ``--no-kv-offload`` (the cache stays in host memory), with a cache type the plan does not know,
    and without ``--swa-full``: a model with sliding-window layers then keeps a window of those,
    and the manifest does not say whether the model has any."""
    args, plan = manifest.args, manifest.memory_plan
    if not plan.swa_full or any(a in ("-nkvo", "--no-kv-offload") for a in args):
        return 0.0
    k = _option(args, "-ctk", "--cache-type-k") or "f16"
    v = _option(args, "-ctv", "--cache-type-v") or "f16"
    if k not in KV_TYPE_BYTES or v not in KV_TYPE_BYTES:
        return 0.0
    scale = (KV_TYPE_BYTES[k] + KV_TYPE_BYTES[v]) / (2 * KV_TYPE_BYTES["f16"])
    return ctx * plan.kv_bytes_per_token * scale / MIB


def gpu_need_mib(manifest, pinned: str, ctx: int) -> tuple[float, str]:
    """The least GPU memory (MiB) the server must hold with ``--n-gpu-layers pinned``, and how it
    was reckoned.

    Every layer (``all``, ``-1``): :data:`GPU_SHARE` of the weights (the model's size) plus the KV
    cache (:func:`kv_on_gpu_mib`). A number of layers (``auto`` too): which share of the weights
    and cache that is needs the model's layer count and per-layer sizes, which the manifest does
    not record, so only that the server holds some; likewise with ``--rpc``, where the workers'
    devices hold part of the model.
    """
    if pinned not in ("all", "-1") or "--rpc" in manifest.args:
        return 1, "some GPU memory (the manifest records no per-layer sizes to reckon a share of layers)"
    weights = manifest.memory_plan.model_bytes / MIB
    kv = kv_on_gpu_mib(manifest, ctx)
    return GPU_SHARE * (weights + kv), f"{GPU_SHARE} x (weights {weights:.0f} MiB + KV cache {kv:.0f} MiB)"


def test_gpu_lists_the_server_process(host, manifest, server_pid):
    """nvidia-smi lists the server among the GPU's compute processes: a CUDA build that fell
    back to the CPU (driver too old, devices hidden by the unit) does not appear there."""
    if not manifest.gpus:
        pytest.skip("no NVIDIA GPU in the deploy manifest")
    out = host.check_output("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits")
    pids = {int(line.split(",")[0]) for line in out.splitlines() if line.split(",")[0].strip().isdigit()}
    assert server_pid in pids, f"server pid {server_pid} not among the GPU's processes:\n{out}"


def test_gpu_layers_offloaded(host, manifest, server_log, server_pid):
    """The layers the unit pins are on the GPU.

    From llama.cpp's own load log where it is there ("load_tensors: offloaded N/M layers to GPU",
    src/llama-model.cpp; llama.cpp logs it at verbosity 4, which a unit does not run with: 8x the
    journal lines per request). Otherwise from nvidia-smi: with every layer pinned, the weights
    and each layer's KV cache live on the GPU, so the server holds at least most of the model and
    the planned KV cache there (:func:`gpu_need_mib`; a server that fell back to the CPU holds
    none of it).
    """
    if not manifest.gpus:
        pytest.skip("no NVIDIA GPU in the deploy manifest")
    pinned, ctx = manifest.gpu_layers or "0", manifest.memory_plan.ctx_size
    if pinned == "fit":  # llama-fit-params' result, pinned in the unit's environment file
        with host.sudo():
            text = host.file(manifest.gpu_pin_file).content_string
        m = re.search(r"-ngl (\S+)", text)
        assert m, f"no -ngl in {manifest.gpu_pin_file}:\n{text}"
        pinned = m.group(1)
        ctx = int(re.search(r"-c (\d+)", text).group(1))
    found = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", server_log)
    if found:
        done, total = (int(x) for x in found[-1])
        want = total if pinned in ("all", "-1") else min(int(pinned), total)
        assert done == want, f"{done}/{total} layers offloaded, the unit pins --n-gpu-layers {pinned}"
        return
    out = host.check_output("nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits")
    used = sum(int(c[1]) for c in (line.split(",") for line in out.splitlines())
               if c[0].strip() == str(server_pid) and c[-1].strip().isdigit())
    need, reckoned = gpu_need_mib(manifest, pinned, ctx)
    assert used >= need, (f"the server holds {used} MiB on the GPU; --n-gpu-layers {pinned} needs >= {need:.0f} MiB: "
                          f"{reckoned}")
