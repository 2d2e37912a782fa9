"""Rollout batches: canary first, batch by count or percentage, bounded by max-unavailable (pure)."""

from __future__ import annotations

import pytest

from llamadeploy.rollout import HostOutcome, batch_count, format_table, plan_batches

HOSTS = [f"h{i}" for i in range(1, 11)]


def test_batch_count_by_number_and_percentage():
    assert batch_count("1", 10) == 1 and batch_count("4", 10) == 4
    assert batch_count("25%", 10) == 3 and batch_count("10%", 3) == 1 and batch_count("100%", 7) == 7
    assert batch_count("25%", 10, round_down=True) == 2 and batch_count("10%", 3, round_down=True) == 1
    for bad in ("0", "0%", "150%", "-2"):
        with pytest.raises(ValueError):
            batch_count(bad, 10)


def test_canaries_first_then_batches_in_inventory_order():
    batches = plan_batches(HOSTS, ["h7"], batch="4")
    assert batches == [["h7"], ["h1", "h2", "h3", "h4"], ["h5", "h6", "h8", "h9"], ["h10"]]


def test_max_unavailable_bounds_the_batch():
    assert plan_batches(HOSTS, [], batch="50%", max_unavailable="2")[0] == ["h1", "h2"]
    assert plan_batches(HOSTS, ["h1", "h2", "h3"], batch="2", max_unavailable="20%") == [
        ["h1", "h2"], ["h3"], ["h4", "h5"], ["h6", "h7"], ["h8", "h9"], ["h10"]]


def test_max_unavailable_rounds_down_and_counts_hosts_already_down():
    """25% of 10 is 2.5: at most 2 unavailable, not 3; a host already down leaves room for 1."""
    assert max(len(b) for b in plan_batches(HOSTS, [], batch="50%", max_unavailable="25%")) == 2
    assert max(len(b) for b in plan_batches(HOSTS, [], batch="50%", max_unavailable="25%", down=["h9"])) == 1
    with pytest.raises(ValueError, match=r"allows 2 of 10 host\(s\) unavailable, and 2 already are \(h3, h9\)"):
        plan_batches(HOSTS, [], batch="50%", max_unavailable="25%", down=["h3", "h9"])
    assert plan_batches(HOSTS, [], batch="2", down=["h3"]) == plan_batches(HOSTS, [], batch="2")  # no bound: no limit


def test_no_canary_group_means_batches_only_and_every_host_once():
    batches = plan_batches(HOSTS, [], batch="3")
    assert [h for b in batches for h in b] == HOSTS and all(len(b) <= 3 for b in batches)


def test_table_has_before_after_and_outcome():
    text = format_table([HostOutcome("h1", "b1-aa", "b2-bb", "updated"),
                         HostOutcome("h2", "b1-aa", "b1-aa", "rolled back", "after the switch: health HTTP 503"),
                         HostOutcome("h3", "b1-aa")])
    lines = text.splitlines()
    assert lines[0].split() == ["host", "before", "after", "outcome", "detail"]
    assert lines[2].split()[:4] == ["h2", "b1-aa", "b1-aa", "rolled"] and lines[2].endswith("health HTTP 503")
    assert lines[3].split() == ["h3", "b1-aa", "-", "not", "reached"]


def test_the_rollout_reads_the_line_a_deploy_fails_with_after_its_own_rollback():
    """The fallback's message and the rollout's reader are one contract: tested together."""
    from llamadeploy.roles.release import fell_back_reason
    from llamadeploy.rollout import fell_back_hosts

    line = f"    [10.231.1.2] Error: {fell_back_reason('10.231.1.2', 'b11434-new', 'b11434-old')}\n"
    assert fell_back_hosts(line, ["10.231.1.2", "10.231.1.21"]) == {
        "10.231.1.2": "release b11434-new failed its gate; rolled back to b11434-old, which serves now "
                      "(the gate's log lines are above)"}
    assert fell_back_hosts("    [10.231.1.2] Error: something else\n", ["10.231.1.2"]) == {}


def test_before_is_the_latest_recorded_release_not_the_manifest():
    """A run killed between moving the manifest and the gate leaves a manifest naming a release
    that never served: "before" (where a failed host returns) is the latest recorded one."""
    from llamadeploy.rollout import serving_release

    assert serving_release("b1-new", ["b1-old", "b1-prev"]) == "b1-prev"
    assert serving_release("b1-new", []) == "b1-new"  # a host from before release records
    assert serving_release(None, []) is None
