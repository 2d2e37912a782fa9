"""The systemd unit renders the flags, limits and hardening we promise."""

from __future__ import annotations

import pytest

from llamadeploy.hardening import hardening
from llamadeploy.render import render as render_template
from tests.conftest import LOCAL_TIMEOUT


def render(**over) -> str:
    vars = dict(
        unit_name="llama-server", service_user="llama", data_dir="/var/lib/llama-server", alias="g",
        release_key="b1-abc", model_file="m.gguf", model_sha256="a" * 64,
        exec_start="/opt/llama.cpp/current/bin/llama-server --port 8080",
        limits={"CPUQuota": "400%", "MemoryMax": "8G"}, gpu=False, port=8080,
        read_only_paths=["/opt/llama.cpp", "/var/lib/llama-server"], numa=False, firewall=None, device_allow=[],
        environment_file=None, fence_guard=None,
    )
    vars.update(over)
    # the unit's hardening block, as roles/service computes it from the same three facts
    vars["hardening"] = hardening(vars.pop("device_allow") if vars.pop("gpu") else None, numa=vars.pop("numa"))
    vars["device_allow"] = over.get("device_allow", [])
    return render_template("service/llama-server.service.j2", **vars)


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_unit_directives():
    d = directives(render())
    assert d["User"] == ["llama"] and d["Restart"] == ["on-failure"]
    assert d["CPUQuota"] == ["400%"] and d["MemoryMax"] == ["8G"]
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert key in d, key
    assert d["ProtectSystem"] == ["strict"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["StandardOutput"] == ["journal"]


def test_low_port_gets_only_bind_capability_and_gpu_keeps_devices():
    d = directives(render(port=80, gpu=True))
    assert d["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert "PrivateDevices" not in d


def test_gpu_unit_allows_exactly_the_nvidia_devices_and_keeps_the_rest_of_the_hardening():
    from llamadeploy.gpu import device_allow, parse_gpus
    from tests.unit.test_gpu import DATA

    gpus = parse_gpus((DATA / "multi-a10.csv").read_text().splitlines())
    d = directives(render(gpu=True, device_allow=device_allow(gpus)))
    assert d["DevicePolicy"] == ["closed"] and "PrivateDevices" not in d
    assert d["DeviceAllow"] == ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw",
                                "/dev/nvidia-modeset rw", "/dev/nvidia0 rw", "/dev/nvidia1 rw", "/dev/nvidia2 rw"]
    cpu = directives(render())
    for key in set(cpu) - {"PrivateDevices"}:  # everything else of the CPU unit's hardening stays
        assert key in d, key


def test_filtered_calls_fail_with_eperm_and_numa_gets_its_calls_back():
    """SIGSYS would kill the server for one pinned thread; --numa needs affinity and mempolicy calls."""
    plain = directives(render())
    assert plain["SystemCallErrorNumber"] == ["EPERM"]
    assert plain["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    numa = directives(render(numa=True))
    assert "sched_setaffinity" in numa["SystemCallFilter"][-1] and "set_mempolicy" in numa["SystemCallFilter"][-1]
    assert "mbind" in numa["SystemCallFilter"][-1]


@pytest.mark.parametrize("numa", [False, True])
def test_exposure_at_most_2(tmp_path, numa):
    """systemd's own score of the rendered unit (offline): at most 2.0, with and without --numa."""
    import shutil
    import subprocess

    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "llama-server.service"
    unit.write_text(render(numa=numa))
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                         capture_output=True, text=True, timeout=LOCAL_TIMEOUT).stdout
    score = float(out.split("exposure level for llama-server.service:")[1].split()[0])
    assert score <= 2.0, out[-3000:]


def test_firewall_rules_load_before_every_start():
    """With allow_from the unit loads its nftables table first, as root ("+"), past the hardening."""
    assert "ExecStartPre" not in directives(render())
    d = directives(render(firewall="/etc/llama-server/firewall.nft", fence_guard="llama-server-fence.service"))
    assert d["ExecStartPre"] == ["+/usr/sbin/nft -f /etc/llama-server/firewall.nft"]
    # bound to the guard that keeps the table loaded: the server stops when the guard does
    assert d["BindsTo"] == ["llama-server-fence.service"] and "llama-server-fence.service" in d["After"]
    assert "BindsTo" not in directives(render())


def _exposure(text: str, tmp_path) -> tuple[float, set[str]]:
    """``systemd-analyze security --offline=yes`` of a rendered unit: the score and the failed checks."""
    import re
    import shutil
    import subprocess

    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze on the controller")
    path = tmp_path / "llama-server.service"
    path.write_text(text)
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(path)],
                         capture_output=True, text=True, check=True, timeout=LOCAL_TIMEOUT).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    failed = {line.split()[1].rstrip("=") for line in out.splitlines() if line.startswith("✗")}
    return score, failed


