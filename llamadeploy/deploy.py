"""The whole deploy as one importable ``@deploy``: any pyinfra deploy can call it.

``deploy.py`` at the top of the repository is two lines around this; a site's
own deploy can do the same and add steps before or after::

    from llamadeploy.deploy import llama_server
    llama_server()
"""

from __future__ import annotations

import posixpath

from pyinfra import host
from pyinfra.api import deploy

from llamadeploy.config import HostConfig
from llamadeploy.hostdata import validate_inventory
from llamadeploy.lock import hold
from llamadeploy.manifest import manifest_path
from llamadeploy.roles import (
    docker,
    front,
    gpu,
    model,
    monitor,
    node_exporter,
    ownership,
    release,
    router,
    rpc,
    service,
    uninstall,
)
from llamadeploy.roles.build import native_build
from llamadeploy.roles.firewall import fence_entries, firewall, firewall_off, rules_path, table_name
from llamadeploy.roles.health import health_gate
from llamadeploy.roles.preflight import memory_plan, platform_checked, ports_checked


@deploy("llama-server")
def llama_server(cfg: HostConfig | None = None) -> None:
    """Make this host serve the OpenAI chat API with llama-server, as its ``llama_*`` data says.

    + cfg: the host's settings; default: validated from the inventory, all hosts at once

    Steps 1-3 run while pyinfra prepares operations, before any host changes: a
    bad setting, an unreachable model or a host that is too small stops every host.
    """
    # 1. Validate the whole inventory before any host is touched (raises ConfigError), then take
    #    the host's deploy lock (another run holding it stops this one here; llamadeploy.lock).
    cfg = cfg or validate_inventory(host.inventory)[host.name]
    platform_checked()  # a release no test covers (Debian 12 and 13 are) is refused, as a bad setting is
    _locked(cfg, "deploy")
    ports_checked(cfg)  # each port this host's role listens on: free, or held by our own unit
    if cfg.role in ("front", "monitor"):  # what it creates is recorded (a server's: in _server, with its models)
        ownership.owned(cfg, fixed=_fixed_paths(cfg))
    # Host metrics on every host when the inventory has a monitor (the node exporter, fenced to it).
    node_exporter.host_metrics(cfg)

    # The front door and the monitor are hosts of their own (llama_role).
    front_changed = None
    if cfg.role in ("front", "monitor"):  # no longer an RPC worker: its unit and fence go (a server's: rpc.group_step)
        rpc.worker_removed(name="RPC worker")
        node_exporter.gpu_metrics(cfg, on_gpu_host=False)  # nor a CUDA server: its GPU metrics timer goes
    if cfg.role == "front":
        front_changed = front.front_door(cfg)
    elif cfg.role == "monitor":
        monitor.monitor(cfg)
    else:
        _server(cfg)
    # Every host passes one last step: a front waits there until a server is up behind it; on
    # every other host it is a no-op. pyinfra orders a run as waves over each host's own sequence,
    # so a shared step is what makes the front's wait come after the servers' own steps.
    front.served(cfg, front_changed)


def _locked(cfg: HostConfig, action: str) -> None:
    """This run's lock on the host, released with an audit line when pyinfra disconnects."""
    hold(host, action, manifest_path(cfg.service.config_dir))


def _fixed_paths(cfg: HostConfig) -> list[str]:
    """The ownership record's lines for what this host's roles write at fixed paths: the node
    exporter's fence (every host of an inventory with a monitor), a front's, a monitor's or an
    RPC worker's files and fence, a server's ``allow_from`` fence."""
    lines = node_exporter.owned_entries(monitored=node_exporter.wanted(cfg),
                                        on_gpu_host=cfg.cuda and ownership.serving(cfg))
    if cfg.role == "front":
        return lines + front.owned_entries(cfg)
    if cfg.role == "monitor":
        return lines + monitor.owned_entries(cfg)
    if cfg.role == "rpc_worker":
        return lines + rpc.owned_entries(cfg)
    if cfg.server.allow_from is not None:
        return lines + fence_entries(cfg.service.name, table_name(cfg), rules_path(cfg), bound=False)
    return lines


