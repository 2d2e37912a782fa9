"""Front role (hosts with ``llama_role = "front"``): HAProxy over the inventory's llama-servers.

Backends come from the inventory (every ``llama_role = "server"`` host, or the hosts of
``llama_front.backends_group``); each gets ``maxconn`` equal to its slots, read from its
own manifest (the deploy's plan), so requests queue in HAProxy instead of being deferred
inside llama-server. The config (``templates/front/haproxy.cfg.j2``) is checked with
``haproxy -c`` before it replaces the old one, and HAProxy is reloaded, not restarted:
new workers take new connections while the old ones finish their streams.
Drain and enable go through HAProxy's runtime API (:func:`server_state`).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from gevent.lock import BoundedSemaphore
from pyinfra import host
from pyinfra.api.host import Host
from pyinfra.facts.files import FileContents
from pyinfra.operations import files, systemd

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.hostdata import validate_inventory
from llamadeploy.manifest import Manifest, manifest_path
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall import fence_entries, port_fenced
from llamadeploy.roles.front.operations import reloaded_keeping_states, server_state, serving
from llamadeploy.roles.transfer import peer_address
from llamadeploy.tuning import DEFAULT_PARALLEL

TEMPLATE = "front/haproxy.cfg.j2"
ETC = "/etc/haproxy"
CONFIG = f"{ETC}/haproxy.cfg"
PEM = f"{ETC}/llamadeploy.pem"
ADMIN_SOCKET = "/run/haproxy/admin.sock"
#: the servers' states across a reload (operations.reloaded_keeping_states); absent otherwise
#: (under /run: a file a killed reload left behind is gone at the next boot)
STATE_FILE = "/run/haproxy/llamadeploy-server-state"
BACKEND = "llama_servers"
#: the exporter's fence (roles/firewall): table and rules file
EXPORTER_TABLE = "llamadeploy_haproxy_exporter"
EXPORTER_RULES = "/etc/haproxy/llamadeploy-exporter.nft"


@dataclass(frozen=True)
class Backend:
    name: str
    address: str
    port: int
    slots: int
    #: the models it serves (router mode: every alias; one model: its alias); empty: not known
    models: tuple[str, ...] = ()


#: what the front buffers of a request to read its ``model`` (HAProxy's ``tune.bufsize``); a
#: larger body goes to any server, whose router answers 400 if it lacks the model
MODEL_ROUTING_BUFSIZE = 131072


def model_backend(alias: str) -> str:
    """The HAProxy backend of the servers that serve ``alias`` (letters, digits, ``._-``)."""
    return f"model_{alias}"


#: pyinfra prepares the hosts of a run side by side (a greenlet each). A front and a monitor both
#: read each server's manifest, and a server outside the run's ``--limit`` is not connected yet:
#: both would connect it at once, and two greenlets then share one half-made SSH session (seen in
#: a rollout's fronts step: paramiko "Oops, unhandled type 3", then a hang). One reader at a time.
_OTHER_HOSTS = BoundedSemaphore(1)


def deployed(h: Host, cfg: HostConfig) -> Manifest | None:
    """Server ``h``'s manifest as it is now (before this run's changes), or None: not deployed
    yet, or not reachable in this run."""
    try:
        with _OTHER_HOSTS:
            lines = h.get_fact(FileContents, path=manifest_path(cfg.service.config_dir))
        return Manifest.parse("\n".join(lines)) if lines else None
    except Exception:  # noqa: BLE001 - not deployed yet, or not reachable in this run
        return None


def serves(m: Manifest) -> tuple[str, ...]:
    """The aliases a deployed release serves: its router's models, else its one alias (pure)."""
    return tuple(s.alias for s in m.models) or (m.alias,)


def routing_of(cfg: HostConfig, now: Manifest | None, in_run: bool) -> tuple[tuple[str, ...], bool]:
    """The aliases a server serves once this run is over, for routing by model, and whether it
    runs a router (pure).

    ``in_run`` (the run deploys it, it is in the ``--limit``): what its inventory gives it. Not in
    the run (a front deployed alone, or by ``llamadeploy rollback``, which reinstates a release
    whose model set the inventory may no longer have): what its manifest ``now`` says it serves,
    so that the front neither answers 404 for a model that serves nor routes one that does not.
    No manifest yet: its inventory's. A one-model server without an alias setting: the alias its
    manifest says."""
    if now is not None and not in_run:
        return serves(now), bool(now.models)
    if cfg.router_mode:
        return tuple(m.alias for m in cfg.models), True
    if cfg.model.alias:
        return (cfg.model.alias,), False
    return ((now.alias,) if now else ()), False


