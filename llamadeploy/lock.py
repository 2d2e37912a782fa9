"""The fleet lock: one run at a time changes a fleet's hosts, and each run leaves an audit line.

Two operators who deploy the same fleet at once interleave restarts and gates, and each one's
rollback can undo the other's release. So every run that changes hosts (a deploy, a rollout's
batches, a rollback, an uninstall, staging a model) first takes a lock on each of its hosts: the
file :data:`LOCK_PATH`, made by ``ln`` of a private temporary file (link(2) fails when the name
exists: atomic, no check-then-write race), holding who, from which controller, since when and
for what (:class:`Holder`). A second run finds it, names the holder and stops before any
operation; with ``--lock-wait`` (``LLAMADEPLOY_LOCK_WAIT``) it waits for it instead.

The lock is taken while pyinfra *prepares* the run and released when pyinfra disconnects, by a
command on the host's own connection, not by an operation: a re-run with unchanged input still
reports zero changes. ``llamadeploy rollout`` and ``rollback`` take it once for the whole fleet
and hand their run id to the pyinfra runs they start (``LLAMADEPLOY_LOCK_RUN``), which then find
it theirs.

A run that dies without disconnecting (SIGKILL, a lost laptop) leaves its lock. It is never
taken over silently: ``llamadeploy lock status`` shows it, marked dead when its process is gone
from this controller, and ``llamadeploy lock release`` removes it (``--force`` for a holder that
may still live). The lock sits in ``/run/lock``: a reboot, which ends any run on the host, clears it.

At disconnect each host also appends a line to its audit trail (:mod:`llamadeploy.audit`).
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pyinfra.api.exceptions import DeployError
from pyinfra.api.state import BaseStateCallback

#: the lock file on every host (tmpfs: a reboot, which ends every run there, clears it)
LOCK_PATH = "/run/lock/llamadeploy.lock"
#: a CLI command that holds the fleet lock names its run to the pyinfra runs it starts
ENV_RUN = "LLAMADEPLOY_LOCK_RUN"
#: seconds a run waits for a held lock before it gives up (default 0: refuse at once)
ENV_WAIT = "LLAMADEPLOY_LOCK_WAIT"
#: what the audit trail calls a run (a rollout's deploys say "rollout")
ENV_ACTION = "LLAMADEPLOY_ACTION"
#: seconds between two tries while waiting
POLL = 2.0


class LockHeld(DeployError):
    """Another run holds the lock of a host; the message names it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a host's lock: what ``lock status`` shows and a refused run prints."""

    run: str  #: a random id: the runs of one rollout share it
    operator: str  #: the controller's user (``SUDO_USER`` when run with sudo)
    controller: str  #: the controller's host name
    pid: int
    #: the process's start time in clock ticks since boot (``/proc/PID/stat`` field 22): a pid
    #: reused by another process later does not look alive
    pid_start: str
    since: float  #: epoch seconds
    action: str

    def to_json(self) -> str:
        """One line, keys sorted, no spaces: ``"run":"<id>"`` is a fixed substring to match."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Holder | None:
        """The holder a lock file names; None for anything else (an empty or foreign file)."""
        try:
            d = json.loads(text)
            return cls(str(d["run"]), str(d["operator"]), str(d["controller"]), int(d["pid"]),
                       str(d["pid_start"]), float(d["since"]), str(d["action"]))
        except (ValueError, KeyError, TypeError):
            return None

    def alive(self) -> bool | None:
        """Whether the holding process still runs: only this controller can tell (None elsewhere)."""
        if self.controller != socket.gethostname():
            return None
        return process_start(self.pid) == self.pid_start

    def describe(self, now: float | None = None) -> str:
        age = int((now or time.time()) - self.since)
        when = datetime.fromtimestamp(self.since, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        state = {True: "", False: ", dead: its process is gone", None: ""}[self.alive()]
        return (f"{self.action} by {self.operator}@{self.controller} (pid {self.pid}{state}), "
                f"since {when} ({age} s), run {self.run}")


def process_start(pid: int) -> str | None:
    """Start time of a local process in clock ticks since boot; None when no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(") ", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces


def operator() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


_RUN: str | None = None


def run_id() -> str:
    """This process's run: the one a CLI command handed down, else a new one (once per process)."""
    global _RUN
    if os.environ.get(ENV_RUN):
        return os.environ[ENV_RUN]
    if _RUN is None:
        _RUN = secrets.token_hex(6)
    return _RUN


def me(action: str) -> Holder:
    """This process as a holder. Under a CLI command's fleet lock the action is the command's, and
    a step other than its deploys is named after it: a rollout's automatic rollback is
    ``rollout/rollback`` in the audit trail, its deploys ``rollout``."""
    outer = os.environ.get(ENV_ACTION)
    if outer and action not in ("deploy", outer):
        action = f"{outer}/{action}"
    elif outer:
        action = outer
    return Holder(run_id(), operator(), socket.gethostname(), os.getpid(), process_start(os.getpid()) or "",
                  time.time(), action)


def take_command(holder: Holder) -> str:
    """Take the lock, or print who holds it: ``taken``, or ``held`` and the lock file's content.

    The holder is written to a private file first and then hard-linked to the lock's name, so a
    lock never exists half-written and two runs can never both succeed.
    """
    lock = shlex.quote(LOCK_PATH)
    d = shlex.quote(os.path.dirname(LOCK_PATH))
    return (f"mkdir -p {d} && t=$(mktemp {d}/.llamadeploy.XXXXXX) && "
            f"printf '%s\\n' {shlex.quote(holder.to_json())} > \"$t\" && "
            f"if ln \"$t\" {lock} 2>/dev/null; then rm -f \"$t\"; echo taken; "
            f"else rm -f \"$t\"; echo held; cat {lock} 2>/dev/null || true; fi")


def release_command(run: str | None = None) -> str:
    """Remove the lock if ``run`` holds it (``None``: whoever does); a lock of another run stays."""
    lock = shlex.quote(LOCK_PATH)
    if run is None:
        return f"rm -f {lock}"
    needle = shlex.quote(f'"run":{json.dumps(run)}')
    return f"if grep -qF -- {needle} {lock} 2>/dev/null; then rm -f {lock}; fi; true"


def status_command() -> str:
    return f"cat {shlex.quote(LOCK_PATH)} 2>/dev/null || true"


def parse_take(output: str) -> tuple[bool, Holder | None]:
    """(taken, holder named by a held lock) from :func:`take_command`'s output (pure)."""
    lines = output.strip().splitlines()
    if lines[:1] == ["taken"]:
        return True, None
    return False, Holder.from_json("\n".join(lines[1:])) if lines[:1] == ["held"] else None


def run_on(host: Any, command: str) -> str:
    """A command on a connected pyinfra host, outside any operation (with the host's sudo)."""
    from llamadeploy.status import _run

    return _run(host, command)


def acquire(host: Any, holder: Holder, wait: float = 0.0, sleep: Callable[[float], Any] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> bool:
    """Take ``host``'s lock for ``holder``: True when taken now, False when ``holder``'s run held it
    already (a rollout's pyinfra run under the rollout's own lock). Raises :class:`LockHeld`
    naming the holder when another run keeps it past ``wait`` seconds. ``sleep`` and ``clock``
    are the waiting's time, given so that a caller (a test) can run it without the wall clock."""
    deadline = clock() + wait
    waited = False
    while True:
        taken, other = parse_take(run_on(host, take_command(holder)))
        if taken:
            return True
        if other is not None and other.run == holder.run:
            return False
        dead = other is not None and other.alive() is False
        if other is not None and (clock() >= deadline or dead):  # a dead run never ends
            hint = ("release it with `llamadeploy lock release INVENTORY`" if dead else
                    f"wait for it (--lock-wait SECONDS, or {ENV_WAIT}=SECONDS), or if that run is gone, "
                    "`llamadeploy lock release INVENTORY --force`")
            raise LockHeld(f"{host.name}: locked by {other.describe()}; nothing was changed. {hint}")
        if other is not None:
            if not waited:
                print(f"{host.name}: locked by {other.describe()}; waiting up to {wait:.0f} s", file=sys.stderr,
                      flush=True)
                waited = True
            sleep(POLL)  # (held and released between ln and cat: try again at once)


def release(host: Any, run: str) -> None:
    run_on(host, release_command(run))


# --- inside a pyinfra run: take at prepare time, release and audit at disconnect --------------

#: host name -> what this run holds there: (holder, taken by this process, release before, manifest path)
_HELD: dict[str, tuple[Holder, bool, str | None, str]] = {}


def hold(host: Any, action: str, manifest: str) -> None:
    """Take ``host``'s lock for this pyinfra run (see the module docstring), once per host, and
    see that disconnecting releases it and writes the host's audit line.

    ``manifest``: the host's manifest path; the release it names is the audit's "before".
    """
    if host.name in _HELD:
        return
    from pyinfra import state

    from llamadeploy import audit

    holder = me(action)
    if os.environ.get(ENV_RUN):
        taken = acquire(host, holder)  # the CLI's own lock is found; a free one is taken
    else:
        taken = acquire(host, holder, wait=float(os.environ.get(ENV_WAIT) or 0))
    _HELD[host.name] = (holder, taken, audit.release_of(run_on(host, audit.manifest_command(manifest))), manifest)
    if not any(isinstance(h, _Disconnect) for h in state.callback_handlers):
        state.add_callback_handler(_Disconnect())
        _watch_sigint()


#: host name -> the release this run deployed there (the audit line's ``tried``)
_TRIED: dict[str, str] = {}


def tried(host: Any, release_id: str) -> None:
    """Note the release this run brings to ``host`` (at prepare time), for its audit line."""
    _TRIED[host.name] = release_id


def _finish(state: Any, host: Any) -> None:
    """At pyinfra's disconnect: the audit line, then the lock released (if this run took it)."""
    from pyinfra.api.state import StateStage

    from llamadeploy import audit

    held = _HELD.pop(host.name, None)
    if held is None:
        return
    holder, taken, before, manifest = held
    try:
        after = audit.release_of(run_on(host, audit.manifest_command(manifest)))
    except Exception:  # noqa: BLE001 - the host went away: the audit line says so, the lock stays named
        after = None
    outcome = outcome_of(host in state.failed_hosts, state.current_stage < StateStage.Execute,
                         state.current_stage == StateStage.Execute, host.name in _OPEN, _INTERRUPTED)
    entry = audit.Entry(time=time.time(), operator=holder.operator, controller=holder.controller,
                        action=holder.action, run=holder.run, before=before, after=after, outcome=outcome,
                        changes=_executed(state, host), tried=_TRIED.pop(host.name, None))
    commands = [audit.append_command(entry)]
    if taken:
        commands.append(release_command(holder.run))
    try:
        run_on(host, " ; ".join(commands))
    except Exception as exc:  # noqa: BLE001 - the run's result stands; the operator learns the lock stayed
        print(f"{host.name}: could not write the audit line or release the lock: {exc}", file=sys.stderr)


def outcome_of(failed: bool, before_execute: bool, executing: bool, op_unfinished: bool, sigint: bool) -> str:
    """How a run ended on a host, for its audit line (pure).

    An operation that raises at execution (our checks and gates do) ends pyinfra's run without
    marking its host failed; it shows as an operation that started and never finished. So does
    one cut off by Ctrl-C, which the SIGINT seen tells apart.
    """
    if failed:
        return "failed"
    if before_execute:
        return "stopped before any change"
    if sigint:
        return "interrupted"
    if op_unfinished:
        return "failed"
    return "interrupted" if executing else "ok"


#: host name -> the operation started on it and not finished (success or error) yet
_OPEN: dict[str, str] = {}
_INTERRUPTED = False


def _watch_sigint() -> None:
    """Note a Ctrl-C, then let the handler before ours do what it does (raise KeyboardInterrupt)."""
    import signal

    previous = signal.getsignal(signal.SIGINT)

    def noted(signum: int, frame: Any) -> None:
        global _INTERRUPTED
        _INTERRUPTED = True
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, noted)
    except ValueError:  # not the main thread: no note, Ctrl-C then reads as a failure
        pass


def _executed(state: Any, host: Any) -> int:
    """Operations that ran commands on ``host`` (pyinfra's "changed"; its ``ops_change`` is only
    counted when changes are detected before execution, never under ``-y``)."""
    n = 0
    for op_hash in state.get_op_order():
        try:
            meta = state.get_op_data_for_host(host, op_hash).operation_meta
        except KeyError:  # an operation this host does not run
            continue
        n += bool(meta.is_complete() and meta.executed)
    return n


class _Disconnect(BaseStateCallback):
    """pyinfra calls this for every host it disconnects, also after an error or Ctrl-C."""

    @staticmethod
    def host_disconnect(state: Any, host: Any) -> None:
        _finish(state, host)

    @staticmethod
    def operation_host_start(state: Any, host: Any, op_hash: str) -> None:
        _OPEN[host.name] = op_hash

    @staticmethod
    def operation_host_success(state: Any, host: Any, op_hash: str, retry_count: int = 0) -> None:
        _OPEN.pop(host.name, None)

    @staticmethod
    def operation_host_error(state: Any, host: Any, op_hash: str, retry_count: int = 0, max_retries: int = 0) -> None:
        _OPEN.pop(host.name, None)


# --- the CLI: a whole fleet's lock, its status, its release ---------------------------------


@contextmanager
def fleet_held(inventory: str, action: str, wait: float = 0.0,
               log: Callable[[str], object] = print) -> Iterator[str]:
    """Hold the lock of every host of ``inventory`` for a CLI command's whole run (a rollout, a
    rollback), and hand its run id to the pyinfra runs it starts. All or nothing: when one host
    is held by another run, the locks taken so far are released and :class:`LockHeld` raised."""
    from llamadeploy.status import connected

    holder = me(action)
    taken: list[str] = []
    with connected(inventory) as (hosts, _configs):
        try:
            for h in hosts:
                if acquire(h, holder, wait=wait):
                    taken.append(h.name)
        except BaseException:
            for h in hosts:
                if h.name in taken:
                    release(h, holder.run)
            raise
    log(f"==> lock taken on {len(taken)} host(s) for {action} (run {holder.run})")
    saved = {k: os.environ.get(k) for k in (ENV_RUN, ENV_ACTION)}
    os.environ[ENV_RUN], os.environ[ENV_ACTION] = holder.run, action
    try:
        yield holder.run
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with connected(inventory) as (hosts, _configs):
            for h in hosts:
                if h.name in taken:
                    release(h, holder.run)


def fleet_status(inventory: str, limit: list[str] | None = None) -> list[tuple[str, Holder | None, str]]:
    """(host, holder or None when free, problem) for each host of the inventory."""
    from llamadeploy.status import HostUnreachable, connected

    rows: list[tuple[str, Holder | None, str]] = []
    unreachable: list[str] = []
    with connected(inventory, state_unreachable=unreachable, limit=limit) as (hosts, _configs):
        for h in hosts:
            try:
                text = run_on(h, status_command()).strip()
            except HostUnreachable as exc:
                rows.append((h.name, None, str(exc)))
                continue
            holder = Holder.from_json(text) if text else None
            rows.append((h.name, holder, "unreadable lock file" if text and holder is None else ""))
    return rows + [(n, None, "not reachable") for n in unreachable]


def format_status(rows: list[tuple[str, Holder | None, str]]) -> str:
    return "\n".join(f"{name}: {problem or (holder.describe() if holder else 'free')}" for name, holder, problem in rows)


def fleet_release(inventory: str, limit: list[str] | None = None, force: bool = False,
                  log: Callable[[str], object] = print) -> int:
    """Release the locks of dead runs (``force``: of any run) on the inventory's hosts, naming each;
    1 when a lock was kept because its holder may still run, or a host could not be reached."""
    from llamadeploy.status import connected

    rc = 0
    unreachable: list[str] = []
    with connected(inventory, state_unreachable=unreachable, limit=limit) as (hosts, _configs):
        for name in unreachable:
            log(f"{name}: not reachable; its lock is left as it is")
            rc = 1
        for h in hosts:
            text = run_on(h, status_command()).strip()
            if not text:
                log(f"{h.name}: free")
                continue
            holder = Holder.from_json(text)
            alive = holder.alive() if holder is not None else False
            if holder is not None and alive is not False and not force:
                log(f"{h.name}: kept: locked by {holder.describe()}; "
                    + ("its process still runs" if alive else "it may still run on its controller")
                    + " (--force releases it)")
                rc = 1
                continue
            run_on(h, release_command(holder.run if holder else None))
            log(f"{h.name}: released: " + (holder.describe() if holder else "an unreadable lock file"))
    return rc
