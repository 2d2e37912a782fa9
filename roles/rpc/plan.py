"""How an RPC group splits a model (pure): layers in proportion to the members' memory.

llama.cpp (b11434, ``src/llama-model.cpp``) offloads the last ``-ngl`` of ``n_layer + 1``
slots to its devices, the extra slot being the output layer: with ``-ngl W + 1`` the head keeps
the first ``n_layer - W`` blocks (and their KV cache), the workers' RPC devices (in ``--rpc``
order) get the last ``W`` blocks as ``--tensor-split`` says, and the last worker also the output
layer (for models with tied embeddings a copy of the token embeddings: often the biggest tensor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamadeploy.config import HostConfig
    from llamadeploy.facts import CpuInfo
    from llamadeploy.gguf_meta import ModelMeta
    from llamadeploy.tuning import MemoryPlan

MIB = 1 << 20
#: what a worker needs besides the layers it holds: ggml-rpc-server, its compute buffers
WORKER_OVERHEAD = 96 * MIB


@dataclass(frozen=True)
class Member:
    name: str
    endpoint: str  #: ``address:port`` (workers); "" for the head
    memory: int  #: its memory limit in bytes


@dataclass(frozen=True)
class RpcSplit:
    endpoints: tuple[str, ...]
    head_layers: int
    worker_layers: tuple[int, ...]

    @property
    def offloaded(self) -> int:
        return sum(self.worker_layers)

    def args(self) -> list[str]:
        """llama-server's flags for the split (the head's ``--n-gpu-layers`` is replaced by them):
        one slot more than the offloaded blocks, the output layer, counted to the last worker."""
        slots = [*self.worker_layers[:-1], self.worker_layers[-1] + 1]
        return ["--rpc", ",".join(self.endpoints), "--n-gpu-layers", str(self.offloaded + 1),
                "--tensor-split", ",".join(str(n) for n in slots)]


def split_layers(n_layers: int, head: Member, workers: list[Member], fixed: list[int] | None = None) -> RpcSplit:
    """Layers per member in proportion to memory (largest remainders), or ``fixed`` (head first).

    Raises ValueError when ``fixed`` does not name one count per member or does not add up.
    """
    members = [head, *workers]
    if fixed is not None:
        if len(fixed) != len(members) or sum(fixed) != n_layers:
            raise ValueError(f"llama_rpc.split {fixed} must give {len(members)} layer counts (head first) "
                             f"adding up to the model's {n_layers} layers")
        counts = list(fixed)
    else:
        total = sum(m.memory for m in members)
        exact = [n_layers * m.memory / total for m in members]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(members)), key=lambda i: exact[i] - counts[i], reverse=True)[:n_layers - sum(counts)]:
            counts[i] += 1
    return RpcSplit(tuple(w.endpoint for w in workers), counts[0], tuple(counts[1:]))


def group_budget(workers: list[Member]) -> int:
    """Memory the workers add to the head's for weights and KV cache."""
    return sum(max(0, w.memory - WORKER_OVERHEAD) for w in workers)


def plan_group(cfg: HostConfig, meta: ModelMeta, host_memory: int, cpu: CpuInfo, memlock_ceiling: int | None,
               workers: list[Member]) -> MemoryPlan:
    """The head's memory plan over its group: context and slots against the head's and the
    workers' memory, the split, and a prompt cache sized from the head's own share (pure; the
    deploy's preflight and ``llamadeploy status`` both use it, so they agree on the flags).

    Raises ``PreflightError`` with the numbers, like :func:`llamadeploy.tuning.plan_memory`.
    """
    from llamadeploy.tuning import PreflightError, cache_ram_mib, plan_memory

    plan = plan_memory(cfg, meta, host_memory, cpu, memlock_ceiling, workers_memory=group_budget(workers))
    head = Member("head", "", plan.limit - group_budget(workers))
    try:
        split = split_layers(meta.n_layers, head, workers, cfg.rpc.split)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    # the prompt cache lives in the head's RAM: sized from the head's limit and its share
    frac = split.head_layers / max(1, meta.n_layers)
    own = dataclasses.replace(plan, limit=head.memory, model_bytes=int(plan.model_bytes * frac),
                              kv_bytes_per_token=int(plan.kv_bytes_per_token * frac))
    return dataclasses.replace(plan, rpc=split, cache_ram_mib=cache_ram_mib(cfg, own))
