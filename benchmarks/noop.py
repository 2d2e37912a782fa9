"""No-op runs and rollouts, and the artifact cache: how long a fleet operation takes. Not a test.

Boots three throwaway sandbox hosts, deploys the test model on them, then measures, each
``ROUNDS`` times (median reported), with the same input (nothing to change):

* ``pyinfra -y INVENTORY deploy.py`` on 1 host and on 3 hosts (a no-op deploy);
* ``llamadeploy rollout`` on 1 and 3 hosts (a no-op rollout: one pyinfra run per batch);
* a fresh rollout of a new release to 3 hosts with an empty controller cache (one host
  compiles, two receive) vs with the artifact already cached (none compiles);
* how a no-op deploy and a no-op rollout on 1 host grow with the model's size: the test model
  as shipped (Q4_K_M) and widened to F16 and F32 (``benchmarks.widened``: same model, 2x and
  4x the bytes), each beside the baseline a full re-verify pays (``--data llama_verify=full``:
  every model byte re-hashed on the host), as a ratio.

Writes ``benchmarks/NOOP.md`` and a JSON file. Only test-host addresses are used.

    sudo .venv/bin/python -m benchmarks.noop [ROUNDS]
    .venv/bin/python -m benchmarks.noop --render benchmarks/noop-DATE.json   # the page again, no host
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import DEPLOY_TIMEOUT, describe, machine, publish, render_or_run
from benchmarks.widened import widened
from llamadeploy.artifacts import file_sha256
from llamadeploy.config import HostConfig
from llamadeploy.hostdata import parse_config
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost, assets
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
NOTES = OUT / "NOOP-notes.md"


def timed(*cmd: str, env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=DEPLOY_TIMEOUT)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return took


def stamp_now() -> str:
    """A label no earlier run built: the new release is new to every cache and every host."""
    return time.strftime("%Y%m%d%H%M%S")


def load_config(data: dict) -> HostConfig:
    """The settings inventory data gives a host (for its release key and directory)."""
    cfg, problems = parse_config("noop", [data])
    if cfg is None:
        raise RuntimeError("; ".join(problems))
    return cfg


def median(f, rounds: int) -> tuple[float, list[float]]:
    runs = [f() for _ in range(rounds)]
    return statistics.median(runs), runs


def main(rounds: int = 3) -> int:
    hosts = [SandboxHost(f"nop{i}", 80 + i, binds=dict(SHARED_BINDS)) for i in range(1, 4)]
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-noop-"))
    results: dict[str, object] = {**machine(), "rounds": rounds}
    try:
        for h in hosts:
            h.boot()
        one = write_inventory(tmp / "one.py", hosts[:1], default_data())
        three = write_inventory(tmp / "three.py", hosts, default_data())
        # --parallel 1: one host at a time, as this benchmark's first deploys always ran
        results["first_deploy_3_hosts_s"] = timed(str(BIN / "pyinfra"), "-y", "--parallel", "1", str(three), "deploy.py")
        for name, inv in (("1", one), ("3", three)):
            results[f"noop_deploy_{name}_host_s"] = median(
                lambda inv=inv: timed(str(BIN / "pyinfra"), "-y", str(inv), "deploy.py"), rounds)
            results[f"noop_rollout_{name}_host_s"] = median(
                lambda inv=inv: timed(str(BIN / "llamadeploy"), "rollout", str(inv), "--batch", "100%"), rounds)
        # a new release (other flags) to 3 hosts: empty controller cache vs the artifact cached. The
        # same release both times, from the same controller cache: the first rollout fills it;
        # then the hosts go back to the release before and lose the new one, so the second rollout
        # finds it cached on the controller and on no host
        data = default_data()
        data["llama_build"] = {**data["llama_build"], "cmake_args": {"GGML_OPENMP": "ON", "NOOP_BENCH": stamp_now()}}
        inv = write_inventory(tmp / "new-release.py", hosts, data)
        cfg = load_config(data)
        key = cfg.build.release_key()
        env = {"LLAMADEPLOY_CACHE": str(tmp / "cache")}
        results["new_release_rollout_3_hosts_empty_cache_s"] = timed(
            str(BIN / "llamadeploy"), "rollout", str(inv), "--batch", "100%", env=env)
        if not [p for p in (tmp / "cache" / "releases").rglob("*.sha256") if key in str(p)]:
            raise RuntimeError(f"release {key} is not in the controller cache after the first rollout")
        timed(str(BIN / "llamadeploy"), "rollback", str(three), env=env)
        for h in hosts:
            h.ssh(f"rm -rf {shlex.quote(cfg.release_dir)}")
        results["new_release_rollout_3_hosts_cached_s"] = timed(
            str(BIN / "llamadeploy"), "rollout", str(inv), "--batch", "100%", env=env)
        results["sizes"] = model_sizes(hosts[0], tmp, rounds)
    finally:
        for h in hosts:
            h.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    publish(OUT / "NOOP.md", "noop", results, results, with_notes)
    return 0


def with_notes(results: dict, raw_name: str) -> str:
    """NOOP.md: the page, then ``NOOP-notes.md`` (hand-written, no figure of its own) where there is one."""
    text = page(results, raw_name)
    return text + NOTES.read_text() if NOTES.exists() else text


def page(results: dict, raw_name: str) -> str:
    """NOOP.md from one run's raw JSON alone (``main`` and ``--render`` alike), so the page can be
    written again, and checked, without a host."""
    stamp = str(results["date"])[:10]

    def cell(key: str, row: dict | None = None) -> str:
        v = (row or results)[key]
        return f"{v[0]:.1f} s ({', '.join(f'{x:.1f}' for x in v[1])})" if isinstance(v, tuple | list) else f"{v:.1f} s"

    sizes = "\n".join(
        f"| {r['label']} | {r['bytes'] / 1e6:.0f} MB | {cell('noop_deploy_s', r)} | {cell('noop_rollout_s', r)} | "
        f"{cell('full_verify_deploy_s', r)} | {r['full_verify_deploy_s'][0] / r['noop_deploy_s'][0]:.1f}x |"
        for r in results["sizes"])

    return f"""# No-op runs, rollouts and the artifact cache ({stamp})

