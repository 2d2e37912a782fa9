"""Checks of a native server host that run on both Debian releases: test_native runs them on
bookworm, test_trixie_build on trixie, where systemd (252 and 257) decides what they observe: a
transient sandboxed unit, a unit stopped and disabled, a restart seen by the gate."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.sandbox.inventory import write_inventory
from tests.conftest import PYINFRA, REPO, SUBPROCESS_TIMEOUT, merged_data, run_deploy


def with_data(host, tmp_path: Path, name: str, **sections) -> Path:
    """An inventory of ``host`` alone, with the sandbox's data and ``sections`` merged in."""
    return write_inventory(tmp_path / f"{name}.py", [host], merged_data(**sections))


def fit_sandbox_holds(host) -> None:
    """The fit script a CUDA host runs (gpu.fit_script behind hardening.sandboxed_run, exactly as
    roles/gpu passes it) on this real systemd host, with a stand-in for llama-fit-params, which
    only CUDA builds have: it reports who and what it is, and prints a fitted line. It runs as
    the service's user, reads the model, has no capabilities, no new privileges, a syscall filter,
    sees a read-only system (not even a directory the service user owns, nor the world-writable
    ``/run/lock`` where the deploy lock lives), takes the unit's limits
    (systemd-run accepts them), and its exit status reaches the script through systemd-run;
    root writes the result. (On a GPU
    host the fit itself has not run in this sandbox yet: no GPU machine was at hand.)"""
    from llamadeploy.gpu import device_node_commands, fit_script
    from llamadeploy.hardening import sandboxed_run

    model = f"/var/lib/llama-server/models/{Path(merged_data()['llama_model']['path']).name}"
    stand_in = "/usr/local/lib/llamadeploy-test-fit"
    body = "\n".join([
        "#!/bin/sh",
        f'echo "user=$(id -un) model=$(head -c 4 {model})"',
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr -d '\\t' | tr '\\n' ' '; echo",
        'touch /etc/fit-wrote 2>/dev/null && echo "etc=written" || echo "etc=read-only"',
        'touch /var/lib/llama-server/models/fit-wrote 2>/dev/null && echo "models=written" || echo "models=read-only"',
        # a directory the service user owns: only the sandbox's read-only system closes it
        'touch /var/lib/llamadeploy-fit-probe/x 2>/dev/null && echo "own-dir=written" || echo "own-dir=read-only"',
        # world-writable, a tmpfs ProtectSystem leaves open, and the host's deploy lock's directory
        'touch /run/lock/fit-wrote 2>/dev/null && echo "run-lock=written" || echo "run-lock=read-only"',
        "awk '$5 == \"/\" {print \"root=\" $6}' /proc/self/mountinfo",
        '[ "$1" = fail ] && exit 3',
        'echo "-c 4096 -ngl -1"', ""])
    host.ssh(f"printf '%s' {shlex.quote(body)} > {stand_in} && chmod 755 {stand_in} && "
             "install -d -o llama -g llama -m 755 /var/lib/llamadeploy-fit-probe")
    # outside the sandbox the service user can write there: the probe below means something
    host.ssh("runuser -u llama -- touch /var/lib/llamadeploy-fit-probe/outside")
    env = "/etc/llama-server/gpu-fit/test-sandbox.env"
    run_as = sandboxed_run("llama", [], {"MemoryMax": "1G"})  # a CPU host: no NVIDIA device to allow
    nodes = device_node_commands([0])  # no nvidia-modprobe here: the script goes on without it
    try:
        failed = host.ssh(fit_script([stand_in, "fail", "--fit-target", "1024"], 1024, "no-such.service", env, "t",
                                     run_as, nodes), check=False)
        seen = failed.stderr
        assert failed.returncode == 1 and "llama-fit-params (exit 3)" in seen, seen
        assert "user=llama model=GGUF" in seen, seen
        assert "CapEff:0000000000000000" in seen and "NoNewPrivs:1" in seen and "Seccomp:2" in seen, seen
        assert "etc=read-only" in seen and "models=read-only" in seen and "own-dir=read-only" in seen, seen
        assert "run-lock=read-only" in seen and host.ssh("test -e /run/lock/fit-wrote", check=False).returncode != 0
        assert re.search(r"^root=ro\b", seen, re.M), seen
        assert host.ssh("test -e /var/lib/llamadeploy-fit-probe/x", check=False).returncode != 0
        assert host.ssh(f"test -e {env}", check=False).returncode != 0  # a failed fit writes nothing
        host.ssh(fit_script([stand_in, "ok", "--fit-target", "1024"], 1024, "no-such.service", env, "t", run_as, nodes))
        assert host.ssh(f"tail -n 1 {env}").stdout.strip() == "LLAMA_GPU_FIT='-c 4096 -ngl all --fit off'"
        assert host.ssh("systemctl list-units --all --no-legend 'run-*.service'").stdout.strip() == ""  # collected
    finally:
        host.ssh(f"rm -f {stand_in} {env} /run/lock/fit-wrote; rm -rf /var/lib/llamadeploy-fit-probe; rmdir /etc/llama-server/gpu-fit 2>/dev/null; true")