def model_routes(backends: list[Backend]) -> list[tuple[str, list[Backend]]]:
    """Each model of the fleet and the servers that serve it, in first-seen order (pure)."""
    routes: dict[str, list[Backend]] = {}
    for b in backends:
        for alias in b.models:
            routes.setdefault(alias, []).append(b)
    return list(routes.items())


def models_list(aliases: list[str]) -> str:
    """The front's own ``GET /v1/models`` answer: the union of the fleet's models, OpenAI's shape."""
    return json.dumps({"object": "list", "data": [{"id": a, "object": "model", "owned_by": "llamacpp"}
                                                  for a in aliases]}, separators=(",", ":"))


def server_name(h: Host) -> str:
    """A HAProxy server name for an inventory host (letters, digits, ``._-``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", h.name)


def address(h: Host) -> str:
    return str(h.data.get("ssh_hostname") or h.name)


def exporter_address(cfg: HostConfig, h: Host) -> str:
    """Where front ``h``'s HAProxy exporter listens: ``metrics_bind``, else its fleet address. The
    front binds it and the monitor scrapes it, both through this one function."""
    return str(cfg.front.metrics_bind) if cfg.front.metrics_bind else peer_address(cfg, h)


def host_port(addr: str, port: int) -> str:
    """``addr:port``, an IPv6 address in brackets (as Prometheus targets and URLs want it)."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def backend_hosts(cfg: HostConfig) -> list[tuple[Host, HostConfig]]:
    """The servers behind this front, in inventory order."""
    configs = validate_inventory(host.inventory)
    group = cfg.front.backends_group
    members = {h.name for h in host.inventory.get_group(group, default=[])} if group else None
    return [(h, configs[h.name]) for h in host.inventory
            if configs[h.name].role == "server" and (members is None or h.name in members)]


def slots_of(cfg: HostConfig, now: Manifest | None) -> int:
    """The server's slots from its manifest ``now`` (what its deploy planned), else its setting,
    else 8 (pure)."""
    return now.memory_plan.parallel if now else (cfg.server.parallel or DEFAULT_PARALLEL)


def backends_of(servers: list[tuple[Host, HostConfig]]) -> tuple[list[Backend], bool]:
    """The front's backends, one manifest read per server, and whether it routes by model (any
    server runs a router once the run is over)."""
    backends, by_model = [], False
    for h, c in servers:
        now = deployed(h, c)
        models, router = routing_of(c, now, host.state.is_host_in_limit(h))
        backends.append(Backend(server_name(h), address(h), c.server.port, slots_of(c, now), models))
        by_model = by_model or router
    return backends, by_model


def haproxy_config(cfg: HostConfig, backends: list[Backend], metrics_bind: str, by_model: bool = False) -> str:
    """The rendered haproxy.cfg (pure); ``metrics_bind``: the exporter's address. ``by_model``
    (a fleet with router-mode servers): each request goes to the servers that serve its model,
    an unknown model gets 404, and ``GET /v1/models`` lists the fleet's models."""
    f = cfg.front
    key = f"hdr({f.affinity_header})" if f.affinity_header else "hdr(Authorization)"
    routes = model_routes(backends) if by_model else []
    return render(
        TEMPLATE, backends=backends, bind=f.bind, port=f.port, tls=f.tls_pem is not None, tls_port=f.tls_port,
        pem_path=PEM, redirect_http=f.redirect_http, balance=f.balance, hash_key=key,
        hash_balance_factor=f.hash_balance_factor, check_interval=f.check_interval,
        timeout_server=f.timeout_server, timeout_queue=f.timeout_queue, metrics_port=f.metrics_port,
        metrics_bind=metrics_bind, admin_socket=ADMIN_SOCKET, state_file=STATE_FILE, backend_name=BACKEND,
        routes=[(alias, model_backend(alias), servers) for alias, servers in routes],
        models_json=models_list([alias for alias, _ in routes]), bufsize=MODEL_ROUTING_BUFSIZE,
    )


def kept_states(backends: list[Backend]) -> list[str]:
    """``NAME ADDRESS PORT`` of each server of the new config, the state lines a reload keeps
    (pure): a server whose address or port changed starts from its config."""
    return [f"{b.name} {b.address} {b.port}" for b in backends]


def monitor_addresses(inventory) -> list[str]:
    """The fleet addresses of the inventory's monitor hosts (what the exporter's fence admits)."""
    configs = validate_inventory(inventory)
    return [peer_address(configs[h.name], h) for h in inventory if configs[h.name].role == "monitor"]


def exporter_networks(cfg: HostConfig, monitors: list[str]) -> list[str]:
    """Who reaches the front's exporter: the monitors and ``metrics_allow_from`` (pure)."""
    return exporter_networks_for(monitors, cfg.front.metrics_allow_from)


