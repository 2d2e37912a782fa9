"""The deploy lock's and the audit trail's host commands, run by a real shell against a temporary
directory, and their pure parts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llamadeploy import audit, lock


@pytest.fixture
def lockfile(tmp_path, monkeypatch):
    path = tmp_path / "lock" / "llamadeploy.lock"
    monkeypatch.setattr(lock, "LOCK_PATH", str(path))
    return path


def sh(command: str) -> str:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True, timeout=30).stdout


def holder(run: str, pid: int | None = None) -> lock.Holder:
    pid = pid or os.getpid()
    return lock.Holder(run, "alice", socket.gethostname(), pid, lock.process_start(pid) or "", 1_760_000_000.0,
                       "deploy")


def test_take_is_exclusive_and_names_the_holder(lockfile):
    assert lock.parse_take(sh(lock.take_command(holder("aaaa")))) == (True, None)
    taken, other = lock.parse_take(sh(lock.take_command(holder("bbbb"))))
    assert not taken and other == holder("aaaa")
    assert list(lockfile.parent.iterdir()) == [lockfile]  # no temporary file left behind


def test_of_many_simultaneous_takes_exactly_one_wins(lockfile):
    runs = [f"run{i:02d}" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda r: lock.parse_take(sh(lock.take_command(holder(r)))), runs))
    winners = [r for r, (taken, _) in zip(runs, results, strict=True) if taken]
    assert len(winners) == 1
    assert all(other == holder(winners[0]) for taken, other in results if not taken)
    assert lock.Holder.from_json(lockfile.read_text()) == holder(winners[0])


def test_release_removes_only_its_own_runs_lock(lockfile):
    sh(lock.take_command(holder("aaaa")))
    sh(lock.release_command("aaa"))  # a prefix of the holder's run is another run
    sh(lock.release_command("bbbb"))
    assert lockfile.exists()
    sh(lock.release_command("aaaa"))
    assert not lockfile.exists()
    sh(lock.release_command("aaaa"))  # released twice: no error
    sh(lock.take_command(holder("cccc")))
    sh(lock.release_command(None))  # `lock release --force`
    assert not lockfile.exists()


def test_a_holder_is_alive_only_while_its_process_runs():
    assert holder("x").alive() is True
    child = subprocess.Popen(["sleep", "30"])
    try:
        running = holder("y", child.pid)
        assert running.alive() is True
    finally:
        child.kill()
        child.wait(timeout=10)
    assert running.alive() is False
    reused = lock.Holder("z", "alice", socket.gethostname(), os.getpid(), "1", 0.0, "deploy")
    assert reused.alive() is False  # the pid runs, but it is another process (started later)
    elsewhere = lock.Holder("w", "bob", "other-controller.example", 1, "1", 0.0, "rollout")
    assert elsewhere.alive() is None
    assert "dead: its process is gone" in running.describe()
    assert elsewhere.describe(now=60.0) == ("rollout by bob@other-controller.example (pid 1), "
                                            "since 1970-01-01 00:00:00Z (60 s), run w")


def test_parse_take_of_unexpected_output():
    assert lock.parse_take("") == (False, None)
    assert lock.parse_take("held\n") == (False, None)  # released between ln and cat: try again
    assert lock.parse_take("held\nnot json") == (False, None)


class FakeHost:
    """Runs the lock's commands in a local shell, as a pyinfra host would on its own."""

    name = "h1"

    def __init__(self) -> None:
        self.calls = 0


def test_acquire_waits_for_a_held_lock_then_refuses_naming_it(lockfile, monkeypatch):
    monkeypatch.setattr(lock, "run_on", lambda host, cmd: (setattr(host, "calls", host.calls + 1), sh(cmd))[1])
    sh(lock.take_command(holder("other")))
    host = FakeHost()
    slept: list[float] = []
    # the clock advances only by what acquire sleeps, however slow the machine: with a real 0.05 s
    # wait, a loaded CI host's first take outlasted the wait and acquire (rightly) never slept
    clock = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    with pytest.raises(lock.LockHeld, match=r"h1: locked by deploy by alice@.* run other; nothing was changed"):
        lock.acquire(host, holder("mine"), wait=3 * lock.POLL, sleep=sleep, clock=lambda: clock[0])
    assert slept == [lock.POLL] * 3 and host.calls == 4  # a take, then one after each poll until the wait is out
    assert lock.acquire(host, holder("other")) is False  # the holder's own run: already held
    sh(lock.release_command("other"))
    assert lock.acquire(host, holder("mine")) is True


