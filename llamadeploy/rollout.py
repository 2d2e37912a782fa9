"""Fleet rollouts: canary first, then batches, each host gated, a failed host rolled back.

pyinfra gathers facts and prepares operations for every host before it runs any, so
a gate between batches has to sit between pyinfra runs. Each batch is one run of
pyinfra's CLI, ``--limit``ed to the batch: pyinfra does all SSH and parallelism, and
its ``--json`` report says which hosts failed. (Its Python API would do too, but names
operations by their index per host, so hosts whose operation lists differ would not run
a shared step together; the CLI names them by where the deploy code calls them.)

Per host the deploy itself stages (build or artifact, model), checks (the new binary's
``--version`` and ``--help`` against the flags), switches (``current`` link and unit,
one rename each, restart) and gates (``/health`` 200 and one real chat completion,
with the key, within ``llama_health.timeout``); only a release that passed its gate
is recorded. A host that fails is rolled back to the release it ran before (recorded
on the host: no transfer, no compile), and the rollout stops before the next batch
with a table of every host: release before and after, and the outcome.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

#: inventory group whose hosts go first, one batch of their own
CANARY_GROUP = "canary"
PYINFRA = str(Path(sys.executable).with_name("pyinfra"))
#: the deploy a host is rolled back with (``to=<release id>``)
ROLLBACK = "llamadeploy.deploy.llama_server_rollback"


@dataclass
class HostOutcome:
    host: str
    before: str | None = None
    after: str | None = None
    outcome: str = "not reached"
    detail: str = ""


@dataclass
class RolloutResult:
    rows: list[HostOutcome]
    ok: bool
    batches: list[list[str]] = field(default_factory=list)


def batch_count(spec: str, total: int, round_down: bool = False) -> int:
    """``"3"`` -> 3 hosts, ``"25%"`` -> a quarter of ``total`` (rounded up, or down with
    ``round_down``); always at least 1 (pure)."""
    spec = spec.strip()
    if spec.endswith("%"):
        pct = float(spec[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"a percentage must be in (0, 100], got {spec!r}")
        share = total * pct / 100
        return max(1, math.floor(share) if round_down else math.ceil(share))
    n = int(spec)
    if n < 1:
        raise ValueError(f"a count must be at least 1, got {spec!r}")
    return n


def plan_batches(hosts: list[str], canaries: list[str], batch: str = "1",
                 max_unavailable: str | None = None, down: list[str] | None = None) -> list[list[str]]:
    """Canaries first (one batch), then the rest in inventory order, ``batch`` at a time, never
    more than ``max_unavailable`` hosts unavailable at once: a percentage rounds down (at least 1),
    and hosts already ``down`` use up their share of it (pure).

    Raises ValueError when the hosts already down leave no room to switch any.
    """
    size = batch_count(batch, len(hosts))
    if max_unavailable is not None:
        allowed = batch_count(max_unavailable, len(hosts), round_down=True)
        down = [h for h in (down or []) if h in hosts]
        if len(down) >= allowed:
            raise ValueError(f"--max-unavailable {max_unavailable} allows {allowed} of {len(hosts)} host(s) "
                             f"unavailable, and {len(down)} already are ({', '.join(down)}): nothing was switched; "
                             "bring them back first, or allow more")
        size = min(size, allowed - len(down))
    first = [h for h in hosts if h in canaries]
    rest = [h for h in hosts if h not in canaries]
    out = [first[i:i + size] for i in range(0, len(first), size)]
    return out + [rest[i:i + size] for i in range(0, len(rest), size)]


#: what a deploy's own fallback prints for a host it rolled back (roles/release ``fell_back``)
FELL_BACK = "failed its gate; rolled back to "


def fell_back_hosts(line: str, names: list[str]) -> dict[str, str]:
    """host -> what happened, for a line of pyinfra's output saying the deploy rolled that host
    back itself (``roles/release`` :func:`fell_back_reason`) (pure)."""
    if FELL_BACK not in line:
        return {}
    return {n: line.strip().split(f"host {n}: ", 1)[1] for n in names if f"host {n}: " in line}


def run_deploy(inventory_path: str, limit: list[str], target: str = "llamadeploy.deploy.llama_server",
               args: list[str] | None = None, log: Callable[[str], None] = print,
               fell_back: dict[str, str] | None = None) -> tuple[set[str], str | None]:
    """One ``pyinfra -y --json INVENTORY TARGET ARGS --limit HOST...`` run; its progress goes to our stderr.

    Returns the hosts that failed and, when pyinfra stopped without a report (a refused
    validation or preflight, where nothing changed, or every host failed), the reason.
    pyinfra's ``--json`` report lists, per operation, the hosts where it failed.
    ``fell_back`` collects host -> message for hosts the deploy itself rolled back.
    """
    cmd = [PYINFRA, "-y", "--json", inventory_path, target, *(args or [])]
    for name in limit:
        cmd += ["--limit", name]
    tail: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as report_file:  # a file: a big report never blocks the pipe
        proc = subprocess.Popen(cmd, stdout=report_file, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        try:
            for line in proc.stderr:  # pyinfra's own progress, passed through as it comes
                sys.stderr.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if fell_back is not None:
                    fell_back.update(fell_back_hosts(line, limit))
            rc = proc.wait()
        except KeyboardInterrupt:
            interrupted(proc)
            raise
        report_file.seek(0)
        out = report_file.read()
    if rc == 0:
        return set(), None
    try:
        results = json.loads(out)["results"]
        # failed_hosts includes hosts that never connected (they are in no operation's list)
        failed = set(results.get("failed_hosts", [])) | {h for op in results["operations"] for h in op.get("error", [])}
        if failed:
            return failed, None
    except (ValueError, KeyError, TypeError):
        pass
    reason = next((ln.strip() for ln in reversed(tail) if ln.strip() and not ln.startswith("    ")), "pyinfra failed")
    return set(limit), reason.removeprefix("--> ")


def interrupted(proc: subprocess.Popen[str], grace: float = 120.0) -> None:
    """Our run was interrupted while ``proc``, a pyinfra run, goes on: it ends before we do.

    A Ctrl-C at a terminal reached it too (one process group); a SIGTERM sent to us alone did
    not. pyinfra ends its operations on a Ctrl-C of its own and disconnects, so that its hosts
    are left between operations, not inside one, before our caller re-enables them at the fronts
    and releases the lock it ran under. One that does not end within ``grace`` is killed.
    """
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def deployed_plainly(inventory_path: str, hosts: list[str]) -> tuple[set[str], list[HostOutcome]]:
    """One plain deploy of ``hosts`` (RPC workers, fronts, monitors: no gate between them): the
    hosts that failed, and a row per host, ``deployed`` or ``failed`` with the run's reason."""
    failed, error = run_deploy(inventory_path, hosts)
    return failed, [HostOutcome(n, outcome="failed" if n in failed else "deployed", detail=error or "") for n in hosts]


