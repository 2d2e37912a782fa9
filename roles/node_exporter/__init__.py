"""Host metrics (every host of an inventory with a monitor): Debian's ``prometheus-node-exporter``.

The monitor's Prometheus scrapes it (job ``node``) next to the servers and fronts, so the alert
rules see what a llama-server's own metrics cannot: a disk filling up under the models and the
build cache, memory running out, the server's unit restarting again and again. It listens on the
host's fleet address only, fenced (nftables, as the front's exporter) to the monitors.

GPU hosts: GPU memory and utilization would come from ``nvidia-smi`` written to the node
exporter's textfile collector; not built yet (no GPU to prove it on).
"""

from __future__ import annotations

from io import StringIO

from pyinfra import host
from pyinfra.operations import systemd

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall import port_fenced
from llamadeploy.roles.front import exporter_networks_for, host_port, monitor_addresses
from llamadeploy.roles.transfer import peer_address

UNIT = "prometheus-node-exporter"
DEFAULTS = "/etc/default/prometheus-node-exporter"
#: the exporter's fence (roles/firewall): table and rules file
TABLE = "llamadeploy_node_exporter"
FENCE_RULES = "/etc/default/llamadeploy-node-exporter.nft"


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
            "prometheus-alertmanager.service", "docker.service"]


def wanted(cfg: HostConfig) -> bool:
    """Installed when the inventory has a monitor to scrape it (and it is not turned off)."""
    return cfg.node_exporter.enabled and bool(monitor_addresses(host.inventory))


@role("Host metrics (node exporter)")
def host_metrics(cfg: HostConfig) -> None:
    if not wanted(cfg):
        host.noop("no monitor in the inventory (or llama_node_exporter.enabled false): no node exporter")
        return
    packages.installed(cfg, "node", name="Node exporter", packages=["prometheus-node-exporter"], update=True,
                       cache_time=24 * 3600, no_recommends=True)
    port_fenced(cfg, UNIT, TABLE, FENCE_RULES, cfg.node_exporter.port,
                exporter_networks_for(monitor_addresses(host.inventory), []))
    args = atomic.put(name="Node exporter on the fleet address, systemd collector (/etc/default)",
                      src=StringIO(node_args(host_port(peer_address(cfg, host), cfg.node_exporter.port),
                                             watched_units(cfg))),
                      dest=DEFAULTS, mode="644")
    started = systemd.service(name="Node exporter enabled and running", service=f"{UNIT}.service", running=True,
                              enabled=True)
    systemd.service(name="Restart the node exporter for new arguments", service=f"{UNIT}.service", restarted=True,
                    _if=[args.did_change, lambda: not started.did_change()])