def test_audit_lines_append_and_read_back_newest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "AUDIT_PATH", str(tmp_path / "log" / "audit.log"))
    first = audit.Entry(100.0, "alice", "ctl", "deploy", "r1", None, "b1-aaa", "ok", 12)
    second = audit.Entry(200.0, "bob", "ctl", "rollout", "r2", "b1-aaa", "b1-aaa", "failed", 3, tried="b1-bad")
    sh(audit.append_command(first))
    sh(audit.append_command(second))
    assert oct((tmp_path / "log").stat().st_mode & 0o777) == "0o750"
    assert oct((tmp_path / "log" / "audit.log").stat().st_mode & 0o777) == "0o640"
    entries = audit.parse("h1", sh(audit.read_command(50)) + "garbage\n")
    assert [e.run for e in entries] == ["r1", "r2"] and entries[0].host == "h1"
    other = audit.parse("h2", sh(audit.read_command(1)))
    assert [e.run for e in other] == ["r2"]
    ordered = audit.newest_first([entries, other])
    assert [(e.host, e.run) for e in ordered] == [("h1", "r2"), ("h2", "r2"), ("h1", "r1")]
    table = audit.format_table(ordered).splitlines()
    assert table[0].split() == ["time", "host", "operator", "action", "before", "after", "tried", "outcome", "changes",
                                "run"]
    # a failed rollout's line names the release that failed, beside the one the host is back on
    assert table[1].split() == ["1970-01-01", "00:03:20Z", "h1", "bob@ctl", "rollout", "b1-aaa", "b1-aaa", "b1-bad",
                                "failed", "3", "r2"]
    assert table[3].split() == ["1970-01-01", "00:01:40Z", "h1", "alice@ctl", "deploy", "-", "b1-aaa", "-", "ok", "12",
                                "r1"]


def test_an_audit_line_with_quotes_and_newlines_stays_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "AUDIT_PATH", str(tmp_path / "audit.log"))
    nasty = audit.Entry(1.0, "o'brien\n$(touch x)", "ctl", "front: drain a,b", "r", None, None, "ok", 0)
    sh(f"cd {tmp_path} && " + audit.append_command(nasty))
    assert not (tmp_path / "x").exists()
    (line,) = (tmp_path / "audit.log").read_text().splitlines()
    assert audit.Entry.from_json("h", line) == audit.Entry(**{**nasty.__dict__, "host": "h"})


def test_release_of_a_manifest():
    assert audit.release_of(json.dumps({"release_id": "b11434-abc"})) == "b11434-abc"
    assert audit.release_of("") is None and audit.release_of("[]") is None
    assert audit.release_of(json.dumps({"release_id": None})) is None


def test_steps_of_a_cli_command_are_named_after_it(monkeypatch):
    """Under ``rollout``'s fleet lock its deploys are "rollout" and its automatic rollback
    "rollout/rollback"; without one, each run is what it is."""
    monkeypatch.delenv(lock.ENV_ACTION, raising=False)
    assert lock.me("rollback").action == "rollback"
    monkeypatch.setenv(lock.ENV_ACTION, "rollout")
    assert [lock.me(a).action for a in ("deploy", "rollout", "rollback")] == ["rollout", "rollout", "rollout/rollback"]
    monkeypatch.setenv(lock.ENV_ACTION, "rollback")
    assert lock.me("rollback").action == "rollback"