def test_gpu_unit_exposure_differs_from_the_cpu_unit_only_by_its_devices(tmp_path):
    """Recorded exposure (the controller's systemd 252, offline): CPU unit 1.4, GPU unit 1.6
    ("OK"); the GPU unit fails only the device checks on top of the CPU unit's. Offline bounds
    live: 252's offline mode also fails PrivateMounts=, which a running unit has, so the deployed
    CPU unit scores 1.3 on a host (test_trixie_build compares both on 252 and 257)."""
    from llamadeploy.gpu import device_allow, parse_gpus
    from tests.unit.test_gpu import DATA

    gpus = parse_gpus((DATA / "h200-recorded.csv").read_text().splitlines())
    cpu, cpu_failed = _exposure(render(), tmp_path)
    gpu, gpu_failed = _exposure(render(gpu=True, device_allow=device_allow(gpus)), tmp_path)
    assert cpu <= 1.5 and gpu <= 2.0, (cpu, gpu)
    assert gpu_failed - cpu_failed == {"PrivateDevices"}, gpu_failed - cpu_failed


def test_the_roles_unit_carries_the_one_hardening_list_the_fit_runs_under():
    """roles/service's own unit (not this module's render helper): its sandbox is
    hardening.hardening's, line for line, and the fit's systemd-run gets the same directives but
    RemoveIPC (which would take the running server's IPC objects when the fit ends)."""
    from llamadeploy.config import HostConfig
    from llamadeploy.hardening import sandboxed_run
    from llamadeploy.roles import service
    from llamadeploy.roles.model.source import ModelArtifact, ModelFile

    cfg = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"host": "127.0.0.1"}})
    text = service.unit_file(cfg, ModelArtifact((ModelFile("m.gguf", "", 1, "a" * 64),), "m"),
                             "/opt/llama.cpp/current/bin/llama-server", ["--port", "8080"])
    block = hardening(None)
    lines = text.splitlines()
    start = lines.index(block[0])
    assert lines[start:start + len(block)] == block
    words = sandboxed_run("llama", ["DeviceAllow=/dev/nvidia0 rw"])
    props = [words[i + 1] for i, w in enumerate(words) if w == "-p"]
    assert "RemoveIPC=yes" in block and "RemoveIPC=yes" not in props
    assert [p for p in props if p.startswith("DeviceAllow")] == ["DeviceAllow=/dev/nvidia0 rw"]
    assert set(props) >= {line for line in hardening(["DeviceAllow=/dev/nvidia0 rw"])
                          if not line.startswith("#") and line != "RemoveIPC=yes"}
    assert words[:words.index("-p")] == ["systemd-run", "--quiet", "--wait", "--pipe", "--collect",
                                         "--service-type=exec", "--uid=llama", "--gid=llama"]


def test_a_router_unit_names_no_model_so_a_new_first_model_is_no_restart():
    """In router mode the unit is the same whatever its models are (they are the preset's): a
    re-pinned first model changes the preset, which the router re-reads for that model alone,
    not the unit, whose change would restart every model. A single-model unit names its model."""
    from llamadeploy.config import HostConfig
    from llamadeploy.roles import service
    from llamadeploy.roles.model.source import ModelArtifact, ModelFile

    cfg = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"host": "127.0.0.1"}})

    def unit(name: str, sha: str, aliases: list[str] | None) -> str:
        return service.unit_file(cfg, ModelArtifact((ModelFile(name, "", 1, sha),), "m"),
                                 "/opt/llama.cpp/current/bin/llama-server", ["--port", "8080"], aliases=aliases)

    assert unit("a.gguf", "a" * 64, ["chat", "embed"]) == unit("b.gguf", "b" * 64, ["chat", "embed"])
    assert "Models: in the preset (router mode)" in unit("a.gguf", "a" * 64, ["chat", "embed"]).splitlines()[1]
    assert "Model: a.gguf (sha256 aaaaaaaaaaaaaaaa…)" in unit("a.gguf", "a" * 64, None).splitlines()[1]
    assert unit("a.gguf", "a" * 64, None) != unit("b.gguf", "b" * 64, None)
