"""Releases: ids, what is pruned, which release a rollback picks, the records fact (pure)."""

from __future__ import annotations

import pytest
from pyinfra.api import DeployError

from llamadeploy.manifest import Manifest, release_id
from llamadeploy.roles.release.facts import ReleaseRecord, ReleaseRecords
from llamadeploy.roles.release.plan import prune_plan
from tests.conftest import LOCAL_TIMEOUT


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
                      ["a.gguf", ".a.gguf.sha256", "b.gguf", "c.gguf", "notes.txt", "operators.gguf",
                       ".operators.gguf.sha256"], protected_build="k3")
    assert plan.records == ["r1"]
    assert plan.builds == ["k1"]  # k2 serves r2 and r3; a build being written is never judged
    # only what a recorded release brought: an operator's own files stay, GGUF or not
    assert plan.models == [".a.gguf.sha256", "a.gguf"]
    assert prune_plan(records, "r4", 3, ["k1", "k2", "k3"], ["a.gguf"]).empty


def test_prune_drops_a_file_only_a_failed_release_brought():
    """A release that failed its gate is in no release record; the ownership record names its
    model file, so the next prune removes it (and its hash record) instead of keeping it forever."""
    records = [rec("r1", 1, "k1", "a.gguf"), rec("r2", 2, "k1", "b.gguf")]
    entries = ["a.gguf", "b.gguf", "failed.gguf", ".failed.gguf.sha256", "operators.gguf"]
    assert prune_plan(records, "r2", 1, ["k1"], entries).models == []  # before: no one's, kept forever
    plan = prune_plan(records, "r2", 1, ["k1"], entries, placed=["a.gguf", "b.gguf", "failed.gguf"])
    assert plan.models == [".failed.gguf.sha256", "failed.gguf"]  # a.gguf: kept release r1 runs it
    # a file the ownership record names that a kept release runs stays
    assert "a.gguf" not in prune_plan(records, "r2", 1, ["k1"], entries, placed=["a.gguf"]).models


def test_prune_drops_kept_model_content_no_kept_release_runs():
    def with_sha(rid: str, activated: int, sha: str) -> ReleaseRecord:
        r = rec(rid, activated, "k1", "m.gguf")
        return ReleaseRecord(rid, activated, r.manifest.model_copy(update={"model_files": {"m.gguf": sha}}))

    # three releases ran three contents of the same file name; r1's and r2's were kept aside
    records = [with_sha("r1", 1, "1" * 64), with_sha("r2", 2, "2" * 64), with_sha("r3", 3, "3" * 64)]
    plan = prune_plan(records, "r3", 1, ["k1"], ["m.gguf"], protected_build="k1", kept_models=["1" * 64, "2" * 64])
    assert (plan.records, plan.models, plan.kept) == (["r1"], [], ["1" * 64])  # the name serves r3: it stays


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
    image = "sha256:" + "c" * 64
    out = ReleaseRecords().process([f"3 r1 - {m}", f"1 r0 {image} {m}", "garbage", f"x r2 - {m}",
                                    "2 r3 - {not json", f"4 r4  {m}"])
    assert [(r.id, r.activated, r.image_id) for r in out] == [("r0", 1, image), ("r1", 3, None), ("r4", 4, None)]


def test_records_fact_reads_a_real_records_tree(tmp_path):
    """The fact's shell command against directories as release_recorded leaves them."""
    import subprocess

    m = rec("r1", 1, "k1", "a.gguf").manifest.render()
    for rid, act, image in (("r1", "2", None), ("r2", "1", "sha256:" + "d" * 64), ("r3.partial", "9", None)):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "deploy.json").write_text(m)
        (tmp_path / rid / "activated").write_text(act + "\n")
        if image:
            (tmp_path / rid / "image.id").write_text(image + "\n")
    fact = ReleaseRecords()
    out = subprocess.run(["sh", "-c", fact.command(str(tmp_path))], capture_output=True, text=True, check=True,
                         timeout=LOCAL_TIMEOUT)
    assert [(r.id, r.activated, r.image_id) for r in fact.process(out.stdout.splitlines())] == [
        ("r2", 1, "sha256:" + "d" * 64), ("r1", 2, None)]


