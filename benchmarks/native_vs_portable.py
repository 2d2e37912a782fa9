"""GGML_NATIVE builds vs portable ones: what building once per CPU kind buys. Not a test.

Build once, ship many keys native builds (``llama_build.native``, the default) by the CPU's
feature flags, so each distinct CPU compiles once; the alternative is one portable build for
the whole fleet (``native = false``: GGML_NATIVE=OFF, the compiler's baseline x86-64). This
measures what the choice costs on this machine: one sandbox host gets both releases, and
``llamadeploy rollback --to`` switches between them (a link and a restart: no transfer, no
compile), alternating which goes first, ``ROUNDS`` rounds; generation tok/s at 1 and 4
clients with the test model. Writes ``benchmarks/NATIVE-vs-PORTABLE.md`` and a JSON file.

    sudo .venv/bin/python -m benchmarks.native_vs_portable [ROUNDS]
    .venv/bin/python -m benchmarks.native_vs_portable --render benchmarks/native-vs-portable-DATE.json
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import DEPLOY_TIMEOUT, describe, machine, publish, render_or_run
from llamadeploy.bench import bench
from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
LEVELS = [1, 4]


def run(*cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")


def main(rounds: int = 3) -> int:
    host = SandboxHost("natport", 79, binds=dict(SHARED_BINDS))
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-natport-"))
    run_info = machine()
    ids: dict[str, str] = {}
    results: dict[str, list[dict[int, float]]] = {"native": [], "portable": []}
    try:
        host.boot()
        for variant, native in (("portable", False), ("native", True)):
            data = default_data()
            data["llama_build"] = {**data["llama_build"], "native": native}
            inv = write_inventory(tmp / f"{variant}.py", [host], data)
            run(str(BIN / "pyinfra"), "-y", str(inv), "deploy.py")
            ids[variant] = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id or ""
        url = f"http://{host.address}:8080"
        for r in range(rounds):
            order = ["native", "portable"] if r % 2 == 0 else ["portable", "native"]
            for variant in order:
                run(str(BIN / "llamadeploy"), "rollback", str(tmp / "native.py"), "--to", ids[variant])
                report = bench(url, LEVELS, per_client=4, max_tokens=64)
                results[variant].append({lv.clients: lv.tok_per_s for lv in report.levels})
    finally:
        host.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    publish(OUT / "NATIVE-vs-PORTABLE.md", "native-vs-portable", run_info, {**run_info, "ids": ids, "results": results},
            page)
    return 0


def page(data: dict, raw_name: str) -> str:
    """NATIVE-vs-PORTABLE.md from one run's raw JSON alone (``main`` and ``--render`` alike), so
    the page can be written again, and checked, without a host. The levels and the rounds are
    the JSON's own (its keys are strings: the clients, as the page prints them)."""
    stamp = str(data["date"])[:10]
    results = data["results"]
    rows = []
    for clients in results["native"][0]:
        nat = statistics.median(r[clients] for r in results["native"])
        por = statistics.median(r[clients] for r in results["portable"])
        each = ", ".join(f"{n[clients] / p[clients]:.2f}" for n, p in zip(results["native"], results["portable"], strict=True))
        rows.append(f"| {clients} | {nat:.1f} | {por:.1f} | **{nat / por:.2f}** ({each}) |")
    return f"""# GGML_NATIVE vs portable build ({stamp})

Written whole by `benchmarks/native_vs_portable.py` {describe(data)}. Raw: `{raw_name}`.

Gemma 3 270M Q4_K_M, llama.cpp b11434, one sandbox host on this machine, the same
tuned unit; only the build differs: `native = true` (GGML_NATIVE=ON, this CPU's instruction
set) vs `native = false` (GGML_NATIVE=OFF). Both releases stay on the host; each round
switches with `llamadeploy rollback --to` and runs `bench` (64 tokens, 4 requests per
client); {len(results['native'])} rounds alternating which goes first; medians, then every round's ratio.

| clients | native tok/s | portable tok/s | native / portable |
|---|---|---|---|
{chr(10).join(rows)}

Why fleets here build natively, keyed by CPU flags: the release is one static binary, and
upstream's portable recipe that keeps native speed (`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`,
a CPU backend per instruction-set level chosen at run time) needs shared libraries. A fleet of
identical machines still builds once; each distinct CPU model builds once more.
"""


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "NATIVE-vs-PORTABLE.md", page, lambda: main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