def _server(cfg: HostConfig) -> None:
    """Steps 2-9 of a server (and an RPC worker's part of them)."""
    routed = None
    if cfg.router_mode:
        # 2-3 for several models (router mode): each resolved and planned as one; the models that
        #    can be loaded at once must fit the memory limit together.
        models = router.prepare(cfg)
        routed = router.planned(cfg, models)
        art, plan = routed.primary.art, routed.plan
    elif cfg.role != "rpc_worker":  # an RPC worker holds no model: its head sends it the layers
        # 2. The model: resolve it (Hub: pinned commit + LFS sha256); controller mode downloads
        #    and verifies it once here; the host's free disk is checked.
        art, on_host = model.prepare(cfg)

        # 3. Preflight: weights + KV cache must fit the memory limit (sizes context and slots);
        #    an RPC head's plan covers its workers, which must be reachable and on its release.
        plan = memory_plan(cfg, art)

    # What the deploy creates is recorded on the host, this run's model files included; configured
    # paths or an account it did not create are refused here, before any host changes.
    names = routed.model_files() if routed else [] if cfg.role == "rpc_worker" else [f.name for f in art.files]
    ownership.owned(cfg, placed=[posixpath.join(cfg.model_dir, n) for n in names], fixed=_fixed_paths(cfg))

    # GPU hosts (llama_build.backend "cuda"): driver and toolkit present (or installed by this run,
    # which then stops here for a reboot), GPUs read and checked against the build.
    if gpu.installed(cfg):
        return
    gpus = gpu.gpu_host(cfg)
    node_exporter.gpu_metrics(cfg, on_gpu_host=gpus is not None)  # nvidia-smi's figures for the exporter
    # 4. The runtime: build the pinned llama.cpp release (native), or the engine and image (docker).
    if cfg.mode == "native":
        runtime = native_build(cfg, gpus)
    else:
        docker.engine(cfg)
        gpu.container_runtime(cfg, gpus)
        runtime = docker.image(cfg)

    # RPC workers: ggml-rpc-server, fenced to their head; they stop here. Every other host passes
    # the same last step (a no-op), so that what follows waits for the workers (see rpc.group_step).
    rpc.group_step(cfg, runtime)
    if cfg.role == "rpc_worker":
        return

    # 5. The model on the host: sent or downloaded once, verified by sha256, renamed into place
    #    (a same-name replacement is staged by content and switched with the release, in step 6).
    placed = router.placed(cfg, routed.models) if routed else model.model_files(cfg, art, on_host)

    # 6. The service, restarted only when an input changed; the other mode's server is
    #    stopped first so the port is never held twice.
    rpc.workers_ready(cfg)  # an RPC head: its workers in this run came up (their steps ran above)
    fence = firewall(cfg)  # optional (native mode): only llama_server.allow_from reaches the port
    reloaded: list = []
    if cfg.mode == "native":
        docker.stop_compose(cfg)
        models_in = [] if routed else placed.changed  # router mode: a new model file is a reload, not a restart
        started, restarted, rid, reloaded = service.service(
            cfg, plan, art, restart_on=[*runtime, *models_in, *fence], restart_if=rpc.head_must_restart(cfg),
            gpus=gpus, staged=placed.staged, router=routed, reload_on=placed.changed if routed else None)
    else:
        docker.stop_native(cfg)
        started, restarted, rid, reloaded = docker.compose_service(
            cfg, plan, art, restart_on=[*runtime, *([] if routed else placed.changed)], gpus=gpus,
            staged=placed.staged, router=routed, reload_on=placed.changed if routed else None)

    # 7. The gate: /health must answer 200 and one chat completion come back after any (re)start;
    #    a release that fails it is rolled back to the one that served before, and the run fails.
    failed = health_gate(cfg, art.alias, after=[started, restarted, *reloaded], ignore_errors=True,
                         models=routed.served() if routed else ())
    release.fell_back(cfg, rid, failed)

    firewall_off(cfg)  # allow_from removed: the table goes only now, after the unit stopped loading it

    # 8. The release that passed the gate is recorded; releases beyond keep_releases are pruned.
    release.recorded(cfg, rid)