def crash_at_start_rolled_back(host, tmp_path: Path, inventory: Path) -> None:
    """A plain ``pyinfra INVENTORY deploy.py`` whose new server exits at start (a flag --help
    accepts, a file that is not there): the gate sees the crash at once (not after its timeout),
    the run reinstates the release that served before and fails, naming host, reason and the
    release that serves now. Afterwards: health 200, the old release id, its unit."""
    old = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id
    unit_before = host.ssh("md5sum /etc/systemd/system/llama-server.service").stdout
    inv = with_data(host, tmp_path, "broken", llama_server={"extra_args": ["--lora", "/nonexistent.gguf"]})
    started = time.monotonic()
    result = run_deploy(inv)
    took = time.monotonic() - started
    assert result.rc != 0
    out = result.stdout + result.stderr
    assert "the server restarted (it crashed)" in out or "the server is not running (it exited)" in out, out[-3000:]
    assert "last log lines" in out
    assert f"failed its gate; rolled back to {old}, which serves now (the gate's log lines are above)" in out, \
        out[-3000:]
    assert f"host {host.inventory_entry()[0]}: release " in out
    print(f"failed deploy, rollback included: {took:.1f}s (the gate's timeout: 180s)")
    # serving the old release right after the failed run, with no other deploy
    assert Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id == old
    assert host.ssh("md5sum /etc/systemd/system/llama-server.service").stdout == unit_before
    assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200
    assert "--lora" not in host.ssh("cat /proc/$(systemctl show -p MainPID --value llama-server)/cmdline | tr '\\0' ' '").stdout
    # the re-run of the good inventory changes nothing: the host is where it was
    again = run_deploy(inventory)
    assert again.rc == 0, again.stderr[-4000:]
    assert again.changed == 0


@contextmanager
def site_dropin(host, name: str, text: str) -> Iterator[str]:
    """A site's own drop-in for llama-server (an operator's policy, not the deploy's), in place
    and read by systemd while the block runs, removed again even when the test fails."""
    dropins = "/etc/systemd/system/llama-server.service.d"
    path = f"{dropins}/{name}"
    host.ssh(f"mkdir -p {dropins} && printf %s {shlex.quote(text)} > {path} && systemctl daemon-reload")
    try:
        yield path
    finally:
        host.ssh(f"rm -f {path}; rmdir {dropins} 2>/dev/null; systemctl daemon-reload")


def refused_start_rolled_back(host, tmp_path: Path, inventory: Path, threads7: Path | None = None) -> None:
    """A new release whose start systemd itself refuses: the start job fails, before the gate,
    the way a sandbox that cannot be set up or a server that exits before systemd saw it run
    fails it. Made deterministic here by a site's own drop-in whose ``ExecStartPre`` refuses a
    unit that runs with ``--threads 7``. The run still goes to the gate, which fails at once, and
    the release that served before is reinstated (its unit passes the drop-in's check) and
    serves; the restart's failure names the unit's state. Without that, the run stopped at the
    restart and left the new unit failing its start every 5 s: no server. ``threads7``: the
    inventory with ``llama_server.threads = 7`` (default: ``inventory``'s host with it)."""
    old = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id
    policy = ("[Service]\n"
              "ExecStartPre=/bin/sh -c '! grep -q -- \"--threads 7 \" /etc/systemd/system/llama-server.service'\n")
    with site_dropin(host, "zz-site-policy.conf", policy):
        assert host.ssh("systemctl restart llama-server", check=False).returncode == 0  # the old unit passes it
        inv = threads7 or with_data(host, tmp_path, "threads7", llama_server={"threads": 7})
        result = run_deploy(inv)
        out = result.stdout + result.stderr
        assert result.rc != 0
        assert "llama-server.service did not start; its state and last log lines:" in out, out[-3000:]
        assert f"failed its gate; rolled back to {old}, which serves now (the gate's log lines are above)" in out, \
            out[-3000:]
        assert Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout).release_id == old
        assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200
        assert "--threads 7 " not in host.ssh("cat /etc/systemd/system/llama-server.service").stdout
    again = run_deploy(inventory)
    assert again.rc == 0 and again.changed == 0, again.stderr[-4000:]


