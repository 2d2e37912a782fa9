"""The units the deploy writes, rendered on the controller by the product's own functions for
configurations a test fleet does not run: what the e2e tests verify with each release's systemd
(tests/e2e/native_checks) and benchmarks/platforms.py scores, the same renders for both."""

from __future__ import annotations

from llamadeploy.gpu import device_node_commands
from llamadeploy.hostdata import parse_config
from llamadeploy.render import render, template_text
from llamadeploy.roles import service
from llamadeploy.roles.firewall import guard_unit, keeper_texts
from llamadeploy.roles.gpu import FitPin, GpuHost
from llamadeploy.roles.model.source import ModelArtifact, ModelFile
from llamadeploy.sandbox.inventory import merged_data


def rendered_units(name: str, gpus: GpuHost) -> dict[str, dict[str, str]]:
    """The units the deploy writes for what this fleet does not run (a CUDA server with its pinned
    fit and device nodes, --numa, a fenced server with its guard, the GPU metrics timer; and the
    plain CPU unit, whose exposure benchmarks/platforms.py scores beside theirs), each set
    rendered by the product's own functions into a directory of its own: the unit names repeat.
    ``gpus``: the CUDA unit's host (tests/e2e/native_checks passes a recorded H200). What the tests
    verify on hosts and benchmarks/platforms.py scores are the same renders."""

    def config(**sections):
        cfg, problems = parse_config(name, [merged_data(**sections)])
        if cfg is None or problems:
            raise ValueError(f"the renders' own settings are invalid: {problems}")
        return cfg

    art = ModelArtifact((ModelFile("m.gguf", "", 1, "a" * 64),), "m")
    binary = "/opt/llama.cpp/current/bin/llama-server"
    args = ["--port", "8080", "--threads", "2"]
    cuda = config(llama_build={"backend": "cuda"})
    pin = FitPin("d" * 16, f"{cuda.service.config_dir}/gpu-fit/{'d' * 16}.env", [])
    fenced = config(llama_server={"allow_from": ["10.0.0.0/8"]})
    guard, _ = keeper_texts("llama-server", "llama_server", f"{fenced.service.config_dir}/firewall.nft")
    return {
        "cpu": {"llama-server.service": service.unit_file(config(), art, binary, args)},
        "gpu": {"llama-server.service": service.unit_file(cuda, art, binary, args, gpus, pin),
                "llama-nvidia-devices.service": render("service/llama-nvidia-devices.service.j2",
                                                       unit_name="llama-server",
                                                       device_commands=device_node_commands([0]))},
        "numa": {"llama-server.service": service.unit_file(config(), art, binary, [*args, "--numa", "distribute"])},
        "fenced": {"llama-server.service": service.unit_file(fenced, art, binary, args),
                   guard_unit("llama-server"): guard},
        "gpu-metrics": {unit: template_text(f"node_exporter/{unit}")
                        for unit in ("llamadeploy-gpu-metrics.service", "llamadeploy-gpu-metrics.timer")},
    }
