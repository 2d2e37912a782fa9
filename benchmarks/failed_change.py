"""What a failed change costs the clients: time without service when a new release crashes at start.

Not a test. Boots one throwaway sandbox host, deploys the test model, then, ``ROUNDS`` times each,
changes the server's flags while a client polls ``/health`` every 0.1 s from the controller:

* a good change (``--no-webui``: the server restarts and serves): the baseline, a plain restart;
* a change whose server exits at start (``--lora`` naming a file that is not there, a flag the
  binary's ``--help`` accepts): the deploy's gate sees the crash, reinstates the release that
  served before and fails, in a plain ``pyinfra`` run and in ``llamadeploy rollout``.

For each: the longest window in which ``/health`` did not answer 200 (what a client saw), and
the run's wall time. The report gives the failed change's window as a ratio of the good one's.
Before the gate watched the unit, the same failure left the host without a server in a plain
deploy, and a rollout waited the gate's whole timeout (180 s) before rolling back.

Writes ``benchmarks/FAILED-CHANGE.md`` and a JSON file beside it, whole, from this run.

    sudo .venv/bin/python -m benchmarks.failed_change [ROUNDS]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.machine import describe, machine, raw_path
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
GOOD = ["--no-webui"]
CRASH = ["--lora", "/nonexistent.gguf"]


class Poller:
    """``GET /health`` every 0.1 s on a fresh connection; the longest run of non-200 answers."""

    def __init__(self, url: str):
        self.url, self.stop, self.outages = url, threading.Event(), [0.0]
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        down_since = None
        while not self.stop.is_set():
            try:
                ok = httpx.get(self.url, timeout=1).status_code == 200
            except httpx.HTTPError:
                ok = False
            now = time.monotonic()
            if not ok and down_since is None:
                down_since = now
            elif ok and down_since is not None:
                self.outages.append(now - down_since)
                down_since = None
            time.sleep(0.1)
        if down_since is not None:
            self.outages.append(time.monotonic() - down_since)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1)  # the last transition back to 200
        self.stop.set()
        self.thread.join()


def measured(cmd: list[str], url: str, want_rc: int) -> dict[str, float]:
    with Poller(url) as poll:
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        wall = time.monotonic() - t0
    if (proc.returncode == 0) != (want_rc == 0):
        raise RuntimeError(f"{' '.join(cmd)}: rc {proc.returncode}, wanted {want_rc}:\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "unavailable_s": round(max(poll.outages), 2)}


def main(rounds: int = 3) -> int:
    host = SandboxHost("fch1", 90, binds=dict(SHARED_BINDS))
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-failed-change-"))
    url = f"http://{host.address}:8080/health"
    runs: dict[str, list[dict[str, float]]] = {"good_deploy": [], "crash_deploy": [], "crash_rollout": []}
    try:
        host.boot()
        base = default_data()

        def inventory(name: str, extra: list[str]) -> Path:
            data = {**base, "llama_server": {**base["llama_server"], "extra_args": extra}}
            return write_inventory(tmp / f"{name}.py", [host], data)

        plain, good, crash = inventory("plain", []), inventory("good", GOOD), inventory("crash", CRASH)
        pyinfra = [str(BIN / "pyinfra"), "-y"]
        subprocess.run([*pyinfra, str(plain), "deploy.py"], cwd=REPO, check=True, capture_output=True, timeout=3600)
        for _ in range(rounds):
            runs["good_deploy"].append(measured([*pyinfra, str(good), "deploy.py"], url, 0))
            subprocess.run([*pyinfra, str(plain), "deploy.py"], cwd=REPO, check=True, capture_output=True, timeout=900)
            runs["crash_deploy"].append(measured([*pyinfra, str(crash), "deploy.py"], url, 1))
            runs["crash_rollout"].append(measured([str(BIN / "llamadeploy"), "rollout", str(crash)], url, 1))
    finally:
        host.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "unavailable_s")} for k, v in runs.items()}
    result = {**machine(), "rounds": rounds, "runs": runs, "median": med}
    raw = raw_path(OUT, "failed-change", result)
    raw.write_text(json.dumps(result, indent=1) + "\n")
    base_window = med["good_deploy"]["unavailable_s"] or 0.1
    rows = "\n".join(
        f"| {label} | {med[k]['unavailable_s']:.1f} s | {med[k]['unavailable_s'] / base_window:.1f}x | {med[k]['wall_s']:.1f} s |"
        for k, label in (("good_deploy", "good change, plain deploy (baseline)"),
                         ("crash_deploy", "server exits at start, plain deploy (rolled back)"),
                         ("crash_rollout", "server exits at start, rollout (rolled back)")))
    (OUT / "FAILED-CHANGE.md").write_text(f"""# What a failed change costs

Written whole by `benchmarks/failed_change.py` ({rounds} rounds each, medians)
{describe(result)}, one sandbox host.
Raw runs: `{raw.name}`.

Unavailable: the longest window in which `/health`, polled every 0.1 s from the controller, did
not answer 200. The failed change's server exits at start (`--lora /nonexistent.gguf`); the
deploy's gate sees it exit or restart, reinstates the release that served before, and fails.

| change | unavailable | vs good change | run's wall time |
|---|---|---|---|
{rows}
""")
    print((OUT / "FAILED-CHANGE.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
