"""Direct push vs fan-out: time to put the test model on 2, 4 and 6 hosts. Not a test.

Boots six throwaway sandbox hosts on one LAN bridge (``vz-fanbench``), throttles what this
machine sends into it to ``RATE`` (the controller's uplink: ``tc tbf`` on the bridge device;
traffic between hosts is bridged and not throttled, as in a rack), and for N = 2, 4, 6 runs
``pyinfra -y INVENTORY llamadeploy.deploy.llama_model_staged --limit ...`` with
``llama_transfer.mode`` = ``direct`` and = ``fanout``, the model removed from those hosts
before each run. Reports seconds and the bytes the controller sent (the bridge's transmit
counter), the ratio direct/fanout, and an extrapolation to 200 hosts (assumptions in the
report). Writes ``benchmarks/FANOUT.md`` and a JSON file. Only test-host addresses are used.

    sudo .venv/bin/python -m benchmarks.fanout
    .venv/bin/python -m benchmarks.fanout --render benchmarks/fanout-DATE.json   # the page again, no host
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import COMMAND_TIMEOUT, DEPLOY_TIMEOUT, describe, machine, publish, render_or_run
from llamadeploy.sandbox import SHARED_BINDS, SandboxHost, assets
from llamadeploy.sandbox.inventory import default_data, write_inventory

OUT = Path(__file__).resolve().parent
REPO = OUT.parent
BIN = Path(sys.executable).parent
LAN = "fanbench"
BRIDGE = f"vz-{LAN}"
RATE_MBIT = 200
MODEL = "/var/lib/llama-server/models/gemma-3-270m-q4_k_m.gguf"
MIB = 1 << 20


def tx() -> int:
    return int(Path(f"/sys/class/net/{BRIDGE}/statistics/tx_bytes").read_text())


def staged(inv: Path, hosts: list[SandboxHost], *extra: str) -> tuple[float, int]:
    cmd = [str(BIN / "pyinfra"), "-y", str(inv), "llamadeploy.deploy.llama_model_staged", *extra]
    for h in hosts:
        cmd += ["--limit", h.address]
    t0, b0 = time.monotonic(), tx()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=DEPLOY_TIMEOUT)
    took, sent = time.monotonic() - t0, tx() - b0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return took, sent


def main() -> int:
    hosts = [SandboxHost(f"fb{i}", 140 + i, binds=dict(SHARED_BINDS), lan=LAN) for i in range(1, 7)]
    tmp = Path(tempfile.mkdtemp(prefix="llamactl-fanout-"))
    size = Path(assets.gemma_model()).stat().st_size
    run = machine()
    rows = []
    try:
        for h in hosts:
            h.boot()
        inv = {mode: write_inventory(tmp / f"{mode}.py", hosts, {**default_data(), "llama_transfer": {"mode": mode}})
               for mode in ("direct", "fanout")}
        # the tools once, one host at a time (the sandbox hosts share one apt archive and its lock)
        staged(inv["fanout"], hosts, "--parallel", "1")
        subprocess.run(["tc", "qdisc", "replace", "dev", BRIDGE, "root", "tbf", "rate", f"{RATE_MBIT}mbit",
                        "burst", "256kb", "latency", "100ms"], check=True, timeout=COMMAND_TIMEOUT)
        for n in (2, 4, 6):
            row: dict[str, float | int] = {"hosts": n}
            for mode in ("direct", "fanout"):
                for h in hosts[:n]:
                    h.ssh(f"rm -f {MODEL} {MODEL}.partial* /var/lib/llama-server/models/.*.sha256")
                took, sent = staged(inv[mode], hosts[:n])
                row[f"{mode}_s"], row[f"{mode}_controller_bytes"] = round(took, 1), sent
                print(f"{n} hosts, {mode}: {took:.1f}s, controller sent {sent / MIB:.0f} MiB", flush=True)
            row["ratio"] = round(float(row["direct_s"]) / float(row["fanout_s"]), 2)
            rows.append(row)
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", BRIDGE, "root"], capture_output=True, timeout=COMMAND_TIMEOUT)
        for h in hosts:
            h.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    results = {**run, "rate_mbit": RATE_MBIT, "model_bytes": size, "rows": rows}
    publish(OUT / "FANOUT.md", "fanout", run, results, page)
    return 0


def page(r: dict, raw_name: str) -> str:
    """FANOUT.md from one run's raw JSON alone (``main`` and ``--render`` alike), so the page can be
    written again, and checked, without a host."""
    rows, size, rate = r["rows"], r["model_bytes"], r["rate_mbit"]
    copy_s = size * 8 / (rate * 1e6)
    # fan-out: one push, then a round per doubling; fit seconds per round from the largest run
    last = rows[-1]
    per_round = (last["fanout_s"] - rows[0]["fanout_s"]) / max(1, math.ceil(math.log2(last["hosts"])) - 1)
    lines = [
        f"# Direct push vs fan-out ({r['date'][:10]})",
        "",
        f"Written whole by `benchmarks/fanout.py` {describe(r)}. Raw: `{raw_name}`.",
        "",
        f"`sudo .venv/bin/python -m benchmarks.fanout`: the test model ({size / MIB:.0f} MiB) staged on N sandbox "
        f"hosts (`llamadeploy.deploy.llama_model_staged`) over a controller link throttled to {rate} Mbit/s "
        f"(`tc tbf` on the LAN bridge; host-to-host traffic is bridged, unthrottled, on this machine). "
        "Each run starts with the model removed from those hosts; one run per cell.",
        "",
        "| hosts | direct (s) | controller sent, direct | fan-out (s) | controller sent, fan-out | direct / fan-out |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['hosts']} | {row['direct_s']} | {row['direct_controller_bytes'] / size:.2f}x | "
                     f"{row['fanout_s']} | {row['fanout_controller_bytes'] / size:.2f}x | {row['ratio']}x |")
    direct200 = 200 * copy_s
    rounds200 = math.ceil(math.log2(200))
    gb2 = 2e9 * 8 / 1e9  # seconds for 2 GB over 1 Gbit/s
    # a round moves one file over each receiver's link: with peers no faster than the controller's
    # link it takes at least one copy time, whatever this machine's bridge managed
    round200 = max(per_round, copy_s)
    fan200 = copy_s + rounds200 * round200
    lines += [
        "",
        "Growth: direct grows by one copy time per host "
        f"({copy_s:.1f} s at {rate} Mbit/s); fan-out by one *round* per doubling of the hosts "
        f"(measured: {per_round:.1f} s per extra round here, from the 2- and {last['hosts']}-host runs, "
        "where the peers' links are a bridge in memory, far faster than the throttled controller link).",
        "",
        "Extrapolation to 200 hosts, assumptions stated: the controller's link is the only bottleneck of "
        "the direct push; every host's link is as fast as the controller's (so a round takes at least one "
        f"copy time, {copy_s:.1f} s, not the {per_round:.1f} s measured on the in-memory bridge); "
        f"ceil(log2(200)) = {rounds200} rounds after the one push; no host fails:",
        f"- direct: 200 x {copy_s:.1f} s = {direct200 / 60:.0f} min, the controller sending 200x the file;",
        f"- fan-out: {copy_s:.1f} s + {rounds200} x {round200:.1f} s = {fan200 / 60:.1f} min, the controller "
        "sending it once.",
        f"- For a 2 GB model on a 1 Gbit/s uplink the same arithmetic gives 200 x {gb2:.0f} s = "
        f"{200 * gb2 / 60:.0f} min direct, and {gb2:.0f} s + {rounds200} rounds x {gb2:.0f} s = about "
        f"{(gb2 + rounds200 * gb2) / 60:.1f} min fan-out with 1 Gbit/s host links (not measured: arithmetic "
        "only).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(render_or_run(OUT / "FANOUT.md", page, lambda: main()))
