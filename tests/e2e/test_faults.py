"""Faults on real hosts: a disk that fills during a model transfer, a build that fails, one host of
three unreachable mid-deploy, a host rebooted mid-deploy.

Three hosts for the module, deployed once (the baseline); each test injects one fault while a real
``pyinfra`` run is in flight, asserts that the fault really happened (a test that could pass
without it would prove nothing), and checks over a second channel (ssh, HTTP) that what served
before still serves, or that the new state is complete. Every fault is undone in ``finally``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import httpx
import pytest

from llamadeploy import bench
from llamadeploy.config import BuildConfig
from llamadeploy.manifest import DEFAULT_PATH, Manifest
from llamadeploy.roles.model.source import margin
from llamadeploy.sandbox.assets import MODEL_SHA256, MODEL_SIZE, copy_gguf, gemma_model
from llamadeploy.sandbox.host import CACHE, SandboxHost
from llamadeploy.sandbox.inventory import default_data, write_inventory
from tests.conftest import LOCAL_TIMEOUT, PYINFRA, REPO, cli, host_state, merged_data, run_deploy

pytestmark = pytest.mark.e2e

MODELS = "/var/lib/llama-server/models"
CURRENT = "/opt/llama.cpp/current"
UNIT = "/etc/systemd/system/llama-server.service"
MIB = 1 << 20
#: the model copies this module deploys (see variant_model)
VARIANTS = ("disk-full", "fleet", "reboot")


# -- helpers ---------------------------------------------------------------------------------------
@cache
def variant_model(tag: str) -> tuple[Path, str]:
    """The test GGUF rewritten with another ``general.name``: same weights, other bytes and sha256.

    A different model file as far as the deploy can tell (a transfer, a restart), and one llama.cpp
    loads. Cached next to the sandbox's model.
    """
    import gguf

    from llamadeploy.artifacts import file_sha256

    out = CACHE / "models" / "fault-variants" / f"gemma-3-270m-{tag}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        reader = gguf.GGUFReader(str(gemma_model()), "r")
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        copy_gguf(reader, gguf.GGUFWriter(str(tmp), arch=arch), name_suffix=f" ({tag})")
        tmp.rename(out)
    sha = file_sha256(str(out))
    assert sha != MODEL_SHA256
    return out, sha


def model_data(path: Path, sha256: str, alias: str) -> dict:
    return merged_data(llama_model={"path": str(path), "sha256": sha256, "alias": alias})


def inventory_for(hosts: list[SandboxHost], tmp_path: Path, name: str, data: dict) -> Path:
    return write_inventory(tmp_path / f"{name}.py", hosts, data)


def served_alias(host: SandboxHost) -> str:
    r = httpx.get(f"http://{host.address}:8080/v1/models", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["id"]


def chat(host: SandboxHost) -> str:
    r = httpx.post(f"http://{host.address}:8080/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def wait_healthy(host: SandboxHost, seconds: float = 120) -> None:
    bench.wait_healthy(f"http://{host.address}:8080", seconds)


def wait_for(host: SandboxHost, test: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Poll ``test`` (a shell condition) on the host until true, while the deploy still runs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if host.ssh(test, check=False).returncode == 0:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the deploy ended (rc {proc.returncode}) before `{test}` held: "
                                 f"{proc.communicate(timeout=LOCAL_TIMEOUT)[0][-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"`{test}` never held on {host.name} within {seconds}s")


def start_deploy(inventory: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``pyinfra -y INVENTORY deploy.py`` in the background, human output (what an operator reads)."""
    return subprocess.Popen([PYINFRA, "-y", *extra, str(inventory), "deploy.py"], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, seconds: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=seconds)
    return proc.returncode, out


@contextmanager
def throttled(host: SandboxHost) -> Iterator[None]:
    """Slow the link to one host (80 Mbit/s) so a 240 MiB transfer lasts long enough to hit."""
    subprocess.run(["tc", "qdisc", "add", "dev", host.veth, "root", "tbf", "rate", "80mbit",
                    "burst", "64kb", "latency", "400ms"], check=True, timeout=LOCAL_TIMEOUT)
    try:
        yield
    finally:  # gone already when the host rebooted (its veth is new)
        subprocess.run(["tc", "qdisc", "del", "dev", host.veth, "root"], capture_output=True, timeout=LOCAL_TIMEOUT)


def serving_model(host: SandboxHost) -> dict:
    """``llama_model`` settings for what the host serves now (one of this module's model files)."""
    manifest = Manifest.parse(host.ssh(f"cat {DEFAULT_PATH}").stdout)
    ((_, sha),) = manifest.model_files.items()
    known = {MODEL_SHA256: gemma_model()} | {s: p for p, s in map(variant_model, VARIANTS)}
    return {"path": str(known[sha]), "sha256": sha, "alias": served_alias(host)}


