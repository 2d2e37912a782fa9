"""The test-host sandbox's bookkeeping, without booting anything: which hosts ``reap()`` stops
when two pytest-xdist workers reap at once, and the merge of a stopped host's apt overlay into
the shared archive while another worker merges too. System commands are recorded, not run."""

from __future__ import annotations

import importlib
import json
import subprocess

import pytest

#: the module (``llamadeploy.sandbox.host`` is also a function of the package, which hides it)
sandbox = importlib.import_module("llamadeploy.sandbox.host")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "STATE", tmp_path / "running.json")
    monkeypatch.setattr(sandbox, "HOSTS_DIR", tmp_path / "hosts")
    return tmp_path


def entry(index: int, owner: int) -> dict:
    return {"pid": None, "veth": f"ve-h{index}", "network": f"10.231.{index}.0/30", "index": index, "lan": None,
            "owner": owner, "overlays": {}}


def test_two_workers_reaping_at_once_stop_each_host_once(cache, monkeypatch):
    """The second worker reaps while the first is still stopping its hosts: it finds them taken
    (decided and removed from the state under its lock), not still listed, and stops none twice."""
    me, other_alive, dead = 1111, 2222, 3333
    sandbox.STATE.write_text(json.dumps({"h1": entry(1, dead), "h2": entry(2, other_alive), "h3": entry(3, me)}))
    monkeypatch.setattr(sandbox, "owner", lambda: me)
    monkeypatch.setattr(sandbox, "_alive", lambda pid: pid in (me, other_alive))
    deleted: list[str] = []

    def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        if cmd[:3] == ("ip", "link", "del"):
            deleted.append(cmd[3])
            if len(deleted) == 1:  # another worker reaps now, in the middle of this stop
                sandbox.reap()
        return subprocess.CompletedProcess(cmd, 1, "", "")  # iptables -D: no (more) rule

    monkeypatch.setattr(sandbox, "_run", run)
    sandbox.reap()
    assert sorted(deleted) == ["ve-h1", "ve-h3"]  # each once; the live worker's host left alone
    assert set(json.loads(sandbox.STATE.read_text())) == {"h2"}


def test_reap_by_name_and_everything_take_their_entries_out():
    state = {"a": entry(1, 1), "b": entry(2, 2)}
    assert set(sandbox._claimed(state, "b", False, 1, lambda pid: True)) == {"b"} and set(state) == {"a"}
    state = {"a": entry(1, 1), "b": entry(2, 2)}
    assert set(sandbox._claimed(state, None, True, 1, lambda pid: True)) == {"a", "b"} and state == {}


def test_merge_back_tolerates_files_another_worker_moved_or_placed(cache, monkeypatch):
    """Another worker merging the same overlay at once: a .deb that vanished after the listing is
    skipped, one it placed in the archive meanwhile is simply replaced, one already there is kept;
    no temporary file is left, and a second merge of the removed overlay does nothing."""
    shared = cache / "apt-archives"
    shared.mkdir()
    (shared / "kept_1.0_amd64.deb").write_text("archive's")
    upper = sandbox._upper("h1", str(shared))
    upper.mkdir(parents=True)
    for name in ("kept_1.0_amd64.deb", "new_1.0_amd64.deb", "raced_1.0_amd64.deb", "gone_1.0_amd64.deb",
                 "lock"):
        (upper / name).write_text(name)
    real_copy = sandbox.shutil.copyfile

    def copyfile(src, dst, **kw):
        if src.name == "gone_1.0_amd64.deb":  # the other worker moved it away after our listing
            src.unlink()
        if src.name == "raced_1.0_amd64.deb":  # the other worker placed it first
            (shared / src.name).write_text(src.name)
        return real_copy(src, dst, **kw)

    monkeypatch.setattr(sandbox.shutil, "copyfile", copyfile)
    overlays = {str(shared): "/var/cache/apt/archives"}
    sandbox._merge_back("h1", overlays)
    assert {f.name: f.read_text() for f in shared.iterdir()} == {
        "kept_1.0_amd64.deb": "archive's", "new_1.0_amd64.deb": "new_1.0_amd64.deb",
        "raced_1.0_amd64.deb": "raced_1.0_amd64.deb"}
    assert not (sandbox.HOSTS_DIR / "h1.overlays").exists()
    sandbox._merge_back("h1", overlays)  # the other worker's turn: nothing left to merge
    assert len(list(shared.iterdir())) == 3


def test_an_operators_host_outlives_the_command_that_booted_it():
    """The quickstart's host (kept) is not reaped when its owner is gone, as a test run's reap at
    its start would otherwise do; `sandbox down` by name or everything still stops it."""
    kept = {**entry(1, 1), "kept": True}
    state = {"demo": dict(kept), "h2": entry(2, 2)}
    assert set(sandbox._claimed(state, None, False, 99, lambda pid: False)) == {"h2"} and set(state) == {"demo"}
    assert set(sandbox._claimed({"demo": dict(kept)}, "demo", False, 99, lambda pid: False)) == {"demo"}
    assert set(sandbox._claimed({"demo": dict(kept)}, None, True, 99, lambda pid: False)) == {"demo"}


def test_a_host_runs_the_debian_release_asked_for_and_no_other():
    """``--distro trixie`` boots from trixie's own tree; a release no tree is built for is refused
    before anything is set up."""
    from llamadeploy import sandbox
    from llamadeploy.sandbox.host import CACHE, rootfs

    assert sandbox.host("tx", 9, distro="trixie").distro == "trixie"
    assert sandbox.host().distro == "bookworm"
    assert (rootfs("bookworm"), rootfs("trixie")) == (CACHE / "rootfs-bookworm", CACHE / "rootfs-trixie")
    with pytest.raises(ValueError, match="sandbox distro 'jammy': allowed bookworm, trixie"):
        sandbox.host("tx", 9, distro="jammy")
    with pytest.raises(ValueError, match="allowed bookworm, trixie"):
        rootfs("sid")


@pytest.mark.parametrize(("others", "bridge_removed"), [({}, True), ({"lp2": {"lan": "lprobe"}}, False),
                                                         ({"x": {"lan": "other"}}, True)])
def test_the_last_host_of_a_lan_removes_its_bridge(monkeypatch, others, bridge_removed):
    """systemd-nspawn removes a zone's bridge when its last container exits normally, not when it
    was killed: the last host of the LAN that stops removes it, and no earlier one does (the others
    still use it)."""
    h = importlib.import_module("llamadeploy.sandbox.host")
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(h, "_run", lambda *cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr(h, "_load_state", lambda: others)
    monkeypatch.setattr(h, "_merge_back", lambda name, overlays: None)
    h._stop("lp1", None, "vb-lp1", "10.232.231.0/24", lan="lprobe", index=231, claimed={})
    assert (("ip", "link", "del", "vz-lprobe") in calls) is bridge_removed, calls
