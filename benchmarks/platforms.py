"""The component versions and unit exposure scores that docs/platforms.md compares, read off one
fresh Debian 12 and one fresh Debian 13 sandbox host in one run. Not a test.

Boots a bookworm and a trixie host from the sandbox's cached trees, turns on contrib and
non-free for their own codename (where Debian's NVIDIA packages are), and records for each:

* the version apt would install of each package a deploy installs or relies on
  (``apt-cache policy``'s candidate, from the same mirror CI uses);
* the offline exposure score (``systemd-analyze security --offline=yes``) of the server units the
  product renders: the CPU unit, the CUDA unit with its pinned fit, ``--numa`` and a fenced one,
  scored by that release's systemd. The tests check on live hosts that a running unit scores no
  worse than its file offline (test_trixie_build).

Writes ``benchmarks/PLATFORMS.md`` and its raw JSON; ``--render RAW.json`` writes the page again.

    sudo .venv/bin/python -m benchmarks.platforms
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from benchmarks.machine import describe, machine, publish, render_or_run
from llamadeploy.gpu import Gpu
from llamadeploy.roles.gpu import GpuHost
from llamadeploy.sandbox import SandboxHost
from llamadeploy.sandbox.renders import rendered_units

OUT = Path(__file__).resolve().parent
MD = OUT / "PLATFORMS.md"
#: the hosts: name, sandbox index, distribution
HOSTS = (("plb", 175, "bookworm"), ("plt", 176, "trixie"))
#: component (as docs/platforms.md names it) -> the Debian packages that make it, per release
#: (trixie moved the docker command into docker-cli)
PACKAGES: dict[str, tuple[str, ...]] = {
    "GCC (native build)": ("gcc",),
    "systemd": ("systemd",),
    "HAProxy (front)": ("haproxy",),
    "Prometheus (monitor)": ("prometheus",),
    "Prometheus Alertmanager": ("prometheus-alertmanager",),
    "node exporter": ("prometheus-node-exporter",),
    "Docker engine (engine = distro)": ("docker.io", "docker-cli"),
    "Compose (engine = distro)": ("docker-compose",),
    "nftables": ("nftables",),
    "aria2 (fan-out)": ("aria2",),
    "busybox (fan-out)": ("busybox",),
    "Python (controller)": ("python3",),
    "NVIDIA driver (install = distro)": ("nvidia-driver",),
    "CUDA toolkit (install = distro)": ("nvidia-cuda-toolkit",),
    "NVIDIA container toolkit": ("nvidia-container-toolkit",),
}
#: the rendered server units scored offline (tests/e2e/native_checks.rendered_units, plus the CPU one)
VARIANTS = ("cpu", "gpu", "numa", "fenced")


def candidates(host: SandboxHost, packages: list[str]) -> dict[str, str | None]:
    """Each package's candidate version on ``host`` (None: apt knows no such package there)."""
    out = host.ssh("apt-cache policy " + " ".join(shlex.quote(p) for p in packages)).stdout
    found: dict[str, str | None] = dict.fromkeys(packages)
    name = None
    for line in out.splitlines():
        if not line.startswith(" "):
            name = line.rstrip(":")
        elif name in found and line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            found[name] = None if value == "(none)" else value
    return found


def unit_renders() -> dict[str, str]:
    """The server unit of each variant, rendered by the product's own functions (the same renders
    the e2e tests verify); the CUDA unit for the H200 that benchmarks/gpu_device.py's run recorded."""
    recorded = json.loads((OUT / "gpu-device-h200.json").read_text())
    gpus = GpuHost(tuple(Gpu(**g) for g in recorded["gpus"]), "13.0", "90")
    return {variant: units["llama-server.service"] for variant, units in rendered_units("plb", gpus).items()
            if "llama-server.service" in units}


def exposure(host: SandboxHost, renders: dict[str, str]) -> dict[str, float]:
    """Offline exposure of each render, scored by ``host``'s systemd."""
    work = host.root / "root" / "llamadeploy-platforms"
    scores = {}
    try:
        for variant, text in renders.items():
            (work / variant).mkdir(parents=True, exist_ok=True)
            (work / variant / "llama-server.service").write_text(text)
            out = host.ssh(f"systemd-analyze security --offline=yes /root/llamadeploy-platforms/{variant}/"
                           "llama-server.service --no-pager").stdout
            scores[variant] = float(out.split("exposure level for llama-server.service:")[1].split()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return scores


def run() -> int:
    results: dict = {**machine(), "releases": {}}
    renders = unit_renders()
    hosts = [SandboxHost(name, index, distro=distro) for name, index, distro in HOSTS]
    wanted = sorted({p for pkgs in PACKAGES.values() for p in pkgs})
    try:
        for h in hosts:
            h.boot()
            # the tree's one line (``deb MIRROR CODENAME main``), with the other components
            h.ssh("sed -n 's/ main$/ contrib non-free non-free-firmware/p' /etc/apt/sources.list "
                  "> /etc/apt/sources.list.d/llamadeploy-platforms.list && apt-get update -qq")
            os_release = dict(line.split("=", 1) for line in h.ssh("cat /etc/os-release").stdout.splitlines()
                              if "=" in line)
            results["releases"][h.distro] = {
                "os": os_release.get("PRETTY_NAME", "").strip('"'),
                "versions": candidates(h, wanted),
                "exposure_offline": exposure(h, renders),
            }
            print(h.distro, results["releases"][h.distro], flush=True)
    finally:
        for h in hosts:
            h.stop()
    publish(MD, "platforms", results, results, page)
    return 0


def page(results: dict, raw_name: str) -> str:
    """The page, from a run's results (pure)."""
    rel = results["releases"]
    names = list(rel)
    head = " | ".join(rel[n]["os"] for n in names)

    def cell(n: str, pkgs: tuple[str, ...]) -> str:
        got = [f"{p} {rel[n]['versions'].get(p)}" for p in pkgs if rel[n]["versions"].get(p)]
        return ", ".join(got) or "not in Debian"

    rows = [f"| {component} | " + " | ".join(cell(n, pkgs) for n in names) + " |"
            for component, pkgs in PACKAGES.items()]
    scores = [f"| {variant} | " + " | ".join(f"{rel[n]['exposure_offline'][variant]:.1f}" for n in names) + " |"
              for variant in VARIANTS]
    return "\n".join([
        "# Platforms: component versions and unit exposure per Debian release",
        "",
        f"Written by `benchmarks/platforms.py` {describe(results)}. Raw: `{raw_name}`.",
        "",
        "Each release is a fresh sandbox host booted from its debootstrap tree, with contrib and non-free",
        "turned on for its own codename. A version is what apt would install there (`apt-cache policy`'s",
        "candidate, from the mirror CI uses); \"not in Debian\": apt knows no such package on that release.",
        "",
        f"| component | {head} |",
        "|---|" + "---|" * len(names),
        *rows,
        "",
        "## Exposure of the server unit, offline",
        "",
        "`systemd-analyze security --offline=yes` of the server unit the product renders (lower is better;",
        "`cpu`: the default unit, `gpu`: a CUDA unit with its pinned fit and device nodes, `numa`: with",
        "`--numa`, `fenced`: with `allow_from`), scored by each release's own systemd. A running unit scores",
        "no worse than its file offline: test_trixie_build checks that on both releases.",
        "",
        f"| unit | {head} |",
        "|---|" + "---|" * len(names),
        *scores,
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(render_or_run(MD, page, run))