def release_is_complete(host: SandboxHost) -> str:
    """``current`` resolves to a release directory whose binary runs; returns the release path."""
    target = host.ssh(f"readlink {CURRENT}").stdout.strip()
    assert target.startswith("/opt/llama.cpp/releases/b") and not target.endswith(".partial"), target
    version = host.ssh(f"{CURRENT}/bin/llama-server --version 2>&1").stdout
    assert "(build 11434, commit " in version, version
    return target


# -- the baseline ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(testhosts, tmp_path_factory) -> list[SandboxHost]:
    """ft51, ft52, ft53 serving the sandbox's model from one release.

    ``--parallel 1``: one host at a time per operation lets the second and third builds hit the
    ccache the first filled.
    """
    hosts = [testhosts("ft51", 51), testhosts("ft52", 52), testhosts("ft53", 53)]
    inv = inventory_for(hosts, tmp_path_factory.mktemp("faults"), "base", default_data())
    result = run_deploy(inv, "--parallel", "1")
    assert result.rc == 0, result.stderr[-4000:]
    for host in hosts:
        assert served_alias(host) == "gemma-3-270m"
    return hosts


# -- 1. disk full during a model transfer ----------------------------------------------------------
def test_disk_full_during_model_transfer(fleet, tmp_path):
    """The model directory gets a filesystem of its own, with room for preflight's check; once the
    new model's ``.partial`` appears, a job on the host fills it. The deploy fails naming the host
    and the full disk; the old model keeps serving, untouched, and no partial file is left."""
    host = fleet[0]
    old_alias = served_alias(host)
    new, sha = variant_model("disk-full")
    size = new.stat().st_size
    fs_mib = (MODEL_SIZE + size + margin(size)) // MIB + 64  # current model + preflight's need + slack
    before = host_state(host)
    files = host.ssh(f"ls -A {MODELS}").stdout.split()
    pid = host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip()
    partial = f"{MODELS}/{new.name}.partial"
    fill = (f"while [ ! -e {partial} ]; do sleep 0.05; done; "
            f"dd if=/dev/zero of={MODELS}/.filler bs=1M 2>/dev/null; true")
    mounted = False
    try:
        host.ssh(f"mkdir -p /mnt/ftfs && mount -t tmpfs -o size={fs_mib}m,mode=755 ftfs /mnt/ftfs && "
                 f"cp -a {MODELS}/. /mnt/ftfs/ && mount --bind /mnt/ftfs {MODELS}")
        mounted = True
        free = int(host.ssh(f"df -PB1 {MODELS} | awk 'NR==2{{print $4}}'").stdout)
        assert free >= size + margin(size), "preflight must pass: the disk fills only during the transfer"
        host.ssh(f"systemd-run -q --collect --unit=ft-filler sh -c {shlex.quote(fill)}")

        result = run_deploy(inventory_for([host], tmp_path, "diskfull", model_data(new, sha, "gemma-full")))

        assert result.rc != 0
        out = result.stdout + result.stderr
        # the fault happened, during the transfer: the filler ran and left the disk full
        assert int(host.ssh(f"stat -c %s {MODELS}/.filler").stdout) > 0
        assert f"not enough disk on host {host.address}" not in out  # not preflight's refusal
        assert f"[{host.address}] no space left on device on host {host.address}: {MODELS} has " in out, out[-3000:]
        assert f"still to send; upload to {host.address}:{partial} failed" in out
        # nothing of the new model where the service reads, the old one intact
        assert host.ssh(f"ls -A {MODELS}").stdout.split() == sorted([".filler", *files])
        assert host.ssh(f"sha256sum {MODELS}/gemma-3-270m-q4_k_m.gguf").stdout.split()[0] == MODEL_SHA256
        assert host.ssh("systemctl show -p MainPID --value llama-server").stdout.strip() == pid
        assert httpx.get(f"http://{host.address}:8080/health", timeout=10).status_code == 200
        assert served_alias(host) == old_alias
        assert isinstance(chat(host), str)
    finally:
        host.ssh("systemctl stop ft-filler 2>/dev/null; " + (f"rm -f {MODELS}/.filler; umount {MODELS}; " if mounted else "")
                 + "umount /mnt/ftfs 2>/dev/null; rmdir /mnt/ftfs", check=False)
    assert host.ssh(f"findmnt {MODELS}", check=False).returncode == 1
    assert host_state(host) == before


