"""Router role: several models behind one llama-server (``llama_models``), native or docker mode.

Each model goes through the model role exactly as a one-model host's does (resolved, pinned,
verified, staged by content), and is planned as one (``roles/preflight``); this role adds what is
the router's own: the models that can be loaded at once must fit together, the preset INI
(``templates/router/models.ini.j2``) and the router's command line. The service role writes the
preset beside the unit (docker mode: the docker role, into a directory the container mounts, with
the paths the container sees), and the release records it, so a rollback reinstates the model set.
Its pure rules are in :mod:`.plan`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed

from llamadeploy.config import HostConfig, RouterModel
from llamadeploy.facts import CpuTopology
from llamadeploy.manifest import ServedModel
from llamadeploy.render import render
from llamadeploy.roles import model as model_role
from llamadeploy.roles.docker import CONTAINER_PORT, KEY_IN_CONTAINER, MODELS_IN_CONTAINER
from llamadeploy.roles.health import health_url
from llamadeploy.roles.model.source import ModelArtifact
from llamadeploy.roles.preflight import memory_plan, meta_for
from llamadeploy.roles.router.operations import models_reloaded
from llamadeploy.roles.router.plan import (
    Instance,
    check_args,
    instance,
    model_cfg,
    resident_problem,
    router_args,
    with_cache_ram,
)
from llamadeploy.tuning import MemoryPlan, server_args, threads, threads_batch

TEMPLATE = "router/models.ini.j2"
PRESET_FILE = "models.ini"
#: docker mode: where the container sees the host's preset directory (read-only)
PRESET_DIR_IN_CONTAINER = "/etc/llama-router"


def preset_dir(cfg: HostConfig) -> str:
    """Docker mode: the directory of the preset, which the container mounts. A directory, not the
    file: a new preset is renamed into place, and a bind mount of the file would keep the old one."""
    return f"{cfg.service.config_dir}/router"


def preset_path(cfg: HostConfig) -> str:
    """The preset on the host: beside the unit (native) or in :func:`preset_dir` (docker)."""
    return f"{preset_dir(cfg)}/{PRESET_FILE}" if cfg.mode == "docker" else f"{cfg.service.config_dir}/{PRESET_FILE}"


@dataclass(frozen=True)
class Model:
    """One of the host's models on its way: its settings, artifact and what the host holds of it."""

    entry: RouterModel
    cfg: HostConfig
    art: ModelArtifact
    on_host: model_role.OnHost


@dataclass(frozen=True)
class Router:
    """What the service role needs to run the router: its argument vector, the preset and the models."""

    models: tuple[Model, ...]
    instances: tuple[Instance, ...]
    args: list[str]
    preset: str

    @property
    def primary(self) -> Model:
        """The model the one-model fields of the manifest name (the first chat model, else the first)."""
        return next((m for m in self.models if m.entry.kind == "chat"), self.models[0])

    @property
    def plan(self) -> MemoryPlan:
        return next(i.plan for i in self.instances if i.alias == self.primary.entry.alias)

    @property
    def check_args(self) -> list[str]:
        """The router's flags and every preset key, for the binary's ``--help`` check."""
        return [*self.args, *check_args(self.instances)]

    @property
    def preset_sha256(self) -> str:
        return hashlib.sha256(self.preset.encode()).hexdigest()

    def served(self) -> list[ServedModel]:
        """What the release serves, as its manifest records it and its gate asks it."""
        return [ServedModel(alias=m.entry.alias, kind=m.entry.kind, on_demand=m.entry.load == "on_demand",
                            files={f.name: f.sha256 for f in m.art.files},
                            dimensions=meta_for(m.cfg, m.art).embedding_dims if m.entry.kind == "embedding" else None)
                for m in self.models]

    def model_files(self) -> dict[str, str]:
        return {f.name: f.sha256 for m in self.models for f in m.art.files}


