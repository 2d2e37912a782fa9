"""Host metrics (every host of an inventory with a monitor): Debian's ``prometheus-node-exporter``.

The monitor's Prometheus scrapes it (job ``node``) next to the servers and fronts, so the alert
rules see what a llama-server's own metrics cannot: a disk filling up under the models and the
build cache, memory running out, the server's unit restarting again and again. It listens on the
host's fleet address only, fenced (nftables, as the front's exporter) to the monitors.

GPU hosts (llama_build.backend "cuda"): GPU memory, utilization, temperature and power come from
``nvidia-smi``, every 15 s by a systemd timer, through the node exporter's textfile collector
(Debian's exporter reads ``/var/lib/prometheus/node-exporter/*.prom`` by default), as
``llamadeploy_gpu_*``, with ``llamadeploy_gpu_up`` 0 when nvidia-smi fails: a driver gone after an
update leaves a server silently on the CPU. No exporter for NVIDIA GPUs is in Debian (NVIDIA's
dcgm-exporter ships as a container image, utkuozdemir's nvidia_gpu_exporter as a GitHub binary):
the textfile collector adds no daemon and no port.
"""

from __future__ import annotations

import posixpath
from io import StringIO

from pyinfra import host
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.render import template_text
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall import fence_entries, port_fenced
from llamadeploy.roles.front import exporter_networks_for, host_port, monitor_addresses
from llamadeploy.roles.ownership.facts import PathStates
from llamadeploy.roles.transfer import peer_address

UNIT = "prometheus-node-exporter"
DEFAULTS = "/etc/default/prometheus-node-exporter"
#: the exporter's fence (roles/firewall): table and rules file
TABLE = "llamadeploy_node_exporter"
FENCE_RULES = "/etc/default/llamadeploy-node-exporter.nft"
#: GPU hosts: the collector script, its timer and service, the file they write
GPU_UNIT = "llamadeploy-gpu-metrics"
GPU_FILES = {f"/usr/local/sbin/{GPU_UNIT}": (f"node_exporter/{GPU_UNIT}.sh", "755"),
             f"/etc/systemd/system/{GPU_UNIT}.service": (f"node_exporter/{GPU_UNIT}.service", "644"),
             f"/etc/systemd/system/{GPU_UNIT}.timer": (f"node_exporter/{GPU_UNIT}.timer", "644")}
GPU_TEXTFILE = "/var/lib/prometheus/node-exporter/llamadeploy_gpu.prom"


def node_args(listen: str, units: list[str]) -> str:
    """The defaults file Debian's unit reads (pure): the fleet address, and the systemd collector
    for ``units`` with their restart counters (``node_systemd_service_restart_total``).

    The unit expands ``$ARGS`` split at whitespace, without quote removal, so the unit regex has
    neither quotes nor spaces, and ``[.]`` instead of a backslash (which the environment file's
    double quotes would take)."""
    include = "|".join(u.replace(".", "[.]") for u in units)
    return (f'ARGS="--web.listen-address={listen} --collector.systemd --collector.systemd.enable-restarts-metrics '
            f'--collector.systemd.unit-include=({include})"\n')


def watched_units(cfg: HostConfig) -> list[str]:
    """The units of this deploy whose state and restarts are exported."""
    return [f"{cfg.service.name}.service", "ggml-rpc-server.service", "haproxy.service", "prometheus.service",
            "prometheus-alertmanager.service", "docker.service", f"{GPU_UNIT}.service"]


def wanted(cfg: HostConfig) -> bool:
    """Installed when the inventory has a monitor to scrape it (and it is not turned off)."""
    return cfg.node_exporter.enabled and bool(monitor_addresses(host.inventory))


def owned_entries(*, monitored: bool, on_gpu_host: bool) -> list[str]:
    """What the node exporter's part of a deploy writes that no package ships, for the host's
    ownership record (pure; roles/ownership): its fence (``monitored``: :func:`wanted`) and, on a
    CUDA host, the GPU metrics timer's units, script and file."""
    if not monitored:
        return []
    gpu = [*(f"file {p}" for p in GPU_FILES), f"file {GPU_TEXTFILE}", f"unit {GPU_UNIT}.service",
           f"unit {GPU_UNIT}.timer"] if on_gpu_host else []
    return [*fence_entries(UNIT, TABLE, FENCE_RULES), *gpu]