# -- 2. a failing build ----------------------------------------------------------------------------
def test_failing_build_keeps_the_old_release(fleet, tmp_path):
    """``GGML_VULKAN=ON`` passes validation (a CMake option like any other) but this host has no
    Vulkan SDK: CMake fails. The deploy names host and cause; ``current``, the unit and the process
    stay; after ``systemctl restart`` the old release serves. (``GGML_CUDA=ON`` no longer gets
    that far: the GPU preflight refuses a CUDA build on a host without a GPU, test_safety.)"""
    host = fleet[1]
    data = merged_data(llama_build={"cmake_args": {"GGML_VULKAN": "ON"}})
    key = BuildConfig(**data["llama_build"]).release_key()
    keep = f"readlink {CURRENT}; md5sum {UNIT}; ls /opt/llama.cpp/releases; systemctl show -p MainPID llama-server"
    before = host.ssh(keep).stdout
    old_alias = served_alias(host)

    result = run_deploy(inventory_for([host], tmp_path, "vulkan", data))

    assert result.rc != 0
    out = result.stdout + result.stderr
    # the fault happened where it should: CMake ran for the new release key and failed
    assert f"Build llama-server {key}" in out
    assert "Could NOT find Vulkan" in out, out[-3000:]
    assert f"[{host.address}] Error" in out
    assert host.ssh(f"test -e /var/cache/llama.cpp/build/{key}.configure.log").returncode == 0
    assert host.ssh(f"ls -d /opt/llama.cpp/releases/{key}*", check=False).returncode != 0  # no (half) release
    assert host.ssh(keep).stdout == before
    assert isinstance(chat(host), str)
    host.ssh("systemctl restart llama-server")
    wait_healthy(host)
    assert served_alias(host) == old_alias
    assert isinstance(chat(host), str)
    assert host.ssh(f"readlink {CURRENT}").stdout == before.splitlines()[0] + "\n"


