"""The RPC split (pure): layers by memory, the flags llama-server gets, the group's budget."""

from __future__ import annotations

import pytest

from llamadeploy.roles.rpc.plan import WORKER_OVERHEAD, Member, group_budget, split_layers

MIB = 1 << 20


def test_layers_follow_memory_and_add_up():
    head = Member("h", "", 640 * MIB)
    workers = [Member("w1", "10.0.0.2:50052", 512 * MIB), Member("w2", "10.0.0.3:50052", 512 * MIB)]
    split = split_layers(18, head, workers)
    assert (split.head_layers, split.worker_layers) == (7, (6, 5))
    assert split.head_layers + split.offloaded == 18
    # 11 blocks + the output layer offloaded; the head keeps 18 + 1 - 12 = 7 blocks
    assert split.args() == ["--rpc", "10.0.0.2:50052,10.0.0.3:50052", "--n-gpu-layers", "12",
                            "--tensor-split", "6,6"]


def test_a_bigger_worker_gets_more():
    split = split_layers(32, Member("h", "", 1024 * MIB),
                         [Member("a", "a:1", 1024 * MIB), Member("b", "b:1", 2048 * MIB)])
    assert split.worker_layers == (8, 16) and split.head_layers == 8


def test_fixed_split_wins_and_is_checked():
    head, workers = Member("h", "", 1), [Member("w", "w:1", 1)]
    assert split_layers(18, head, workers, [2, 16]).worker_layers == (16,)
    with pytest.raises(ValueError, match="must give 2 layer counts"):
        split_layers(18, head, workers, [18])
    with pytest.raises(ValueError, match="adding up to the model's 18 layers"):
        split_layers(18, head, workers, [1, 1])


def test_group_budget_keeps_each_workers_overhead():
    assert group_budget([Member("w", "w:1", 512 * MIB), Member("v", "v:1", 10 * MIB)]) == 512 * MIB - WORKER_OVERHEAD
