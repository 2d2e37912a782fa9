"""Rollout batches: canary first, batch by count or percentage, bounded by max-unavailable (pure);
rollback's fronts step, with its pyinfra runs faked."""

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
    # the release that served, reinstated as recorded after this run's change to it failed: the
    # rollout reads it as rolled back too, and the line says what was undone
    same = fell_back_hosts(f"Error: {fell_back_reason('h1', 'b11434-cur', 'b11434-cur')}", ["h1"])
    assert same["h1"] == ("release b11434-cur failed its gate; rolled back to b11434-cur as recorded when it last "
                          "deployed (its recorded key file and fence rules replace this run's), which serves now "
                          "(the gate's log lines are above)"), same


def test_before_is_the_latest_recorded_release_not_the_manifest():
    """A run killed between moving the manifest and the gate leaves a manifest naming a release
    that never served: "before" (where a failed host returns) is the latest recorded one."""
    from llamadeploy.rollout import serving_release

    assert serving_release("b1-new", ["b1-old", "b1-prev"]) == "b1-prev"
    assert serving_release("b1-new", []) == "b1-new"  # a host from before release records
    assert serving_release(None, []) is None



#: rollback() with its pyinfra runs faked, in a child process: importing pyinfra's CLI patches the
#: interpreter with gevent, which the other tests of this process must not inherit
ROLLBACK_SCRIPT = """
import json, sys
from llamadeploy import rollout
runs = []
releases = iter([{"10.9.0.1": ("r2", "ok")}, {"10.9.0.1": (sys.argv[2], "ok")}])
def fake_run(path, limit, target="deploy", args=None, **_):
    runs.append([limit, target])
    return ({"10.9.0.9"} if limit == ["10.9.0.9"] else set()), None
rollout.run_deploy = fake_run
rollout.read_releases = lambda *a, **k: next(releases)
result = rollout.rollback(sys.argv[1], log=lambda _: None)
print(json.dumps({"runs": runs, "rows": [[r.host, r.outcome] for r in result.rows], "ok": result.ok}))
"""


@pytest.mark.parametrize("after, fronts_run", [("r1", True), ("r2", False)])
def test_a_rollback_redeploys_the_fronts_only_when_a_server_rolled_back(tmp_path, after, fronts_run):
    """``rollback``'s last step (the inventory real, its pyinfra runs faked): the fronts follow
    the release a server now serves (roles/front routing_of); nothing rolled back, no front run."""
    import json
    import subprocess
    import sys

    from llamadeploy import rollout
    from tests.conftest import LOCAL_TIMEOUT, REPO, merged_data

    inv = tmp_path / "inv.py"
    inv.write_text(f"servers = {[('10.9.0.1', merged_data())]!r}\n"
                   f"front = {[('10.9.0.9', {**merged_data(), 'llama_role': 'front'})]!r}\n")
    proc = subprocess.run([sys.executable, "-c", ROLLBACK_SCRIPT, str(inv), after], cwd=REPO, capture_output=True,
                          text=True, timeout=LOCAL_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["runs"][0] == [["10.9.0.1"], rollout.ROLLBACK]
    if fronts_run:
        assert [run[0] for run in out["runs"][1:]] == [["10.9.0.9"]]
        assert out["rows"] == [["10.9.0.1", "rolled back"], ["10.9.0.9", "failed"]]
        assert not out["ok"]  # a front that failed fails the rollback
    else:
        assert len(out["runs"]) == 1 and out["rows"] == [["10.9.0.1", "unchanged"]] and out["ok"]



ROLLOUT_SCRIPT = """
import json, sys
from llamadeploy import rollout
runs = []
health, fails = sys.argv[2], sys.argv[3].split(",")
def fake_run(path, limit, target="llamadeploy.deploy.llama_server", args=None, **_):
    step = target.rsplit(".", 1)[-1]
    runs.append([limit, step, [a for a in (args or []) if a.startswith(("set_to=", "wait="))]])
    who = "front" if limit == ["10.9.0.9"] else "server"
    return (set(limit) if step == "llama_server" and who in fails else set()), None
def releases(path, names, serving=False):
    if serving:
        return {n: (None if health == "nothing deployed" else "r1", health) for n in names}
    return {n: (None, "nothing deployed") if "server" in fails else ("r2", "ok") for n in names}
rollout.run_deploy = fake_run
rollout.read_releases = releases
result = rollout.rollout(sys.argv[1], log=lambda _: None)
print(json.dumps({"runs": runs, "ok": result.ok, "rows": [[r.host, r.outcome] for r in result.rows]}))
"""
FRONT, SERVER = ["10.9.0.9"], ["10.9.0.1"]
LEARN = [FRONT, "llama_server", []]
REPAIR = [FRONT, "llama_front_servers", ["set_to=ready", "wait=false"]]
DRAIN = [FRONT, "llama_front_servers", ["set_to=drain"]]
DEPLOY = [SERVER, "llama_server", []]
ENABLE = [FRONT, "llama_front_servers", ["set_to=ready"]]


def rolled_out(tmp_path, health: str, fails: str = "") -> dict:
    """``rollout`` over one server and one front, its pyinfra runs faked in a child process."""
    import json
    import subprocess
    import sys

    from tests.conftest import LOCAL_TIMEOUT, REPO, merged_data

    inv = tmp_path / "inv.py"
    inv.write_text(f"servers = {[('10.9.0.1', merged_data())]!r}\n"
                   f"front = {[('10.9.0.9', {**merged_data(), 'llama_role': 'front'})]!r}\n")
    proc = subprocess.run([sys.executable, "-c", ROLLOUT_SCRIPT, str(inv), health, fails], cwd=REPO,
                          capture_output=True, text=True, timeout=LOCAL_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("health, first", [("ok", True), ("nothing deployed", False)])
def test_a_rollout_deploys_the_fronts_before_it_drains_a_server(tmp_path, health, first):
    """The fronts learn every server before the first drain (a server they do not know has
    nothing to drain); over a fleet where nothing serves yet they are deployed at the end only.
    What an earlier rollout left marked is enabled without waiting for it to be up."""
    out = rolled_out(tmp_path, health)
    assert out["runs"] == ([LEARN] if first else []) + [REPAIR, DRAIN, DEPLOY, ENABLE, LEARN] and out["ok"], out


def test_a_front_that_cannot_learn_the_servers_stops_the_rollout_before_any_server(tmp_path):
    out = rolled_out(tmp_path, "ok", fails="front")
    assert out["runs"] == [LEARN] and not out["ok"]
    assert ["10.9.0.9", "failed"] in out["rows"] and ["10.9.0.1", "not reached"] in out["rows"]


def test_a_failed_first_deploy_leaves_no_rollout_mark_at_the_front(tmp_path):
    """A new server whose first deploy fails has nothing to return to: it is enabled again
    without a wait (it stays down at the front), so the next rollout's repair has no mark to
    wait on."""
    out = rolled_out(tmp_path, "nothing deployed", fails="server")
    assert out["runs"] == [REPAIR, DRAIN, DEPLOY, REPAIR] and not out["ok"], out
    assert out["rows"] == [["10.9.0.1", "failed"]]
