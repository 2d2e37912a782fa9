"""Preflight: refuse a host whose memory cannot hold the model plus a minimal KV cache.

Runs while pyinfra prepares operations, before any operation of any host
executes, so a refused host leaves every host untouched.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

from pyinfra import host
from pyinfra.api import DeployError

from llamadeploy.catalog import CATALOG
from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology
from llamadeploy.gguf_meta import ModelMeta, read_meta
from llamadeploy.roles.model.source import ModelArtifact
from llamadeploy.roles.preflight.facts import HostMemory
from llamadeploy.tuning import MemoryPlan, PreflightError, plan_memory


@lru_cache(maxsize=16)
def model_meta(path: str) -> ModelMeta:
    """GGUF header of a controller file, read once per run for all hosts."""
    return read_meta(path)


def meta_for(cfg: HostConfig, art: ModelArtifact) -> ModelMeta:
    """GGUF header values: from the controller's copy, else from the catalog.

    A split model keeps its metadata in the first part; its size is all parts.
    """
    if art.first.local:
        return dataclasses.replace(model_meta(art.first.local), file_size=art.size)
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
    try:
        return plan_memory(cfg, meta_for(cfg, art), mem.usable, host.get_fact(CpuTopology), mem.memlock_ceiling)
    except PreflightError as exc:
        raise DeployError(f"preflight refused host {host.name}: {exc}") from None