def test_a_run_ended_by_an_operations_exception_is_failed_not_interrupted():
    """An operation that raises at execution ends pyinfra's run without marking its host failed
    (a deploy whose gate failed and that rolled back): the audit says failed; Ctrl-C says
    interrupted; a prepare-time stop changed nothing."""
    # failed, before_execute, executing, op_unfinished, sigint
    assert lock.outcome_of(False, False, True, True, False) == "failed"
    assert lock.outcome_of(False, False, True, True, True) == "interrupted"
    assert lock.outcome_of(True, False, False, False, False) == "failed"
    assert lock.outcome_of(False, True, False, False, False) == "stopped before any change"
    assert lock.outcome_of(False, False, False, False, False) == "ok"


def test_the_fleet_lock_is_all_or_nothing_and_waits_as_asked(tmp_path, monkeypatch):
    """``fleet_held`` (a rollout's, a rollback's) on three hosts, each its own lock file: one held
    by another run refuses the whole command and the locks taken before it go again; with a wait
    it takes them once the other run has let go; held, the pyinfra runs it starts find its run
    id; at the end every lock it took goes."""
    from contextlib import contextmanager

    import llamadeploy.status

    monkeypatch.setattr(lock, "LOCK_PATH", "/LOCKDIR/llamadeploy.lock")
    hosts = []
    for i in (1, 2, 3):
        h = FakeHost()
        h.name, h.dir = f"h{i}", tmp_path / f"h{i}"  # type: ignore[attr-defined]
        hosts.append(h)

    def on(h, command: str) -> str:
        return sh(command.replace("/LOCKDIR", str(h.dir)))

    @contextmanager
    def connected(inventory, **_kw):
        yield hosts, {}

    monkeypatch.setattr(lock, "run_on", on)
    monkeypatch.setattr(llamadeploy.status, "connected", connected)
    monkeypatch.delenv(lock.ENV_RUN, raising=False)
    held = [h.dir / "llamadeploy.lock" for h in hosts]
    on(hosts[2], lock.take_command(holder("other")))
    with pytest.raises(lock.LockHeld, match=r"h3: locked by deploy by alice@"):
        with lock.fleet_held("inv.py", "rollout", log=lambda m: None):
            pytest.fail("ran without the fleet's lock")
    assert [p.exists() for p in held] == [False, False, True]  # h1's and h2's taken, then released

    import threading

    monkeypatch.setattr(lock, "POLL", 0.05)
    let_go = threading.Timer(0.5, lambda: on(hosts[2], lock.release_command("other")))  # the other run ends
    started = time.monotonic()  # before the timer starts: a stall between the two cannot shorten the wait seen
    let_go.start()
    try:
        with lock.fleet_held("inv.py", "rollout", wait=60, log=lambda m: None) as run:
            assert time.monotonic() - started >= 0.5  # it waited for the other run
            assert all(p.exists() for p in held)
            assert all(lock.Holder.from_json(p.read_text()).run == run for p in held)
            assert os.environ[lock.ENV_RUN] == run
    finally:
        let_go.cancel()
    assert not any(p.exists() for p in held) and lock.ENV_RUN not in os.environ


@pytest.mark.parametrize("command", ["rollout", "rollback"])
def test_lock_wait_reaches_the_fleet_lock(monkeypatch, command):
    """``--lock-wait SECONDS`` on rollout and rollback is the wait fleet_held is given."""
    from contextlib import contextmanager

    from llamadeploy import cli

    asked: list[tuple[str, str, float]] = []

    @contextmanager
    def fleet_held(inventory, action, wait=0.0, log=print):
        asked.append((inventory, action, wait))
        raise lock.LockHeld("h1: locked by someone; nothing was changed")
        yield "run"

    monkeypatch.setattr(lock, "fleet_held", fleet_held)
    monkeypatch.setattr(cli, "_terminate_as_interrupt", lambda: None)  # not this test process's SIGTERM
    assert cli.main([command, "inv.py", "--lock-wait", "90"]) == 2
    assert cli.main([command, "inv.py"]) == 2
    assert asked == [("inv.py", command, 90.0), ("inv.py", command, 0.0)]
