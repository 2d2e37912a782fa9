"""Transfer role: fan-out of big files (models, built releases) from host to host.

With ``llama_transfer.mode = "fanout"`` the controller sends a file once (to the first host
that needs it); every host that holds a verified copy then serves it to the others, which
pull byte ranges from several holders at once, so the holders double every round
(:mod:`.plan`). The engines are stock Debian tools: ``busybox httpd`` serves (fenced by
nftables to the run's hosts, a transient unit that stops when the fan-out ends or after
``llama_transfer.timeout``), ``aria2c`` pulls (multi-source HTTP ranges, resumable).
Every received file is sha256-verified before it is renamed into place. Whatever the peers
could not deliver, the caller's own direct push from the controller delivers next.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.host import Host

from llamadeploy import packages
from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles.transfer.fleet import Fleet, Member, register
from llamadeploy.roles.transfer.operations import peer_pulled, peers_serving, peers_stopped, seeded
from llamadeploy.roles.transfer.plan import rounds_needed

PACKAGES = ["aria2", "busybox", "curl", "nftables"]


@dataclass(frozen=True)
class Shipment:
    """One file to bring to the hosts of a run."""

    key: str  #: the same for every host that needs the same content
    label: str  #: what progress lines call it
    controller_path: str
    dest: str  #: where it lands on this host
    #: None: ``<controller_path>.sha256`` names it at execution (a release built this run)
    sha256: str | None


def peer_address(cfg: HostConfig, h: Host) -> str:
    """The address other hosts reach ``h`` at: ``llama_transfer.address``, or its inventory
    address resolved on the controller (the fence needs addresses, not names)."""
    if cfg.transfer.address is not None:
        return str(cfg.transfer.address)
    name = str(h.data.get("ssh_hostname") or h.name)
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        return str(socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)[0][4][0])
    except OSError as exc:
        raise DeployError(f"host {h.name}: llama_transfer.address is unset and {name!r} does not resolve "
                          f"on the controller ({exc}); set llama_transfer.address") from None


@role("Fan-out")
def fanned_out(cfg: HostConfig, shipment: Shipment, holds: bool) -> None:
    """Take part in the run's fan-out of ``shipment``: seed, serve, pull, stop (see operations)."""
    t = cfg.transfer
    packages.installed(cfg, "transfer", name="Fan-out tools (aria2, busybox httpd, nftables)", packages=PACKAGES,
                       update=True, cache_time=24 * 3600, no_recommends=True)
    register(host.inventory,
             Fleet(shipment.key, shipment.label, shipment.controller_path, shipment.sha256, t.port, t.sources,
                   t.timeout),
             Member(host.name, peer_address(cfg, host), shipment.dest, f"{cfg.service.cache_dir}/peer", holds))
    seeded(name=f"{shipment.label}: the controller's one push", key=shipment.key)
    for r in range(1, rounds_needed(len(host.state.activated_hosts or host.state.active_hosts)) + 1):
        peers_serving(name=f"{shipment.label}: round {r}, serve", key=shipment.key, round_no=r)
        peer_pulled(name=f"{shipment.label}: round {r}, pull", key=shipment.key, round_no=r)
    peers_stopped(name=f"{shipment.label}: peers stop serving", key=shipment.key)