def serving_release(manifest_id: str | None, recorded: list[str]) -> str | None:
    """The release a host serves, as a rollout's "before" (pure): the latest in its release
    records (each recorded only after it passed its gate; a rollback marks its target the latest),
    else its manifest's (a host deployed before records). Not the manifest first: a deploy moves
    the manifest before its gate, so a run killed between the two leaves a manifest naming a
    release that never served, and a rollback "to before" must not return there."""
    return recorded[-1] if recorded else manifest_id


def read_releases(inventory_path: str, names: list[str], serving: bool = False) -> dict[str, tuple[str | None, str]]:
    """host -> (release id, health) for ``names``, over pyinfra's connections. The id is the
    manifest's (what the last run switched to), or with ``serving`` the one the host serves
    (:func:`serving_release`: a rollout's "before", where a failed host returns)."""
    from llamadeploy.roles.release import records_dir
    from llamadeploy.roles.release.facts import ReleaseRecords
    from llamadeploy.status import connected, host_status, read_manifest

    out: dict[str, tuple[str | None, str]] = {}
    unreachable: list[str] = []
    with connected(inventory_path, state_unreachable=unreachable) as (hosts, configs):
        for host in hosts:
            if host.name not in names:
                continue
            try:
                m = read_manifest(host, configs[host.name])
                records = [r.id for r in host.get_fact(ReleaseRecords, path=records_dir(configs[host.name])) or []] \
                    if serving else []
            except Exception:  # noqa: BLE001 - reported as unknown
                m, records = None, []
            st = host_status(host, configs[host.name]) if m else None
            manifest_id = m.release_id if m else None
            out[host.name] = (serving_release(manifest_id, records) if serving else manifest_id,
                              (st.health or "?") if st else "nothing deployed")
    for name in unreachable:
        out[name] = (None, "unreachable")
    return out


