"""How an RPC group splits a model (pure): layers in proportion to the members' memory.

llama.cpp offloads the *last* ``-ngl`` layers to its devices (here: the workers' RPC devices,
in ``--rpc`` order) and splits those by ``--tensor-split``; the other layers, the output
layer and the KV cache of the head's layers stay on the head.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        """llama-server's flags for the split (the head's ``--n-gpu-layers`` is replaced by them)."""
        return ["--rpc", ",".join(self.endpoints), "--n-gpu-layers", str(self.offloaded),
                "--tensor-split", ",".join(str(n) for n in self.worker_layers)]


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