# -- 3. one host of three unreachable mid-deploy ---------------------------------------------------
def test_one_of_three_unreachable_mid_deploy(fleet, tmp_path):
    """A new model for three hosts; ft53's SSH connection is cut (every packet to its port 22 now
    gets a reset) while its transfer runs. With ``--fail-percent 50`` (pyinfra 3.10: the run stops
    only when more than 50 % of the hosts that connected have failed, checked after each operation)
    the other two finish and serve the new model; ft53 keeps serving the old one. The operator sees
    the host named with the reason, the per-operation tally (3 hosts, 2 done, 1 error), exit 1, and
    per host in ``llamadeploy status``; with ft53 back, its deploy lock (which the cut run could not
    release) refuses the next run until ``llamadeploy lock release``; then the next run completes it."""
    a, b, c = fleet
    old_alias = served_alias(c)
    new, sha = variant_model("fleet")
    inv = inventory_for(fleet, tmp_path, "fleet", model_data(new, sha, "gemma-fleet"))
    partial = f"{MODELS}/{new.name}.partial"
    cut = ["OUTPUT", "-d", c.address, "-p", "tcp", "--dport", "22", "-j", "REJECT", "--reject-with", "tcp-reset"]
    try:
        with throttled(c):
            proc = start_deploy(inv, "--fail-percent", "50")
            try:
                wait_for(c, f"[ $(stat -c %s {partial} 2>/dev/null || echo 0) -gt {20 * MIB} ]", proc)
                sent = int(c.ssh(f"stat -c %s {partial}").stdout)
                subprocess.run(["iptables", "-I", *cut], check=True, timeout=LOCAL_TIMEOUT)
            finally:
                rc, out = finish(proc)
        assert sent < new.stat().st_size  # cut mid-transfer
        assert rc == 1, out[-4000:]
        assert "An internal exception occurred" not in out
        assert (f"[{c.address}] upload to {c.address}:{partial} failed (") in out, out[-4000:]
        assert f"host {c.address} does not answer any more (unreachable or rebooting)" in out
        table: dict[str, list[str]] = {}
        for line in out.split("--> Results:")[1].splitlines():  # the first of two same-named operations
            if line.strip().startswith("llama-server |"):    # (the deploy's gate, not its fallback's)
                table.setdefault(line.split(" | ")[-1].rsplit(None, 4)[0], line.split()[-4:])
        assert table[f"Model {new.name}"] == ["3", "2", "1", "-"], table
        health = next(k for k in table if k.startswith("Wait for http"))
        assert table[health] == ["3", "2", "1", "-"], table
        for host in (a, b):
            assert served_alias(host) == "gemma-fleet"
            assert isinstance(chat(host), str)
        # what the operator sees per host while ft53 is still cut off
        status = subprocess.run([str(Path(PYINFRA).with_name("llamadeploy")), "status", str(inv), "--json"],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 1
        rows = {row["host"]: row for row in json.loads(status.stdout)}
        for host in (a, b):
            assert rows[host.address]["model"] == "gemma-fleet" and rows[host.address]["health"] == "ok"
            assert rows[host.address]["model_sha256"] == sha[:12] and rows[host.address]["drift"] == []
        assert rows[c.address]["error"].startswith("unreachable over SSH")
    finally:
        subprocess.run(["iptables", "-D", *cut], capture_output=True, timeout=LOCAL_TIMEOUT)

    # ft53 back: it still serves the old model, the cut transfer's bytes were never used
    assert served_alias(c) == old_alias
    assert isinstance(chat(c), str)
    assert c.ssh(f"test -e {MODELS}/{new.name}", check=False).returncode == 1
    # the cut run could not release ft53's deploy lock: the next run is refused there, naming the
    # dead run, until the operator releases it (a lock is never taken over silently)
    refused = run_deploy(inv)
    assert refused.rc != 0, refused.stderr[-3000:]
    assert f"{c.address}: locked by deploy by" in refused.stderr and "dead: its process is gone" in refused.stderr
    released = cli("lock", "release", str(inv))
    assert released.returncode == 0 and f"{c.address}: released" in released.stdout, released.stdout
    again = run_deploy(inv)
    assert again.rc == 0, again.stderr[-4000:]
    ops = {op["name"].split(" | ")[-1]: op for op in again.report["results"]["operations"]}
    assert ops[f"Model {new.name}"]["success"] == [c.address]
    assert sorted(ops[f"Model {new.name}"]["no_change"]) == sorted([a.address, b.address])
    for host in fleet:
        assert served_alias(host) == "gemma-fleet"
        assert host.ssh(f"ls -A {MODELS}").stdout.count(".partial") == 0


# -- 4. a host rebooted mid-deploy -----------------------------------------------------------------
@pytest.mark.parametrize("change", ["model", "release"])
def test_reboot_mid_deploy_serves_old_or_new(fleet, tmp_path, change):
    """``systemctl reboot`` on the host while a deploy changes its model (during the transfer) or its
    release (while CMake runs). Once it is back, without any deploy, it serves the old state
    completely (``current`` on a release whose binary runs, health 200, a chat answer); the next
    deploy completes the change."""
    host = fleet[1]
    old_alias = served_alias(host)
    old_release = release_is_complete(host)
    if change == "model":
        new, sha = variant_model("reboot")
        data = model_data(new, sha, "gemma-reboot")
        marker = f"[ $(stat -c %s {MODELS}/{new.name}.partial 2>/dev/null || echo 0) -gt {20 * MIB} ]"
    else:
        data = merged_data(llama_build={"commit": "b11434-reboot"}, llama_model=serving_model(host))
        key = BuildConfig(**data["llama_build"]).release_key()
        marker = f"test -e /var/cache/llama.cpp/build/{key}.configure.log"
    inv = inventory_for([host], tmp_path, f"reboot-{change}", data)
    host.ssh("touch /run/ft-before-reboot")
    # an empty controller cache: the release is compiled here, not shipped from an earlier run's build
    with throttled(host):
        proc = start_deploy(inv, env={"LLAMADEPLOY_CACHE": str(tmp_path / "empty-cache")})
        try:
            wait_for(host, marker, proc)
            host.reboot()
        finally:
            rc, out = finish(proc)
    # it did reboot mid-deploy: /run is new, the deploy lost the host and failed
    assert host.ssh("test -e /run/ft-before-reboot", check=False).returncode == 1
    assert rc == 1, out[-3000:]
    assert "An internal exception occurred" not in out
    # back up, on its own: the old state, complete
    assert host.ssh("systemctl is-system-running --wait", check=False).stdout.strip() in ("running", "degraded")
    wait_healthy(host)
    assert release_is_complete(host) == old_release
    assert served_alias(host) == old_alias
    assert isinstance(chat(host), str)
    if change == "model":
        assert host.ssh(f"test -e {MODELS}/{new.name}", check=False).returncode == 1
    else:
        assert host.ssh(f"ls -d /opt/llama.cpp/releases/{key}", check=False).returncode != 0

    # the next deploy completes the change
    again = run_deploy(inv)
    assert again.rc == 0, again.stderr[-4000:]
    new_release = release_is_complete(host)
    if change == "model":
        assert served_alias(host) == "gemma-reboot" and new_release == old_release
    else:
        assert new_release == f"/opt/llama.cpp/releases/{key}"
        assert "b11434-reboot" in host.ssh(f"{CURRENT}/bin/llama-server --version 2>&1").stdout
    assert host.ssh(f"ls -A {MODELS}").stdout.count(".partial") == 0
    assert isinstance(chat(host), str)

