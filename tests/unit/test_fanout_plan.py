"""The fan-out plan (pure): holders double every round, load spreads, the controller sends once."""

from __future__ import annotations

from llamadeploy.roles.transfer.plan import plan_round, rounds_needed, seed


def simulate(hosts: list[str], holders: list[str], per_receiver: int) -> tuple[str | None, list[dict[str, list[str]]]]:
    """Run the plan to the end, every pull succeeding, as the operations do at execution."""
    needing = [h for h in hosts if h not in holders]
    holders = list(holders)
    first = seed(needing, holders)
    if first:
        needing.remove(first)
        holders.append(first)
    rounds = []
    while needing:
        plan = plan_round(needing, holders, per_receiver)
        assert plan, "a round with holders and hosts in need must move something"
        rounds.append(plan)
        for r in plan:
            needing.remove(r)
            holders.append(r)
    return first, rounds


def test_the_controller_pushes_once_and_holders_double():
    hosts = [f"h{i}" for i in range(1, 201)]
    first, rounds = simulate(hosts, [], per_receiver=4)
    assert first == "h1"
    assert [len(r) for r in rounds] == [1, 2, 4, 8, 16, 32, 64, 72]
    assert len(rounds) == rounds_needed(200) == 8


def test_a_host_that_holds_it_means_no_push():
    first, rounds = simulate(["a", "b", "c"], ["c"], per_receiver=4)
    assert first is None
    assert rounds[0] == {"a": ["c"]}


def test_every_holder_serves_at_most_its_share():
    """Each receiver pulls 1/n of the file from each of its n sources; no holder uploads more
    than one file's worth per round (round-robin sources)."""
    hosts = [f"h{i}" for i in range(1, 41)]
    _, rounds = simulate(hosts, [], per_receiver=3)
    for plan in rounds:
        load: dict[str, float] = {}
        for sources in plan.values():
            for s in sources:
                load[s] = load.get(s, 0) + 1 / len(sources)
        assert max(load.values()) <= 1 + 1e-9, load
        assert all(len(set(s)) == len(s) for s in plan.values())  # never the same peer twice


def test_sources_are_capped_and_distinct_first_choices():
    plan = plan_round(["x", "y"], ["a", "b", "c", "d", "e"], per_receiver=2)
    assert plan == {"x": ["a", "b"], "y": ["b", "c"]}


def test_nothing_to_do():
    assert plan_round([], ["a"], 4) == {}
    assert plan_round(["a"], [], 4) == {}
    assert seed([], []) is None
    assert rounds_needed(1) == 0 and rounds_needed(2) == 1 and rounds_needed(6) == 3