def rollout(inventory_path: str, batch: str = "1", max_unavailable: str | None = None,
            canary_group: str = CANARY_GROUP, log: Callable[[str], None] = print) -> RolloutResult:
    """Roll the inventory's settings out host by host (see the module docstring)."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from llamadeploy.hostdata import validate_inventory

    ctx_state.set(State())
    inventory = make_inventory(inventory_path, cwd=os.getcwd())
    configs = validate_inventory(inventory)  # every host's settings, before any host changes
    names = [h.name for h in inventory if configs[h.name].role == "server"]
    others = [h.name for h in inventory if configs[h.name].role in ("front", "monitor")]
    workers = [h.name for h in inventory if configs[h.name].role == "rpc_worker"]
    fronts = [h.name for h in inventory if configs[h.name].role == "front"]

    def front_state(hosts: list[str], state: str, wait: bool = True) -> bool:
        """Drain a batch at every front before its switch (waiting for its running requests to
        finish), enable it after its gate (waiting until the front sees it up, unless not
        ``wait``): the seam."""
        if not (fronts and hosts):
            return True
        failed, error = run_deploy(inventory_path, fronts, "llamadeploy.deploy.llama_front_servers",
                                   [f"servers={','.join(hosts)}", f"set_to={state}", "by_rollout=true"]
                                   + ([] if wait else ["wait=false"]))
        if failed:
            log(f"==> fronts {', '.join(sorted(failed))}: could not set {', '.join(hosts)} to {state}"
                + (f" ({error})" if error else ""))
        return not failed

    canaries = [h.name for h in inventory.get_group(canary_group, default=[])]
    before = read_releases(inventory_path, names, serving=True)
    # a host with a release that does not answer is unavailable already (a fresh host is not)
    down = [n for n, (rid, health) in before.items() if health == "unreachable" or (rid and health != "ok")]
    batches = plan_batches(names, canaries, batch, max_unavailable, down)
    rows = {n: HostOutcome(n, before=before.get(n, (None, ""))[0]) for n in names}
    log(f"==> rollout of {len(names)} host(s) in {len(batches)} batch(es)"
        + (f", canary first: {', '.join(canaries)}" if canaries else ""))
    if workers:  # RPC workers before their heads: a head switches only onto workers of its release
        log(f"==> RPC workers first: {', '.join(workers)}")
        failed, done = deployed_plainly(inventory_path, workers)
        rows.update({r.host: r for r in done})
        if failed:
            log("==> stopped: an RPC worker failed; no server was touched")
            return RolloutResult([rows[n] for n in workers + names], False, batches)
    # the fronts learn every server first (a deploy of the fronts alone: a server they do not know
    # yet is added, checked down until its own deploy, so its batch's drain has a server to
    # drain); the servers are not in that run, so each is routed the models it serves now
    # (roles/front routing_of), and no model moves before its server switches. Only while a
    # server serves: a front (re)loaded over no healthy server fails its wait for one, so a
    # fleet's first rollout (or one over a fleet that is down) deploys its fronts at the end only
    if fronts and any(health == "ok" for _, health in before.values()):
        log(f"==> fronts first: {', '.join(fronts)} (every server known before any is drained)")
        failed, done = deployed_plainly(inventory_path, fronts)
        if failed:
            rows.update({r.host: r for r in done})
            log("==> stopped: a front could not be deployed; no server was touched")
            return RolloutResult([rows[n] for n in workers + names + fronts], False, batches)
    # servers a killed rollout left drained (its marks on the fronts) are enabled first, without
    # waiting for them (one left broken would stop every later rollout; its health checks keep it
    # out); servers the operator drained carry no mark and stay drained
    if fronts and not front_state(names, "ready", wait=False):
        log("==> stopped: the fronts could not enable what an earlier rollout left drained")
        return RolloutResult([rows[n] for n in workers + names], False, batches)
    pending: list[str] = []
    try:
        for i, hosts in enumerate(batches, 1):
            log(f"==> batch {i}/{len(batches)}: {', '.join(hosts)}")
            pending = hosts  # drained (marked) at the fronts from here until they are enabled
            if not front_state(hosts, "drain"):
                for n in hosts:
                    rows[n].outcome, rows[n].detail = "not switched", "the front could not drain it"
                front_state(hosts, "ready")
                pending = []
                return RolloutResult([rows[n] for n in workers + names], False, batches)
            fell_back: dict[str, str] = {}
            failed, error = run_deploy(inventory_path, hosts, fell_back=fell_back)
            after = read_releases(inventory_path, hosts)
            for name in hosts:
                row = rows[name]
                row.after, health = after.get(name, (None, "unreachable"))
                if name not in failed and row.after is not None and health == "ok":
                    row.outcome = "updated" if row.after != row.before else "unchanged"
                elif name in fell_back and health == "ok":  # the deploy rolled it back itself
                    row.outcome, row.detail = "rolled back", fell_back[name]
                elif row.after == row.before and health == "ok":
                    row.outcome, row.detail = "failed", "stopped before the switch; still serving its release" + (
                        f" ({error})" if error else "")
                else:
                    row.outcome, row.detail = "failed", f"after the switch: health {health}"
            to_roll = [n for n in hosts if rows[n].outcome == "failed" and rows[n].after != rows[n].before]
            if to_roll:
                log(f"==> rolling back {', '.join(to_roll)}")
                no_record = [n for n in to_roll if not rows[n].before]
                for n in no_record:
                    rows[n].outcome, rows[n].detail = "failed", "no earlier release recorded: not rolled back"
                targets = [n for n in to_roll if n not in no_record]
                rb_failed: set[str] = set()
                rb_error = None
                for release in sorted({str(rows[n].before) for n in targets}):  # one run per release to return to
                    group = [n for n in targets if rows[n].before == release]
                    f, e = run_deploy(inventory_path, group, ROLLBACK, [f"to={release}"])
                    rb_failed |= f
                    rb_error = rb_error or e
                if targets:
                    again = read_releases(inventory_path, targets)
                    for n in targets:
                        rows[n].after = again.get(n, (None, ""))[0]
                        ok = n not in rb_failed and again.get(n, (None, ""))[1] == "ok"
                        rows[n].outcome = "rolled back" if ok else "rollback failed"
                        if rb_error:
                            rows[n].detail = rb_error
            serving = [n for n in hosts if rows[n].outcome in ("updated", "unchanged", "rolled back")
                       or rows[n].detail.startswith("stopped before the switch")]
            enabled = front_state(serving, "ready")
            # a first deploy that failed has nothing to return to and its unit is stopped: its
            # mark goes too (enabled, it stays down at the front until a deploy makes it serve)
            stopped = [n for n in hosts if n not in serving and not rows[n].before]
            enabled = front_state(stopped, "ready", wait=False) and enabled
            pending = []
            if not enabled or any(rows[n].outcome not in ("updated", "unchanged") for n in hosts):
                log(f"==> stopped after batch {i}: the remaining hosts were not touched")
                return RolloutResult([rows[n] for n in workers + names], False, batches)
    finally:
        if pending:  # any exit in the middle of a batch (an error, Ctrl-C): no front keeps it drained
            log(f"==> enabling {', '.join(pending)} at the fronts again")
            front_state(pending, "ready")
    if others:  # fronts and monitors follow the servers they point at
        log(f"==> fronts and monitors: {', '.join(others)}")
        failed, done = deployed_plainly(inventory_path, others)
        rows.update({r.host: r for r in done})
        return RolloutResult([rows[n] for n in workers + names + others], not failed, batches)
    return RolloutResult([rows[n] for n in workers + names], True, batches)


def rollback(inventory_path: str, to: str | None = None, limit: list[str] | None = None,
             log: Callable[[str], None] = print) -> RolloutResult:
    """Reinstate a recorded release on every host (or ``limit``): the previous one, or ``to``."""
    from pyinfra.api import State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory

    from llamadeploy.hostdata import validate_inventory

    ctx_state.set(State())
    inventory = make_inventory(inventory_path, cwd=os.getcwd())
    configs = validate_inventory(inventory)
    names = [h.name for h in inventory if configs[h.name].role == "server" and (not limit or h.name in limit)]
    others = [h.name for h in inventory if configs[h.name].role in ("front", "monitor")]
    before = read_releases(inventory_path, names)
    log(f"==> rollback on {', '.join(names)}" + (f" to {to}" if to else " to each host's previous release"))
    failed, error = run_deploy(inventory_path, names, ROLLBACK, [f"to={to}"] if to else [])
    after = read_releases(inventory_path, names)
    rows = []
    for n in names:
        row = HostOutcome(n, before.get(n, (None, ""))[0], after.get(n, (None, ""))[0])
        row.outcome = "failed" if n in failed else ("rolled back" if row.after != row.before else "unchanged")
        row.detail = error or ""
        rows.append(row)
    if others and any(r.outcome == "rolled back" for r in rows):
        # a reinstated release may serve models the inventory has dropped (or not yet those it
        # added): fronts route, and monitors scrape, what the servers serve now (roles/front
        # routing_of)
        log(f"==> fronts and monitors: {', '.join(others)} (routing by the models the servers serve now)")
        others_failed, done = deployed_plainly(inventory_path, others)
        rows += done
        failed |= others_failed
    return RolloutResult(rows, not failed)


def format_table(rows: list[HostOutcome]) -> str:
    from llamadeploy.status import columns

    cells = [["host", "before", "after", "outcome", "detail"]]
    cells += [[r.host, r.before or "-", r.after or "-", r.outcome, r.detail] for r in rows]
    return columns(cells)
