"""The audit trail: on each host, one line per run that held its lock: who, from where, what, the
release before and after, the release it tried, and how it ended.

"Who changed this host, and when?" has to be answered from the host, whoever's laptop ran the
deploy. Each run appends one JSON line to :data:`AUDIT_PATH` when pyinfra disconnects
(:mod:`llamadeploy.lock`): also a run that changed nothing, failed, or was stopped, since those
answer the question too. ``llamadeploy audit INVENTORY`` reads every host's trail over the
inventory's connections and prints it newest first.

An append of one short line (well under ``PIPE_BUF``) with ``>>`` is a single write to an
``O_APPEND`` file: concurrent lines never interleave. The trail outlives an uninstall (which
writes the last line), as ``/var/log`` does for a removed package.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

#: each host's trail (0640 root; the directory 0750)
AUDIT_PATH = "/var/log/llamadeploy/audit.log"
#: lines per host that ``llamadeploy audit`` reads by default
DEFAULT_LINES = 50


@dataclass(frozen=True)
class Entry:
    time: float  #: epoch seconds, the controller's clock at the end of the run
    operator: str
    controller: str
    action: str  #: deploy, rollout, rollback, uninstall, stage, front ...
    run: str  #: the lock's run id: a rollout's lines share one
    before: str | None  #: release id the host's manifest named when the run began
    after: str | None  #: ... and when it ended
    outcome: str  #: ok, failed, interrupted, stopped before any change
    changes: int  #: operations that changed something on this host
    #: the release this run brought (a deploy's new release id, whether or not it passed its gate:
    #: a failed one's id appears nowhere else once the host is back on ``before``); None: none
    tried: str | None = None
    host: str = ""  #: filled in when read back (the file itself is per host)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("host")
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, host: str, text: str) -> Entry | None:
        try:
            d = json.loads(text)
            return cls(float(d["time"]), str(d["operator"]), str(d["controller"]), str(d["action"]),
                       str(d["run"]), d.get("before"), d.get("after"), str(d["outcome"]), int(d["changes"]),
                       d.get("tried"), host)
        except (ValueError, KeyError, TypeError):
            return None


def manifest_command(manifest: str) -> str:
    return f"cat {shlex.quote(manifest)} 2>/dev/null || true"


def release_of(manifest_text: str) -> str | None:
    """The release id a manifest names (None: nothing deployed, or a manifest without one)."""
    try:
        rid = json.loads(manifest_text).get("release_id")
    except (ValueError, AttributeError):
        return None
    return str(rid) if rid else None


def append_command(entry: Entry) -> str:
    d = shlex.quote(AUDIT_PATH.rsplit("/", 1)[0])
    return (f"mkdir -p -m 0750 {d} && (umask 027 && printf '%s\\n' {shlex.quote(entry.to_json())}"
            f" >> {shlex.quote(AUDIT_PATH)})")


def read_command(lines: int) -> str:
    return f"tail -n {int(lines)} {shlex.quote(AUDIT_PATH)} 2>/dev/null || true"


def parse(host: str, output: str) -> list[Entry]:
    return [e for line in output.splitlines() if (e := Entry.from_json(host, line.strip())) is not None]


def newest_first(batches: list[list[Entry]]) -> list[Entry]:
    return sorted((e for b in batches for e in b), key=lambda e: (-e.time, e.host))


def format_table(entries: list[Entry]) -> str:
    from llamadeploy.status import columns

    cells = [["time", "host", "operator", "action", "before", "after", "tried", "outcome", "changes", "run"]]
    for e in entries:
        t = datetime.fromtimestamp(e.time, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        cells.append([t, e.host, f"{e.operator}@{e.controller}", e.action, e.before or "-", e.after or "-",
                      e.tried or "-", e.outcome, str(e.changes), e.run])
    return columns(cells)


def show(inventory: str, limit: list[str] | None = None, lines: int = DEFAULT_LINES,
         out: Callable[[str], object] = print, err: Callable[[str], object] = print) -> int:
    """Print the trails of the inventory's hosts (or ``limit``: hosts or groups), newest first;
    1 when a host could not be read."""
    from llamadeploy.status import HostUnreachable, _run, connected

    unreachable: list[str] = []
    rc = 0
    batches: list[list[Entry]] = []
    with connected(inventory, state_unreachable=unreachable, limit=limit) as (hosts, _configs):
        for name in unreachable:
            err(f"{name}: not reachable; its audit trail is not shown")
            rc = 1
        for h in hosts:
            try:
                batches.append(parse(h.name, _run(h, read_command(lines))))
            except HostUnreachable as exc:
                err(str(exc))
                rc = 1
    out(format_table(newest_first(batches)))
    return rc