def test_prune_drops_images_only_pruned_releases_ran():
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    records = [ReleaseRecord("r1", 1, rec("r1", 1, "k1", "a.gguf").manifest, a),
               ReleaseRecord("r2", 2, rec("r2", 2, "k1", "a.gguf").manifest, b),
               ReleaseRecord("r3", 3, rec("r3", 3, "k1", "a.gguf").manifest, b),
               ReleaseRecord("r4", 4, rec("r4", 4, "k1", "a.gguf").manifest, None)]  # a native release
    plan = prune_plan(records, "r3", 1, [], ["a.gguf"])  # kept: r3 and r4 (activated last)
    assert (plan.records, plan.images) == (["r1", "r2"], [(a, ())])  # r2's image is r3's: it stays
    assert prune_plan(records, "r3", 3, [], ["a.gguf"]).empty
    records[3] = ReleaseRecord("r4", 4, records[3].manifest, a)  # a kept release runs a: it stays
    assert prune_plan(records, "r3", 1, [], ["a.gguf"]).images == []
    # an upgrade: r1 ran a under the old version's tag, which no kept release uses: untagged first
    old = records[0].manifest.model_copy(update={"image": "llama:b1"})
    records = [ReleaseRecord("r1", 1, old, a), *records[1:3]]
    assert prune_plan(records, "r3", 1, [], ["a.gguf"]).images == [(a, ("llama:b1",))]


@pytest.mark.parametrize(("ref", "version"), [
    ("llamactl/llama-server:b11434-test", "b11434-test"),
    ("ghcr.io/ggml-org/llama.cpp:server-b4000@sha256:" + "2" * 64, "server-b4000"),
    ("registry:5000/llama", "latest"),
    ("registry:5000/llama@sha256:" + "3" * 64, "digest"),
    ("registry:5000/team/llama:v1+cpu", "v1-cpu"),
])
def test_docker_release_version_is_the_tag(ref, version):
    from llamadeploy.roles.docker import release_version

    assert release_version(ref) == version


def test_uninstall_leaves_model_files_no_release_brought():
    from llamadeploy.roles.release.plan import foreign_model_entries

    entries = [".a.gguf.llamadeploy-stage", ".a.gguf.sha256", ".kept", "a.gguf", "a.gguf.partial", "b.gguf",
               "mine.gguf", ".mine.gguf.sha256", "notes.txt"]
    assert foreign_model_entries(entries, {"a.gguf", "b.gguf"}) == ["mine.gguf", ".mine.gguf.sha256", "notes.txt"]
    assert foreign_model_entries(["a.gguf", ".kept"], {"a.gguf"}) == []


def test_pruned_files_leave_the_ownership_record_whole_lines_only(tmp_path):
    """The shell that drops pruned files' lines from the ownership record, run on a real file:
    only the named lines go (not a longer path that starts the same), and a record of only those
    lines becomes empty instead of failing the operation."""
    import subprocess

    from llamadeploy.roles.release.operations import record_lines_dropped
    record = tmp_path / "llama-server.owned"
    record.write_text("dir /m\nfile /m/a.gguf\nfile /m/a.gguf.bak\nfile /m/b.gguf\n")
    subprocess.run(["sh", "-c", record_lines_dropped(str(record), ["file /m/a.gguf", "file /m/b.gguf"])],
                   check=True, timeout=LOCAL_TIMEOUT)
    assert record.read_text() == "dir /m\nfile /m/a.gguf.bak\n"
    assert oct(record.stat().st_mode & 0o777) == "0o644"
    subprocess.run(["sh", "-c", record_lines_dropped(str(record), ["dir /m", "file /m/a.gguf.bak"])],
                   check=True, timeout=LOCAL_TIMEOUT)
    assert record.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["llama-server.owned"]