def exporter_networks_for(monitors: list[str], allow_from: list) -> list[str]:
    """Who reaches an exporter (the front's, a node exporter): the monitors' addresses as host
    networks, then ``allow_from`` (pure)."""
    return [*(f"{a}/{32 if ':' not in a else 128}" for a in monitors), *(str(n) for n in allow_from)]


def owned_entries(cfg: HostConfig) -> list[str]:
    """What a front's deploy writes that no package ships, for its ownership record (pure;
    roles/ownership): the TLS certificate, the rollouts' drain marks and the exporter's fence.
    ``haproxy.cfg`` is HAProxy's own conffile, which its purge removes."""
    return [*([f"file {PEM}"] if cfg.front.tls_pem is not None else []), f"dir {MARKS_DIR}",
            *fence_entries("haproxy", EXPORTER_TABLE, EXPORTER_RULES)]


@role("Front door (HAProxy)")
def front_door(cfg: HostConfig) -> Callable[[], bool]:
    """HAProxy installed, its config checked and in place, reloaded on change, running. Returns
    "it started or reloaded" for :func:`served`."""
    packages.refuse_foreign(cfg, "front", ["haproxy"], "llama_role = 'front'",
                            "a host whose HAProxy this deploy installs (remove the other one first)")
    servers = backend_hosts(cfg)
    backends, by_model = backends_of(servers)
    packages.installed(cfg, "front", name="HAProxy and socat (runtime API)", packages=["haproxy", "socat"],
                       update=True, cache_time=24 * 3600, no_recommends=True)
    if cfg.front.tls_pem is not None:
        pem = atomic.put(name="TLS certificate and key (0600)", src=StringIO(Path(cfg.front.tls_pem).read_text()),
                         dest=PEM, mode="600", secret=True)
    else:
        pem = files.file(name="No TLS certificate", path=PEM, present=False)
    # the exporter: on the fleet address, fenced to the monitors (and metrics_allow_from)
    port_fenced(cfg, "haproxy", EXPORTER_TABLE, EXPORTER_RULES, cfg.front.metrics_port,
                exporter_networks(cfg, monitor_addresses(host.inventory)), "llama_role = 'front'")
    metrics_bind = exporter_address(cfg, host)
    conf = atomic.put(name="haproxy.cfg (checked with haproxy -c)",
                      src=StringIO(haproxy_config(cfg, backends, metrics_bind, by_model)),
                      dest=CONFIG, mode="644", check="haproxy -c -q -f {path}")
    started = systemd.service(name="HAProxy enabled and running", service="haproxy.service", running=True,
                              enabled=True)
    # the servers' states carry over: a server the operator drained stays drained
    reloaded = reloaded_keeping_states(
        name="Reload HAProxy (no connection dropped, servers' states kept)", service="haproxy.service",
        socket=ADMIN_SOCKET, state_file=STATE_FILE, backend=BACKEND, keep=kept_states(backends),
        _if=[lambda: conf.did_change() or pem.did_change(), lambda: not started.did_change()])
    return lambda: started.did_change() or reloaded.did_change()


@role("Front door: serving")
def served(cfg: HostConfig, changed: Callable[[], bool] | None) -> None:
    """A front that (re)started or reloaded (``changed``): wait until HAProxy has a server up.
    Every host of a run passes this step, called from the same place (a no-op where ``changed``
    is None): the wait comes after the servers' own steps, in a run that deploys both."""
    serving(name="A server is up behind the front (a no-op on other hosts)", backend=BACKEND, socket=ADMIN_SOCKET,
            timeout=120, _if=changed or (lambda: False))


#: where a rollout marks, on each front, the servers it drained (one empty file per server)
DRAINED_DIR = "/var/lib/llamadeploy-front/drained"
#: the directory the deploy makes for them (its record names it; uninstall removes it)
MARKS_DIR = posixpath.dirname(DRAINED_DIR)


@role("Front door: server state")
def servers_set(cfg: HostConfig, servers: list[str], state: str, by_rollout: bool = False, wait: bool = True) -> None:
    """Drain (finish what runs, take nothing new) or enable servers through the runtime API; a
    drain waits for running streams (up to ``timeout_server``), an enable until the server is up.

    ``by_rollout``: a rollout's drain marks the servers it drained, and its enable enables only
    marked ones (see :func:`~llamadeploy.roles.front.operations.server_state`): servers the
    operator drained stay drained, and what a killed rollout drained is enabled by the next.
    ``wait`` False: an enable returns at once (the server's health checks keep it out until up).
    """
    seconds = cfg.front.timeout_server if state == "drain" else 60 + 3 * cfg.front.check_interval
    for name in servers:
        server_state(name=f"{name}: {state}", backend=BACKEND, server=name, state=state, socket=ADMIN_SOCKET,
                     wait=seconds if wait or state == "drain" else 0,
                     marker=posixpath.join(DRAINED_DIR, name) if by_rollout else None)