@deploy("llama-server model staged")
def llama_model_staged(cfg: HostConfig | None = None) -> None:
    """Only the model files on the host, verified, as a deploy would put them; nothing restarts.

    + cfg: the host's settings; default: validated from the inventory

    Stage a new model on the fleet ahead of the rollout that switches to it (the rollout
    then transfers nothing), with ``llama_transfer.mode = "fanout"`` host to host:
    ``pyinfra INVENTORY llamadeploy.deploy.llama_model_staged``
    """
    cfg = cfg or validate_inventory(host.inventory)[host.name]
    platform_checked()
    _locked(cfg, "stage")
    if cfg.role != "server":
        host.noop(f"{host.name} serves no model (llama_role {cfg.role!r})")
        return
    art, on_host = model.prepare(cfg)
    model.model_files(cfg, art, on_host)


@deploy("llama-server rollback")
def llama_server_rollback(cfg: HostConfig | None = None, to: str | None = None) -> None:
    """Reinstate a release recorded on this host: the previous one, or ``to``.

    + cfg: the host's settings (where things are); default: validated from the inventory
    + to: a release id (``llamadeploy status`` and the rollout table show them)

    Nothing is transferred or compiled: build, model files, unit and manifest are on the host.
    ``llamadeploy rollback INVENTORY [--to ID] [--limit HOST]`` runs this per host.
    """
    cfg = cfg or validate_inventory(host.inventory)[host.name]
    _locked(cfg, "rollback")
    release.rolled_back(cfg, to=to)


@deploy("llama-server front: server state")
def llama_front_servers(servers: str, set_to: str, cfg: HostConfig | None = None, by_rollout: str | bool = False,
                        wait: str | bool = True) -> None:
    """On a front host: drain, enable (``ready``) or ``maint`` the named servers (comma-separated
    inventory names) through HAProxy's runtime API. Rollouts call it around each batch, with
    ``by_rollout=true``: they enable only servers they drained themselves. ``wait=false``: an
    enable does not wait for the server to be up (its health checks still keep it out until it is).

    ``pyinfra INVENTORY llamadeploy.deploy.llama_front_servers servers=llm-01,llm-02 set_to=drain --limit lb1``
    (not ``state=``: pyinfra's CLI keeps that name for itself)
    """
    from llamadeploy.roles.front import server_name

    cfg = cfg or validate_inventory(host.inventory)[host.name]
    _locked(cfg, f"front: {set_to} {servers}")
    if cfg.role != "front":
        host.noop(f"{host.name} is not a front")
        return
    names = [server_name(host.inventory.get_host(n)) for n in servers.split(",") if n]
    front.servers_set(cfg, names, set_to, by_rollout=str(by_rollout).lower() in ("true", "1", "yes"),
                      wait=str(wait).lower() in ("true", "1", "yes"))


@deploy("llama-server removed")
def llama_server_removed(cfg: HostConfig | None = None, keep_models: bool = False) -> None:
    """Remove what :func:`llama_server` installed on this host, in both modes.

    + cfg: the host's settings (where things are); default: validated from the inventory
    + keep_models: keep ``<data_dir>/models`` (a later deploy then transfers nothing)

    ``pyinfra INVENTORY llamadeploy.deploy.llama_server_removed keep_models=true``
    """
    cfg = cfg or validate_inventory(host.inventory)[host.name]
    _locked(cfg, "uninstall")
    uninstall.removed(cfg, keep_models=keep_models)
