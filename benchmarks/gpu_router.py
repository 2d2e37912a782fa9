"""Router mode on a real GPU, one device call (issue 23's GPU part; a recording for issue 24).

What the product's router depends on, on a lent NVIDIA machine: llama-server b11434 built with
the product's CUDA options (``gpu_device.build``: the ``NvidiaGpus``/``CudaToolkit`` facts and
``cuda_cmake_args``), started in router mode from a preset like the one ``roles/router`` renders,
with the real embedding model of ``test_router_embedding`` (all-MiniLM-L6-v2, f16) twice: one
instance with every layer on the GPU, one with ``n-gpu-layers = 0``, one with ``device = none``.
It records where each child put its layers and what GPU memory each holds, compares their
vectors, and times each. It also records the ``nvidia-smi`` query a GPU-metrics textfile
collector would run. No systemd there, no chat model (the 241 MiB Gemma does not fit the call's
64 MiB): what it shows is stated in the page it writes.

    python3 benchmarks/gpu_router.py run SRC.tar.xz MODEL.gguf OUT    # on the device machine
    python3 benchmarks/gpu_router.py render benchmarks/gpu-router-h200.json  # here: writes GPU-ROUTER.md
                                       # (the run's router.log kept as gpu-router-h200-router.log)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import committed  # noqa: E402

PORT = 8080
TEXTS = ["When do I have to pay the invoice?", "The invoice is due within 30 days of delivery.",
         "Our office is closed on public holidays.",
         "Payment terms: customers pay the bill no later than one month after the goods arrive."]
BATCH = [f"Document {n}: the valve's ceramic seat is replaced every {n} hours." for n in range(16)]
METRICS_QUERY = ("nvidia-smi --query-gpu=index,uuid,name,memory.used,memory.total,utilization.gpu,"
                 "temperature.gpu,power.draw --format=csv,nounits")


def sh(cmd: str) -> str:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120).stdout


def post(path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def run(src: Path, model: Path, out: Path) -> None:
    from benchmarks import gpu_device

    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"metrics_query": METRICS_QUERY}
    (out / "nvidia-smi-metrics.csv").write_text(sh(METRICS_QUERY))
    work = Path("/tmp/gpu-router")
    gpu_device.TARGETS[:] = ["llama-server"]  # the router needs no fit tool and no RPC server here
    gpu_device.build(src, work, out)
    res["build"] = gpu_device._built(work, out)
    preset = work / "models.ini"
    preset.write_text(f"[*]\nctx-size = 1024\nparallel = 2\n\n"
                      f"[embed-gpu]\nmodel = {model.resolve()}\nembeddings = true\npooling = mean\n"
                      f"n-gpu-layers = all\nload-on-startup = true\n\n"
                      f"[embed-cpu]\nmodel = {model.resolve()}\nembeddings = true\npooling = mean\n"
                      f"n-gpu-layers = 0\nload-on-startup = true\n\n"
                      f"[embed-none]\nmodel = {model.resolve()}\nembeddings = true\npooling = mean\n"
                      f"n-gpu-layers = 0\ndevice = none\nload-on-startup = true\n")
    res["preset"] = preset.read_text()
    log = out / "router.log"
    args = [str(work / "build" / "bin" / "llama-server"), "--models-preset", str(preset), "--models-max", "3",
            "--host", "127.0.0.1", "--port", str(PORT), "--metrics"]
    res["args"] = args[1:]
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/models", timeout=5) as r:
                    models = json.loads(r.read())["data"]
                if all(m["status"]["value"] == "loaded" for m in models) and len(models) == 3:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        res["models"] = models
        vecs = {}
        for alias in ("embed-gpu", "embed-cpu", "embed-none"):
            data = post("/v1/embeddings", {"model": alias, "input": TEXTS})["data"]
            vecs[alias] = [d["embedding"] for d in data]
            t0 = time.perf_counter()
            for _ in range(10):
                post("/v1/embeddings", {"model": alias, "input": BATCH})
            res[f"{alias}_texts_per_s"] = round(10 * len(BATCH) / (time.perf_counter() - t0), 1)
        g = vecs["embed-gpu"]
        res["dims"] = [len(v) for v in g]
        res["gpu_vs_cpu_cosine"] = [round(cosine(a, b), 6) for a, b in zip(g, vecs["embed-cpu"], strict=True)]
        res["gpu_vs_none_cosine"] = [round(cosine(a, b), 6) for a, b in zip(g, vecs["embed-none"], strict=True)]
        res["retrieval"] = [round(cosine(g[0], v), 4) for v in g[1:]]
        res["compute_apps"] = sh("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader")
        res["children"] = sh(f"ps -o pid=,args= --ppid {proc.pid}")
        (out / "nvidia-smi-metrics-busy.csv").write_text(sh(METRICS_QUERY))
    finally:
        proc.terminate()
        proc.wait(30)
    text = log.read_text(errors="replace")
    res["offload_lines"] = [ln.strip() for ln in text.splitlines() if "offloaded" in ln or "CUDA0 model buffer" in ln]
    (out / "gpu-router.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("build", "preset")}, indent=1))


def render(raw: Path) -> None:
    """The page, from the run's JSON and its router log (``<raw stem>-router.log`` beside it)."""
    res = json.loads(raw.read_text())
    log = raw.with_name(f"{raw.stem}-router.log").read_text(errors="replace")
    ports = {a["status"]["args"][a["status"]["args"].index("--port") + 1]: a["id"] for a in res["models"]}
    placed = sorted({f"{ports.get(ln[1:ln.index(']')], '?')}: {ln.split('resolve_fused_ops: ')[1].split(' but ')[0]}"
                     for ln in log.splitlines() if "is assigned to device" in ln and ln.startswith("[")})
    pids = {ln.split()[0]: ln.split("--alias ")[1].split()[0] for ln in res["children"].splitlines() if "--alias " in ln}
    gpu_mem = [f"{pids.get(ln.split(',')[0].strip(), '?')}: {ln.split(',')[2].strip()}"
               for ln in res["compute_apps"].splitlines() if ln.strip()]
    b = res["build"]
    gpu = b["gpus"][0]
    ok = min(res["gpu_vs_cpu_cosine"]) > 0.999
    page = Path(__file__).resolve().parent / "GPU-ROUTER.md"
    page.write_text(f"""# Router mode on a real GPU

Written whole by `benchmarks/gpu_router.py render` from one device run's JSON (`{raw.name}`, kept
beside this page; commit {committed(raw)}). Machine: {gpu['name']} ({gpu['memory_total_mib']} MiB, driver {gpu['driver']}), CUDA
{b['cuda']}, {b['cores']} cores, no systemd. The build: the product's CUDA options
(`{b['release_kind']}`), {b['build_s']} s.

One `llama-server` in router mode (`{' '.join(res['args'][:4])} ...`); its preset holds
the real embedding model of `test_router_embedding` (all-MiniLM-L6-v2, f16) three times:
`embed-gpu` with `n-gpu-layers = all`, `embed-cpu` with `n-gpu-layers = 0`, `embed-none` with
`n-gpu-layers = 0` and `device = none`.

| check | result |
|---|---|
| where the children put their layers (their logs) | {'; '.join(placed) or 'no line found'} |
| GPU memory per child (`nvidia-smi --query-compute-apps`) | {'; '.join(gpu_mem) or 'none'} |
| dimensions | {res['dims']} |
| `embed-gpu` vectors against `embed-cpu`'s (cosine, 4 texts) | {res['gpu_vs_cpu_cosine']} ({'same' if ok else 'DIFFERENT'}) |
| `embed-gpu` vectors against `embed-none`'s | {res['gpu_vs_none_cosine']} |
| retrieval on the GPU (query against the 3 documents) | {res['retrieval']} |
| texts/s, 10 requests of 16 texts, GPU | {res['embed-gpu_texts_per_s']} |
| texts/s, the same, `n-gpu-layers = 0` | {res['embed-cpu_texts_per_s']} |
| texts/s, the same, `device = none` | {res['embed-none_texts_per_s']} |

What this shows: the router starts a child per preset section, each with its own
`n-gpu-layers`, and the three children give the same vectors. **`n-gpu-layers = 0` is not "off
the GPU" on a CUDA build:** that child held GPU memory too, and was the slowest of the three.
The child with `device = none` is not in `nvidia-smi`'s list at all: a model meant to stay off
the GPU needs `device = none`. What it does not show: the product does not deploy router mode on CUDA hosts yet (docs/router.md,
"Limits"), no chat model ran (the 241 MiB Gemma does not fit one device call's 64 MiB), and
nothing ran under systemd.

`tests/unit/data/nvidia-smi/h200-metrics-idle.csv` and `h200-metrics-busy.csv` are the raw output
of `{res['metrics_query']}`, idle and with the three instances loaded: the input of the GPU metrics
collector's tests (`tests/unit/test_gpu_metrics.py`, roles/node_exporter).
""")
    print(page.read_text())


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        render(Path(sys.argv[2]))
