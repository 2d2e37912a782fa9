"""Releases: ids, what is pruned, which release a rollback picks, the records fact (pure)."""

from __future__ import annotations

import pytest
from pyinfra.api import DeployError

from llamadeploy.manifest import Manifest, release_id
from llamadeploy.roles.release.facts import ReleaseRecord, ReleaseRecords
from llamadeploy.roles.release.plan import prune_plan


def rec(rid: str, activated: int, build: str, *models: str) -> ReleaseRecord:
    m = Manifest.model_validate({
        "mode": "native", "unit": "llama-server", "host": "0.0.0.0", "port": 8080, "alias": "g",
        "model_path": f"/m/{models[0]}", "model_files": {n: "a" * 64 for n in models}, "release": build,
        "release_id": rid, "args": [], "memory_plan": {"limit": 1, "model_bytes": 1, "kv_bytes_per_token": 1,
                                                       "ctx_size": 512, "parallel": 1}})
    return ReleaseRecord(rid, activated, m)


def test_release_id_follows_manifest_and_unit():
    a = release_id("b1", "{m}", "[Unit]")
    assert a.startswith("b1-") and len(a) == 15
    assert a == release_id("b1", "{m}", "[Unit]")
    assert a != release_id("b1", "{m}", "[Unit]\n") and a != release_id("b1", "{n}", "[Unit]")


def test_prune_keeps_current_and_n_previous_with_their_files():
    records = [rec("r1", 1, "k1", "a.gguf"), rec("r2", 2, "k2", "b.gguf"), rec("r3", 3, "k2", "c.gguf"),
               rec("r4", 4, "k3", "c.gguf")]
    plan = prune_plan(records, "r4", 2, ["k1", "k2", "k3", "k9.partial"],
                      ["a.gguf", ".a.gguf.sha256", "b.gguf", "c.gguf", "notes.txt"], protected_build="k3")
    assert plan.records == ["r1"]
    assert plan.builds == ["k1"]  # k2 serves r2 and r3; a build being written is never judged
    assert plan.models == [".a.gguf.sha256", "a.gguf"]  # foreign files stay
    assert prune_plan(records, "r4", 3, ["k1", "k2", "k3"], ["a.gguf"]).empty


def test_prune_after_rollback_counts_activation_not_age():
    # r1 was reinstated by a rollback (activated last): r2 is the previous one now, r3 the oldest
    records = [rec("r1", 5, "k1", "a.gguf"), rec("r2", 2, "k2", "b.gguf"), rec("r3", 4, "k3", "c.gguf")]
    plan = prune_plan(records, "r1", 1, ["k1", "k2", "k3"], ["a.gguf", "b.gguf", "c.gguf"], protected_build="k1")
    assert (plan.records, plan.builds, plan.models) == (["r2"], ["k2"], ["b.gguf"])


def test_prune_judges_nothing_before_the_current_release_is_recorded():
    assert prune_plan([rec("r1", 1, "k1", "a.gguf")], "r2", 0, ["k1"], ["a.gguf"]).empty


def test_rollback_picks_the_latest_other_release_or_the_named_one(monkeypatch):
    from llamadeploy.roles import release

    monkeypatch.setattr(release, "host", type("H", (), {"name": "h1"})())
    records = [rec("r1", 1, "k1", "a.gguf"), rec("r2", 3, "k2", "b.gguf"), rec("r3", 2, "k3", "c.gguf")]
    records.sort(key=lambda r: r.activated)
    assert release.choose(records, "r2", None).id == "r3"
    assert release.choose(records, "r2", "r1").id == "r1"
    with pytest.raises(DeployError, match=r"host h1: no release 'r9' recorded \(recorded: r2, r3, r1\)"):
        release.choose(records, "r2", "r9")
    with pytest.raises(DeployError, match="no earlier release recorded to roll back to"):
        release.choose([r for r in records if r.id == "r2"], "r2", None)


def test_records_fact_parses_lines_and_orders_by_activation():
    m = rec("r1", 1, "k1", "a.gguf").manifest.render().replace("\n", "")
    out = ReleaseRecords().process([f"3 r1 {m}", f"1 r0 {m}", "garbage", f"x r2 {m}", "2 r3 {not json"])
    assert [(r.id, r.activated) for r in out] == [("r0", 1), ("r1", 3)]