@role("Host metrics (node exporter)")
def host_metrics(cfg: HostConfig) -> None:
    if not wanted(cfg):
        host.noop("no monitor in the inventory (or llama_node_exporter.enabled false): no node exporter")
        return
    # the fence and the arguments come before the package, whose postinst starts the exporter at
    # once: it starts fenced, on the fleet address, and is not restarted seconds later (Debian's
    # default listens on every address until then; and such a restart failed in the sandbox, one
    # run in three: "Failed to kill control group ... Input/output error", then its ExecStartPre
    # exited 219/CGROUP). apt keeps an /etc/default file that is already there (--force-confold)
    packages.refuse_foreign(cfg, "node", ["prometheus-node-exporter"], "llama_node_exporter.enabled = true",
                            "llama_node_exporter.enabled false (and scrape the host's own exporter), or a host "
                            "without one")
    port_fenced(cfg, UNIT, TABLE, FENCE_RULES, cfg.node_exporter.port,
                exporter_networks_for(monitor_addresses(host.inventory), []), "llama_node_exporter.enabled = true")
    args = atomic.put(name="Node exporter on the fleet address, systemd collector (/etc/default)",
                      src=StringIO(node_args(host_port(peer_address(cfg, host), cfg.node_exporter.port),
                                             watched_units(cfg))),
                      dest=DEFAULTS, mode="644")
    installed = packages.installed(cfg, "node", name="Node exporter", packages=["prometheus-node-exporter"],
                                   update=True, cache_time=24 * 3600, no_recommends=True)
    started = systemd.service(name="Node exporter enabled and running", service=f"{UNIT}.service", running=True,
                              enabled=True)
    systemd.service(name="Restart the node exporter for new arguments", service=f"{UNIT}.service", restarted=True,
                    _if=[args.did_change, lambda: not installed.did_change(), lambda: not started.did_change()])


@role("GPU metrics (node exporter textfile)")
def gpu_metrics(cfg: HostConfig, on_gpu_host: bool) -> None:
    """On a CUDA host with a node exporter: the timer that writes ``nvidia-smi``'s figures for it.
    Anywhere else (no monitor, a host that left CUDA): what an earlier run installed goes."""
    if not (on_gpu_host and wanted(cfg)):
        gpu_metrics_removed()
        return
    written = [atomic.put(name=f"GPU metrics: {dest}", src=StringIO(template_text(src)), dest=dest, mode=mode)
               for dest, (src, mode) in GPU_FILES.items()]
    systemd.daemon_reload(name="Reload systemd (GPU metrics units)", _if=any_changed(*written[1:]))
    systemd.service(name="GPU metrics timer enabled and running", service=f"{GPU_UNIT}.timer", running=True,
                    enabled=True)


def gpu_metrics_removed() -> None:
    """The GPU metrics timer, its units, script and file, where a run installed them (also
    uninstall's). One fact for all of them: a CPU host's re-run pays one round trip."""
    paths = [*GPU_FILES, GPU_TEXTFILE]
    present = [p for p, state in host.get_fact(PathStates, paths=paths).items() if state != "absent"]
    if not present:
        host.noop("no GPU metrics timer on this host")
        return
    if f"/etc/systemd/system/{GPU_UNIT}.timer" in present:
        server.shell(name="GPU metrics timer stopped and disabled",
                     commands=[f"systemctl disable --now {GPU_UNIT}.timer; systemctl stop {GPU_UNIT}.service; "
                               f"systemctl reset-failed {GPU_UNIT}.service {GPU_UNIT}.timer 2>/dev/null || true"])
    for path in present:
        files.file(name=f"{path} removed", path=path, present=False)
    # a run stopped mid-write leaves its staging file (not *.prom, so never read)
    server.shell(name="GPU metrics staging files removed",
                 commands=[f"rm -f {posixpath.dirname(GPU_TEXTFILE)}/.{posixpath.basename(GPU_TEXTFILE)}.*"])
    if any(p.startswith("/etc/systemd/") for p in present):
        systemd.daemon_reload(name="Reload systemd (GPU metrics units removed)")