def failed_first_deploy_stopped(host, tmp_path: Path) -> None:
    """A first deploy (no release recorded for this service) whose server cannot start: its unit is
    stopped and disabled, so nothing crash-loops, and the run says so. A second service on the same
    host stands in for a fresh one (its own name, user, directories, records and port).

    The failed release's model file is in no release record: the ownership record names it, so
    the next good deploy (another model) prunes it, and uninstall leaves none of the service's
    directories (before, the file was no one's: kept by every prune, left as an operator's)."""
    svc = {"name": "llama-first", "user": "llamafirst", "data_dir": "/srv/llama-first/data",
           "config_dir": "/srv/llama-first/etc", "cache_dir": "/srv/llama-first/cache", "prefix": "/srv/llama-first/opt"}
    gemma = merged_data()["llama_model"]
    (tmp_path / "first-try.gguf").symlink_to(gemma["path"])  # the same weights under another file name
    inv = with_data(host, tmp_path, "first", llama_service=svc,
                    llama_model={**gemma, "path": str(tmp_path / "first-try.gguf")},
                    llama_server={"port": 8090, "extra_args": ["--lora", "/nonexistent.gguf"]})
    try:
        result = run_deploy(inv)
        assert result.rc != 0
        out = result.stdout + result.stderr
        assert "not rolled back: no earlier release is recorded. Its server is stopped and disabled" in out, out[-3000:]
        show = "systemctl show -p ActiveState -p UnitFileState -p NRestarts llama-first"
        first = host.ssh(show).stdout
        assert "ActiveState=inactive" in first or "ActiveState=failed" in first, first
        assert "UnitFileState=disabled" in first, first
        time.sleep(7)  # longer than RestartSec: a crash loop would have restarted it meanwhile
        assert host.ssh(show).stdout == first
        # the service that served before on this host is untouched
        assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200

        models = "ls -a /srv/llama-first/data/models"
        assert "first-try.gguf" in host.ssh(models).stdout.split()
        good = run_deploy(with_data(host, tmp_path, "first-good", llama_service=svc, llama_server={"port": 8090}))
        assert good.rc == 0, good.stderr[-4000:]
        assert httpx.get(f"http://{host.address}:8090/health", timeout=10).status_code == 200
        left = host.ssh(models).stdout.split()
        assert "first-try.gguf" not in left and ".first-try.gguf.sha256" not in left, left  # pruned: ours
        record = host.ssh("cat /var/lib/llamadeploy/llama-first.owned").stdout.splitlines()
        assert "file /srv/llama-first/data/models/first-try.gguf" not in record, record  # left with the file
        assert any(line.startswith("file /srv/llama-first/data/models/") for line in record), record
        again = run_deploy(with_data(host, tmp_path, "first-good", llama_service=svc, llama_server={"port": 8090}))
        assert again.rc == 0 and again.changed == 0, again.stdout[-4000:]  # the record is not rewritten again
        gone = subprocess.run([PYINFRA, "-y", str(tmp_path / "first-good.py"), "llamadeploy.deploy.llama_server_removed"],
                              cwd=REPO, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert gone.returncode == 0, (gone.stdout + gone.stderr)[-4000:]
        # nothing of the service stays, not even the parent its directories were created in
        assert host.ssh("ls -A /srv/llama-first", check=False).returncode != 0
        assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200
    finally:
        host.ssh("systemctl disable --now llama-first 2>/dev/null; rm -rf /etc/systemd/system/llama-first.service "
                 "/srv/llama-first /var/lib/llamadeploy/llama-first.owned; systemctl daemon-reload; "
                 "userdel llamafirst 2>/dev/null; "
                 "groupdel llamafirst 2>/dev/null; true")


def rendered_units(name: str) -> dict[str, dict[str, str]]:
    """:func:`llamadeploy.sandbox.renders.rendered_units`, for the H200 nvidia-smi recorded."""
    from llamadeploy.gpu import parse_gpus
    from llamadeploy.roles.gpu import GpuHost
    from llamadeploy.sandbox.renders import rendered_units as renders
    from tests.unit.test_gpu import DATA

    return renders(name, GpuHost(tuple(parse_gpus((DATA / "h200-recorded.csv").read_text().splitlines())), "13.0",
                                 "90"))


def rendered_units_verify(host) -> dict[str, float]:
    """``systemd-analyze verify`` on ``host`` of :func:`rendered_units`, each set in a directory of
    its own; returns the offline exposure of each set's server unit. ``host`` needs the release
    and nft (verify checks that every command is executable): a host that received the release
    and runs a fence."""
    # the script the GPU metrics service runs, where roles/node_exporter puts it; written into the
    # host's tree from here, not into /tmp, which is a tmpfs on trixie. Both go afterwards: a
    # deploy on a host without GPU metrics removes that script, which would count as a change
    script = host.root / "usr/local/sbin/llamadeploy-gpu-metrics"
    work = host.root / "root" / "llamadeploy-units"
    # the host must not have a script of its own there: this one removes what it wrote
    assert not script.exists(), f"{host.name} has GPU metrics deployed; verify the renders on a host without"
    scores = {}
    try:
        script.write_text((REPO / "templates/node_exporter/llamadeploy-gpu-metrics.sh").read_text())
        script.chmod(0o755)
        for variant, units in rendered_units(host.name).items():
            (work / variant).mkdir(parents=True, exist_ok=True)
            for name, text in units.items():
                (work / variant / name).write_text(text)
            d = f"/root/llamadeploy-units/{variant}"
            verify = host.ssh(f"cd {d} && systemd-analyze verify {' '.join(units)} 2>&1", check=False)
            assert verify.returncode == 0 and not verify.stdout.strip(), (host.name, variant, verify.stdout)
            if "llama-server.service" in units:
                out = host.ssh(f"systemd-analyze security --offline=yes {d}/llama-server.service --no-pager").stdout
                scores[variant] = float(out.split("exposure level for llama-server.service:")[1].split()[0])
    finally:
        script.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return scores


def deployed_units_verify(host, units: list[str], packaged: tuple[str, ...] = ()) -> None:
    """The deploy's ``units`` on ``host`` pass ``systemd-analyze verify``, and so do the
    distribution's ``packaged`` units with the drop-ins the deploy adds to them (a fence's
    binding); PID 1, which logs "FILE:LINE: Unknown key name ..., ignoring." (or "Unknown
    section") for what it does not know, logged nothing of them or of the nftables drop-ins a
    fence adds."""
    paths = [f"/etc/systemd/system/{u}" for u in units] + [f"/lib/systemd/system/{u}" for u in packaged]
    # --man=no: Debian's units name man pages (Documentation=man:haproxy(1)) that a host without
    # man-db cannot open; ours name URLs, which verify does not open
    verify = host.ssh(f"systemd-analyze verify --man=no {' '.join(paths)} 2>&1", check=False)
    assert verify.returncode == 0 and not verify.stdout.strip(), (host.name, verify.stdout)
    for unit in packaged:  # its drop-ins as PID 1 loaded them: the fence's binding among them
        dropins = host.ssh(f"systemctl show -p DropInPaths --value {unit}").stdout
        assert f"/etc/systemd/system/{unit}.d/llamadeploy-fence.conf" in dropins, (host.name, unit, dropins)
    journal = host.ssh("journalctl -b _PID=1 --no-pager -o cat | grep -E "
                       "'(llama-server|ggml-rpc-server|-fence|[.]service[.]d)[^ ]*:[0-9]+:' || true").stdout
    assert not journal.strip(), (host.name, journal)
