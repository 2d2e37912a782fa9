"""Preflight: refuse a host whose memory cannot hold the model plus a minimal KV cache.

Runs while pyinfra prepares operations, before any operation of any host
executes, so a refused host leaves every host untouched.
"""

from __future__ import annotations

from functools import lru_cache

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.facts.hardware import Memory

from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology
from llamadeploy.gguf_meta import ModelMeta, read_meta
from llamadeploy.tuning import MemoryPlan, PreflightError, plan_memory


@lru_cache(maxsize=16)
def model_meta(path: str) -> ModelMeta:
    """GGUF header of a controller file, read once per run for all hosts."""
    return read_meta(path)


def memory_plan(cfg: HostConfig) -> MemoryPlan:
    """Context size and slots for this host, or a DeployError with the numbers."""
    host_bytes = int(host.get_fact(Memory)) * (1 << 20)  # the fact is in MiB
    try:
        return plan_memory(cfg, model_meta(cfg.model.path), host_bytes, host.get_fact(CpuTopology))
    except PreflightError as exc:
        raise DeployError(f"preflight refused host {host.name}: {exc}") from None
