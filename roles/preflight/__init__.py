"""Preflight: refuse a host whose memory cannot hold the model plus a minimal KV cache.

Runs while pyinfra prepares operations, before any operation of any host
executes, so a refused host leaves every host untouched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any
from weakref import WeakKeyDictionary

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.facts.files import FileContents
from pyinfra.facts.server import LinuxDistribution, Users

from llamadeploy import ctlcache
from llamadeploy.catalog import CATALOG
from llamadeploy.config import HostConfig, parse_size
from llamadeploy.facts import CpuTopology
from llamadeploy.gguf_meta import ModelMeta, read_meta
from llamadeploy.roles.model.source import ModelArtifact
from llamadeploy.roles.preflight.facts import HostMemory, PortHolder, PortHolders
from llamadeploy.tuning import MemoryPlan, PreflightError, plan_memory


@lru_cache(maxsize=16)
def model_meta(path: str, sha256: str) -> ModelMeta:
    """GGUF header of a controller file: from the controller cache under its sha256, else read."""
    return ctlcache.model_meta(sha256, lambda: read_meta(path))


def meta_for(cfg: HostConfig, art: ModelArtifact) -> ModelMeta:
    """GGUF header values: from the controller's copy, else from the catalog.

    A split model keeps its metadata in the first part; its size is all parts.
    """
    if art.first.local:
        return dataclasses.replace(model_meta(art.first.local, art.first.sha256), file_size=art.size)
    for entry in CATALOG.values():
        if (entry.repo_id, entry.filename) == (art.repo_id, art.first.repo_path):
            return dataclasses.replace(entry.meta, file_size=art.size)
    s = cfg.server
    if s.ctx_size is None or s.parallel is None:
        raise DeployError(
            f"preflight for host {host.name}: {art.repo_id}/{art.first.repo_path} is downloaded by the host "
            "and is not in the catalog, so the controller cannot read its GGUF header to size the KV "
            "cache; set llama_server.ctx_size and llama_server.parallel (or use distribution 'controller')"
        )
    return ModelMeta("unknown", 0, s.ctx_size, 0, 0, 0, art.size)


def memory_plan(cfg: HostConfig, art: ModelArtifact) -> MemoryPlan:
    """Context size and slots for this host, or a DeployError with the numbers."""
    mem = host.get_fact(HostMemory)
    cpu = host.get_fact(CpuTopology)
    try:
        problem = host_limit_problem(cfg, cpu.logical, mem.total) or account_problem(cfg, host.get_fact(Users))
        if problem:
            raise PreflightError(problem)
        meta = meta_for(cfg, art)
        if not cfg.rpc.workers_group:
            return plan_memory(cfg, meta, mem.usable, cpu, mem.memlock_ceiling)
        # an RPC head: the group's memory holds weights and KV cache, split by the members' limits
        from llamadeploy.roles import rpc
        from llamadeploy.roles.rpc.plan import plan_group

        return plan_group(cfg, meta, mem.usable, cpu, mem.memlock_ceiling, rpc.group_members(cfg))
    except PreflightError as exc:
        raise DeployError(f"preflight refused host {host.name}: {exc}") from None


#: (distribution, major release) -> codename: the releases every role is tested on (docs/platforms.md)
TESTED_PLATFORMS = {("Debian", 12): "bookworm", ("Debian", 13): "trixie"}


def platform_checked() -> None:
    """Refuse every host of the run whose operating system no test here covers, before anything
    changes on any host and before any host's deploy lock is taken: the first host to prepare
    checks them all, so one message names every refused host. (A refusal raised later, after
    other hosts took their locks, leaves none behind either: pyinfra disconnects every host and
    llamadeploy.lock releases each lock at disconnect; test_safety shows it.) Package names, the unit's hardening directives, HAProxy's and Prometheus's config
    syntax and the build's toolchain are checked only on these releases."""
    inventory = host.inventory
    if _PLATFORMS_CHECKED.get(inventory):
        return
    problems = []
    for h in inventory.get_active_hosts():
        distro: Any = h.get_fact(LinuxDistribution)
        problem = platform_problem(distro)
        if problem:
            problems.append(f"preflight refused host {h.name}: {problem}")
    if problems:
        raise DeployError("\n".join(problems))
    _PLATFORMS_CHECKED[inventory] = True


#: inventories whose hosts all passed :func:`platform_checked` (one check per run)
_PLATFORMS_CHECKED: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()


def platform_problem(distro: Mapping[str, Any]) -> str | None:
    """What is wrong with ``distro`` (pyinfra's LinuxDistribution fact), or None (pure)."""
    name, major = distro.get("name"), distro.get("major")
    if (name, major) in TESTED_PLATFORMS:
        return None
    meta = distro.get("release_meta") or {}
    seen = meta.get("PRETTY_NAME") or f"{name or 'an unknown system'} {major or ''}".strip()
    allowed = " or ".join(f"{n} {m} ({c})" for (n, m), c in TESTED_PLATFORMS.items())
    return (f"operating system = {seen!r}; allowed: {allowed}, the releases this project tests on "
            "(docs/platforms.md says what another would need)")