def prepare(cfg: HostConfig) -> tuple[Model, ...]:
    """Resolve every model (controller downloads once per run, as for one model); no host changes."""
    out = []
    for entry in cfg.models:
        mcfg = model_cfg(cfg, entry)
        art, on_host = model_role.prepare(mcfg)
        out.append(Model(entry, mcfg, art, on_host))
    return tuple(out)


def planned(cfg: HostConfig, models: tuple[Model, ...]) -> Router:
    """Preflight for the router: each model planned as one, then every set that can be loaded at
    once must fit the memory limit together; the rest is the chat models' prompt cache. Raises
    DeployError with the numbers, before any host changes."""
    names: dict[str, tuple[str, str]] = {}
    for m in models:
        for f in m.art.files:
            other = names.setdefault(f.name, (f.sha256, m.entry.alias))
            if other[0] != f.sha256:
                raise DeployError(f"host {host.name}: llama_models {other[1]!r} and {m.entry.alias!r} both have a "
                                  f"file named {f.name} with different content (sha256 {other[0][:12]}… and "
                                  f"{f.sha256[:12]}…); allowed: one content per file name")
    cpu = host.get_fact(CpuTopology)
    docker = cfg.mode == "docker"
    instances = []
    for m in models:
        plan = memory_plan(m.cfg, m.art)
        # the path the router's child opens: in a container, under the model directory's mount
        path = f"{MODELS_IN_CONTAINER}/{m.art.first.name}" if docker else model_role.model_path(m.cfg, m.art)
        instances.append(instance(m.entry, path, server_args(m.cfg, cpu, plan, path, m.entry.alias), plan))
    instances = with_cache_ram(instances, cfg.server.cache_ram)
    why = resident_problem(instances, cfg.router.models_max, instances[0].plan.limit)
    if why:
        raise DeployError(f"preflight refused host {host.name}: {why}")
    if docker:
        args = router_args(cfg, f"{PRESET_DIR_IN_CONTAINER}/{PRESET_FILE}", threads(cfg, cpu), threads_batch(cfg, cpu),
                           bind=("0.0.0.0", CONTAINER_PORT), key_path=KEY_IN_CONTAINER)
    else:
        args = router_args(cfg, preset_path(cfg), threads(cfg, cpu), threads_batch(cfg, cpu))
    text = render(TEMPLATE, release_key=cfg.build.release_key(), sections=[(i.alias, i.options) for i in instances])
    return Router(models, tuple(instances), args, text)


def reloaded(cfg: HostConfig, router: Router, key_file: str | None, changed: list[OperationMeta],
             started: OperationMeta, restarted: OperationMeta) -> OperationMeta:
    """The router re-reads its presets (``GET /models?reload=1``) when ``changed`` (the preset, new
    model files) did, unless the server was started or restarted in this run (it read them then).
    The service role's (native) and the docker role's step alike."""
    return models_reloaded(
        name="Router re-reads its presets (only changed models reload)",
        base=health_url(cfg.server.host, cfg.server.port, ""),
        startup=[m.entry.alias for m in router.models if m.entry.load == "startup"],
        key_file=key_file if cfg.server.api_key is not None else None,
        _if=[any_changed(*changed), lambda: not started.did_change(), lambda: not restarted.did_change(),
             # a (re)start systemd refused: no server to ask; the gate judges it (roles/service)
             lambda: not started.did_error(), lambda: not restarted.did_error()])


def placed(cfg: HostConfig, models: tuple[Model, ...]) -> model_role.Placed:
    """Every model's files on the host (the model role's own steps, once per file: two models may
    share one file, e.g. a chat and an embedding instance of the same GGUF)."""
    seen: set[tuple[str, str]] = set()
    done = []
    for m in models:
        files = {(f.name, f.sha256) for f in m.art.files}
        if not files <= seen:
            done.append(model_role.model_files(m.cfg, m.art, m.on_host))
        seen |= files
    return model_role.Placed([op for p in done for op in p.changed], tuple(f for p in done for f in p.staged))