Written whole by `benchmarks/noop.py` {describe(results)}. Raw: `{raw_name}`.

Gemma 3 270M Q4_K_M (253 MB), llama.cpp b11434, sandbox hosts on this machine;
median of {results['rounds']} runs (each run in brackets). Same input every time: nothing changes.

| what | 1 host | 3 hosts |
|---|---|---|
| no-op `pyinfra -y INV deploy.py` | {cell('noop_deploy_1_host_s')} | {cell('noop_deploy_3_host_s')} |
| no-op `llamadeploy rollout` (one batch) | {cell('noop_rollout_1_host_s')} | {cell('noop_rollout_3_host_s')} |

| a new release to 3 hosts (`rollout --batch 100%`) | time |
|---|---|
| empty controller cache: one host compiles (with the ccache that host kept), two receive the tarball | {cell('new_release_rollout_3_hosts_empty_cache_s')} |
| the same release again, cached on the controller and on no host (they were rolled back and it was removed): nobody compiles | {cell('new_release_rollout_3_hosts_cached_s')} |

First deploy of the 3 hosts in this run: {cell('first_deploy_3_hosts_s')} (sandbox hosts keep their trees between
benchmark runs, so this counts only what an earlier run did not leave).

How a no-op grows with the model (1 host; the same model widened, `benchmarks/widened.py`). Baseline:
the same no-op with `--data llama_verify=full`, which re-hashes every model byte on the host as
every run did before sizes, inodes and mtimes were recorded; the ratio is baseline / no-op.

| model | size | no-op deploy | no-op rollout | no-op, full re-verify (baseline) | baseline / no-op |
|---|---|---|---|---|---|
{sizes}
"""


def model_sizes(h: SandboxHost, tmp: Path, rounds: int) -> list[dict]:
    """Per model size, on one host: deploy it, then no-op deploys and rollouts, and full re-verifies."""
    src = assets.gemma_model()
    models = [("Q4_K_M (as shipped)", src)] + [
        (f"{kind} (widened)", widened(src, kind, src.with_name(src.name.replace("q4_k_m", kind.lower()))))
        for kind in ("F16", "F32")]
    rows = []
    for label, path in models:
        data = default_data()
        data["llama_model"] = {**data["llama_model"], "path": str(path), "sha256": file_sha256(str(path))}
        inv = write_inventory(tmp / f"size-{path.stem}.py", [h], data)
        deploy = (str(BIN / "pyinfra"), "-y", str(inv), "deploy.py")
        row: dict[str, object] = {"label": label, "bytes": path.stat().st_size, "first_deploy_s": timed(*deploy)}
        row["noop_deploy_s"] = median(lambda d=deploy: timed(*d), rounds)
        row["noop_rollout_s"] = median(
            lambda inv=inv: timed(str(BIN / "llamadeploy"), "rollout", str(inv), "--batch", "100%"), rounds)
        row["full_verify_deploy_s"] = median(lambda d=deploy: timed(*d, "--data", "llama_verify=full"), rounds)
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "NOOP.md", with_notes, lambda: main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