def host_limit_problem(cfg: HostConfig, cpus: int, memory: int) -> str | None:
    """A limit above what the host has is a typo or the wrong host, never a plan (pure)."""
    lim = cfg.limits
    if lim.cpus and lim.cpus > cpus:
        return f"llama_limits.cpus = {lim.cpus:g} but this host has {cpus} CPUs; allowed: at most {cpus}"
    if lim.memory and parse_size(lim.memory) > memory:
        return (f"llama_limits.memory = {lim.memory!r} but this host has {memory >> 20} MiB of RAM; "
                f"allowed: at most {memory >> 20}M")
    return None


#: the first uid of login accounts on Debian/Ubuntu (adduser's FIRST_UID)
FIRST_LOGIN_UID = 1000


def account_problem(cfg: HostConfig, users: dict[str, dict]) -> str | None:
    """The service user is created as a system account; an existing login account is not taken over
    (its home would move to the data directory and its shell become nologin)."""
    user = users.get(cfg.service.user)
    if user is None:
        return None
    uid = int(user.get("uid") or 0)
    if uid == 0 or uid >= FIRST_LOGIN_UID:
        return (f"llama_service.user = {cfg.service.user!r} is an existing {'root' if uid == 0 else 'login'} "
                f"account (uid {uid}) on this host; allowed: a new or system account of the service's own")
    return None  # a system account: ours only if the ownership record says so (roles/ownership)


def is_ours(cfg: HostConfig, user: dict) -> bool:
    """On a host deployed before ownership records: the account an earlier deploy made is a system
    account whose home is our data directory."""
    return user.get("home") == cfg.service.data_dir


def listened_ports(cfg: HostConfig, docker_serves: bool = False) -> list[tuple[str, int, tuple[str, ...]]]:
    """What this host's role will listen on: (field, port, the units whose processes may hold
    it: ours, restarted or reloaded by the deploy) (pure). ``docker_serves``: the deploy's own
    container publishes the port (:func:`_docker_serves`), through Docker's proxy; any other
    ``docker-proxy`` on the port is an operator's container."""
    if cfg.role == "front":
        f, ours = cfg.front, ("haproxy.service",)
        plain = [("llama_front.port", f.port, ours)] if not f.tls_pem or f.redirect_http else []
        tls = [("llama_front.tls_port", f.tls_port, ours)] if f.tls_pem else []
        return [*plain, *tls, ("llama_front.metrics_port", f.metrics_port, ours)]
    if cfg.role == "monitor":
        am = cfg.monitor.alertmanager
        return [("llama_monitor.port", cfg.monitor.port, ("prometheus.service",)),
                *([("llama_monitor.alertmanager.port", am.port, ("prometheus-alertmanager.service",))]
                  if am.enabled else [])]
    if cfg.role == "rpc_worker":
        return [("llama_rpc.port", cfg.rpc.port, ("ggml-rpc-server.service",))]
    return [("llama_server.port", cfg.server.port,
             (f"{cfg.service.name}.service", *(("docker.service",) if docker_serves else ())))]


def port_problem(field: str, port: int, ours: tuple[str, ...], holders: list[PortHolder]) -> str | None:
    """A port held by another process would make the new service fail to bind, after the old
    one stopped (or HAProxy's and Prometheus's first start fail); refused before anything
    changes, naming the process (pure). Ours: a process in the cgroup of one of ``ours`` (for
    ``docker.service``, only its ``docker-proxy``: a mode switch stops one server before the
    other starts)."""
    for h in holders:
        unit = h.cgroup.rsplit("/", 1)[-1]
        if unit in ours and (unit != "docker.service" or h.name == "docker-proxy"):
            continue
        where = f", {h.cgroup}" if h.cgroup else ""
        return (f"{field} = {port}: {h.address} is held by {h.name} (pid {h.pid}{where}) on this host; "
                "allowed: a port no other service listens on")
    return None


def compose_publishes(lines: list[str] | None) -> set[int]:
    """The host ports a compose file of the deploy's publishes (``- "ADDRESS:PORT:PORT"``,
    templates/docker) (pure)."""
    found = (re.fullmatch(r'\s*-\s*"[^"]*:(\d+):\d+"\s*', line) for line in lines or ())
    return {int(m.group(1)) for m in found if m}


def _docker_serves(cfg: HostConfig) -> bool:
    """Whether the deploy's own container may hold the server's port now: the deploy's compose
    file publishes that port. It is there from before ``compose up`` until after ``compose down``
    (a switch to native mode removes it), so a run that died anywhere between is covered too;
    ownership refuses a project directory the deploy did not make. Any other ``docker-proxy`` on
    the port publishes someone's container."""
    from llamadeploy.roles.docker import compose_path

    return cfg.server.port in compose_publishes(host.get_fact(FileContents,
                                                              path=compose_path(cfg.docker.project_dir)))


def ports_checked(cfg: HostConfig) -> None:
    """Every port this host's role listens on is free, or held by our own unit; else the run
    stops here, while pyinfra prepares, before anything changes on any host."""
    for field, port, ours in listened_ports(cfg, cfg.role == "server" and _docker_serves(cfg)):
        problem = port_problem(field, port, ours, host.get_fact(PortHolders, port=port))
        if problem:
            raise DeployError(f"preflight refused host {host.name}: {problem}")
