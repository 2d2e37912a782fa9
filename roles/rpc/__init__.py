"""RPC role: llama.cpp's RPC backend for models bigger than one host, deployed and fenced.

A *worker* (``llama_role = "rpc_worker"``) runs ``ggml-rpc-server`` from the same release as
its head (build once applies: it is in every release), bound to its private address, in a
hardened unit with a dynamic user; nftables lets only its head(s) reach the port, loaded
before every start. A *head* is a server whose ``llama_rpc.workers_group`` names an inventory
group of workers: its llama-server gets ``--rpc`` with their endpoints and puts layers on them
in proportion to the members' memory limits (:mod:`.plan`).

Refused before anything changes (while pyinfra prepares): a worker of another release, a
worker that is neither in this run nor answering on its port from the head, a group whose
memory cannot hold the model plus a minimal KV cache. Workers' operations run before the
head's (they are called earlier in the deploy), so a head is switched only after its workers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from io import StringIO
from weakref import WeakKeyDictionary

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.host import Host
from pyinfra.api.inventory import Inventory
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File
from pyinfra.facts.systemd import SystemdStatus
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import atomic, packages, units
from llamadeploy.config import HostConfig, parse_size
from llamadeploy.facts import CpuTopology
from llamadeploy.hostdata import validate_inventory
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall import (
    fence_entries,
    guard_paths,
    guard_unit,
    keepers_removed,
    kept,
    refuse_foreign_fence,
)
from llamadeploy.roles.firewall.operations import table_loaded, table_removed
from llamadeploy.roles.preflight.facts import HostMemory
from llamadeploy.roles.rpc.facts import RpcConnected, RpcReachable
from llamadeploy.roles.rpc.operations import listening, workers_checked
from llamadeploy.roles.rpc.plan import Member
from llamadeploy.roles.transfer import peer_address
from llamadeploy.tuning import systemd_quote, threads, unit_limits

UNIT = "ggml-rpc-server"
#: per run (its inventory): worker -> the operations that (re)start its ggml-rpc-server
_WORKER_STARTS: WeakKeyDictionary[Inventory, dict[str, list[OperationMeta]]] = WeakKeyDictionary()
#: per run: worker -> its final "listening" operation
_WORKER_READY: WeakKeyDictionary[Inventory, dict[str, OperationMeta]] = WeakKeyDictionary()
TABLE = "llamadeploy_rpc"
TEMPLATE = "rpc/ggml-rpc-server.service.j2"
FENCE_TEMPLATE = "firewall/llama-server.nft.j2"


def worker_address(cfg: HostConfig, h: Host) -> str:
    """The private address a worker binds and its head connects to."""
    return str(cfg.rpc.address) if cfg.rpc.address is not None else peer_address(cfg, h)


def head_address(cfg: HostConfig, h: Host) -> str:
    """The address a head's connections to its workers come from (what their fences admit):
    its ``llama_rpc.address`` (its address on the workers' private network), else its fleet address."""
    return str(cfg.rpc.address) if cfg.rpc.address is not None else peer_address(cfg, h)


def endpoint(cfg: HostConfig, h: Host) -> str:
    addr = worker_address(cfg, h)
    return f"[{addr}]:{cfg.rpc.port}" if ":" in addr else f"{addr}:{cfg.rpc.port}"


def workers_of(inventory: Inventory, cfg: HostConfig, head: str) -> list[tuple[Host, HostConfig]]:
    """The head's workers, in inventory order; a missing group or a member that is no worker is refused."""
    group = cfg.rpc.workers_group
    assert group is not None
    configs = validate_inventory(inventory)
    members = list(inventory.get_group(group, []))
    if not members:
        raise DeployError(f"host {head}: llama_rpc.workers_group = {group!r} names no inventory group with hosts")
    out = []
    for h in members:
        other = configs[h.name]
        if other.role != "rpc_worker":
            raise DeployError(f"host {head}: {h.name} in llama_rpc.workers_group {group!r} has llama_role "
                              f"{other.role!r}; allowed: 'rpc_worker'")
        out.append((h, other))
    return out


def heads_of(inventory: Inventory, name: str) -> list[Host]:
    """The servers whose workers_group holds ``name``."""
    configs = validate_inventory(inventory)
    out = []
    for h in inventory:
        group = configs[h.name].rpc.workers_group
        if group and any(m.name == name for m in inventory.get_group(group, [])):
            out.append(h)
    return out


def group_members(cfg: HostConfig) -> list[Member]:
    """The head's workers as plan members, checked: same release, reachable, memory known.

    Runs on the head while pyinfra prepares. A worker in this run must be connected (it is
    deployed before the head switches); one outside it must answer on its port from the head.
    """
    active = {h.name for h in host.state.active_hosts}
    workers = workers_of(host.inventory, cfg, host.name)
    outside = {endpoint(wcfg, w): w.name for w, wcfg in workers if w.name not in active}
    answers = host.get_fact(RpcReachable, endpoints=sorted(outside)) if outside else {}
    members = []
    for w, wcfg in workers:
        ep = endpoint(wcfg, w)
        if wcfg.build.release_key() != cfg.build.release_key():
            raise DeployError(f"host {host.name}: RPC worker {w.name} would run release "
                              f"{wcfg.build.release_key()}, the head {cfg.build.release_key()}; head and workers "
                              "need the same llama_build settings")
        if w.name not in active and not answers.get(ep):
            raise DeployError(f"host {host.name}: RPC worker {w.name} ({ep}) is unreachable: not connected in this "
                              "run, and its port does not answer from the head; nothing was changed")
        if wcfg.limits.memory:
            memory = parse_size(wcfg.limits.memory)
        elif w.name in active:
            memory = w.get_fact(HostMemory).usable
        else:
            raise DeployError(f"host {host.name}: RPC worker {w.name} has no llama_limits.memory and is not in this "
                              "run to read its memory; set its llama_limits.memory")
        members.append(Member(w.name, ep, memory))
    return members


def head_must_restart(cfg: HostConfig) -> Callable[[], bool]:
    """For the head's restart: a worker that restarted holds none of the head's tensors any more.

    Found at prepare without clocks: the head's llama-server runs but has no established
    connection to one of its workers (a worker that went away closed it); and at execution:
    a worker of this run whose start or restart operation changed something (it ran before).
    """
    if not cfg.rpc.workers_group:
        return lambda: False
    workers = workers_of(host.inventory, cfg, host.name)
    eps = [endpoint(wcfg, w) for w, wcfg in workers]
    unit = f"{cfg.service.name}.service"
    running = bool(host.get_fact(SystemdStatus, services=unit).get(unit))
    connected = host.get_fact(RpcConnected, endpoints=eps) if running else {}
    lost = running and not all(connected.get(ep) for ep in eps)
    inventory = host.inventory

    def check() -> bool:
        starts = _WORKER_STARTS.get(inventory, {})
        return lost or any(op.is_complete() and op.did_change() for w, _ in workers for op in starts.get(w.name, []))

    return check


def workers_ready(cfg: HostConfig) -> None:
    """Before the head changes anything: every worker of this run got through its own steps.

    pyinfra goes on with the other hosts when one fails; a head must not switch onto a worker
    that did not come up (its ``listening`` check did not succeed in this run).
    """
    if not cfg.rpc.workers_group:
        return
    active = {h.name for h in host.state.activated_hosts}
    names = [w.name for w, _ in workers_of(host.inventory, cfg, host.name) if w.name in active]
    inventory = host.inventory
    workers_checked(name="RPC workers of this run are up", workers=names,
                    ready=lambda: {n: (op is not None and op.is_complete() and op.did_succeed(False))
                                   for n in names for op in [_WORKER_READY.get(inventory, {}).get(n)]})


def members_from_config(inventory: Inventory, cfg: HostConfig, head: str) -> list[Member] | None:
    """The head's workers from the inventory alone (``llamadeploy status``: no checks, no facts);
    None when a worker's memory is not in its config."""
    out = []
    for w, wcfg in workers_of(inventory, cfg, head):
        if not wcfg.limits.memory:
            return None
        out.append(Member(w.name, endpoint(wcfg, w), parse_size(wcfg.limits.memory)))
    return out


def fence(cfg: HostConfig, head_addresses: list[str]) -> tuple[str, str]:
    """The worker's nftables rules (only its heads reach the port) and the digest that tags the
    loaded table (pure)."""
    addrs = [ipaddress.ip_address(a) for a in head_addresses]
    v4 = sorted(f"{a}/32" for a in addrs if a.version == 4)
    v6 = sorted(f"{a}/128" for a in addrs if a.version == 6)
    digest = f"llamadeploy rpc {cfg.rpc.port} " + ",".join(v4 + v6)
    return render(FENCE_TEMPLATE, table=TABLE, unit_name=UNIT, port=cfg.rpc.port, v4=v4, v6=v6, digest=digest), digest


def unit_text(cfg: HostConfig, h: Host, heads: list[str], nthreads: int) -> str:
    """The worker's unit (pure given its inputs)."""
    binary = f"{cfg.current_link}/bin/{UNIT}"
    args = [binary, "--host", worker_address(cfg, h), "--port", str(cfg.rpc.port), "--threads", str(nthreads)]
    if cfg.rpc.cache:
        args.append("--cache")
    return render(TEMPLATE, release_key=cfg.build.release_key(), heads=heads, endpoint=endpoint(cfg, h),
                  firewall=rules_path(cfg),
                  exec_start=" ".join(systemd_quote(a) for a in args), unit_name=UNIT, cache=cfg.rpc.cache,
                  fence_guard=guard_unit(UNIT),
                  limits=unit_limits(cfg))


@role("RPC worker")
def group_step(cfg: HostConfig, runtime: list) -> None:
    """A worker: ggml-rpc-server, fenced to its head, restarted when the release or unit changes.
    Every other server: only the last step, a no-op, called from the same place.

    ``runtime``: the build role's operations (a new release means a restart).

    pyinfra orders a run as a graph of each host's own sequence of operations, in waves: an
    operation follows its predecessors on every host that runs it, not the line it is called
    from. The shared last step (``listening``) is one operation for workers and heads alike, so
    every step of a head after it waits until each worker's steps are done.
    """
    worker = cfg.role == "rpc_worker"
    if worker:
        _worker(cfg, runtime)
    else:
        worker_removed(name="RPC worker")
    ready = listening(name="RPC workers listen (a no-op on other hosts)",
                      address=worker_address(cfg, host) if worker else None, port=cfg.rpc.port)
    if worker:
        _WORKER_READY.setdefault(host.inventory, {})[host.name] = ready


def worker_removed(name: str) -> None:
    """A host that is no RPC worker (any more: its ``llama_role`` changed) runs none: the unit,
    its fence and the fence's keepers go. Nothing to do on a host that never was one; an
    operator's own unit of that name (one they run by hand) is left alone (llamadeploy.units)."""
    unit = f"/etc/systemd/system/{UNIT}.service"
    if not units.left_alone(f"{UNIT}.service"):
        if host.get_fact(File, path=unit):
            server.shell(name=f"{name} stopped and disabled", commands=[f"systemctl disable --now {UNIT}.service"])
        gone = files.file(name=f"{name} unit removed", path=unit, present=False)
        systemd.daemon_reload(name="Reload systemd", _if=gone.did_change)
    keepers_removed(UNIT, TABLE)
    table_removed(name=f"{name} fence removed", table=TABLE)


def owned_entries(cfg: HostConfig) -> list[str]:
    """What an RPC worker's deploy writes, for its ownership record (pure; roles/ownership): its
    unit and its fence (whose rules sit in the recorded config directory)."""
    return [f"unit {UNIT}.service", *fence_entries(UNIT, TABLE, rules_path(cfg), bound=False)]


def rules_path(cfg: HostConfig) -> str:
    """The worker's fence rules: in its config directory, which its unit loads before it starts."""
    return f"{cfg.service.config_dir}/rpc-worker.nft"


def _worker(cfg: HostConfig, runtime: list) -> None:
    heads = heads_of(host.inventory, host.name)
    if len(heads) > 1:  # ggml-rpc-server serves one client at a time: a second head would hang
        raise DeployError(f"host {host.name}: RPC worker of {len(heads)} heads ({', '.join(h.name for h in heads)}); "
                          "allowed: one (ggml-rpc-server serves one client at a time)")
    head_addresses = [head_address(validate_inventory(host.inventory)[h.name], h) for h in heads]
    units.refuse_foreign({f"{UNIT}.service": "llama_role = 'rpc_worker'", guard_unit(UNIT): "llama_role = 'rpc_worker'"},
                         "a host without units of those names")
    refuse_foreign_fence(TABLE, "llama_role = 'rpc_worker'", [guard_paths(UNIT, TABLE)[1]])
    packages.installed(cfg, "rpc", name="nftables", packages=["nftables"], update=True, cache_time=24 * 3600,
                       no_recommends=True)
    rules = rules_path(cfg)
    text, digest = fence(cfg, head_addresses)
    atomic.put(name="RPC fence rules", src=StringIO(text), dest=rules, mode="600")
    table_loaded(name="RPC fence loaded (only the head reaches the port)", path=rules, table=TABLE, digest=digest)
    kept_ops = kept(UNIT, TABLE, rules)
    switched = atomic.link(name="Point current at the release", path=cfg.current_link, target=cfg.release_dir)
    unit = atomic.put(name="ggml-rpc-server unit", src=StringIO(unit_text(
        cfg, host, [h.name for h in heads], threads(cfg, host.get_fact(CpuTopology)))),
        dest=f"/etc/systemd/system/{UNIT}.service", mode="644")
    systemd.daemon_reload(name="Reload systemd", _if=unit.did_change)
    started = systemd.service(name="ggml-rpc-server enabled and running", service=f"{UNIT}.service", running=True,
                              enabled=True)
    restarted = systemd.service(name="Restart for a changed release or unit", service=f"{UNIT}.service",
                                restarted=True, _if=[any_changed(unit, switched, *kept_ops, *runtime),
                                                     lambda: not started.did_change()])
    _WORKER_STARTS.setdefault(host.inventory, {})[host.name] = [started, restarted]
