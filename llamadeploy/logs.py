"""``llamadeploy logs``: the fleet's journals, one stream, each line naming its host.

An operator chasing one failed request should not open an SSH session per host. Each host's
journal is read over the inventory's own pyinfra connection (its SSH settings, sudo and host
data), for the units the host's role runs: llama-server (one model or a router) or the RPC
worker, HAProxy on a front, Prometheus on a monitor. ``journalctl -o json`` gives every entry
its microsecond time, so the hosts' lines are merged by time; ``--grep`` is journalctl's own
(PCRE2, case-insensitive unless the pattern has a capital letter) and runs on the host, so only
matching lines cross the network.

``-f`` asks each host again every ``interval`` seconds for what came after the last entry it
showed (its journal cursor), until the operator stops it: a poll, not a held-open
``journalctl -f`` per host, so a host that drops its connection is reported, not hung on.

A docker-mode server logs to Docker's json-file driver, not the journal: it is named on stderr
with the command that shows its log, not silently left out.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from llamadeploy.config import HostConfig

#: entries per host when neither ``--since`` nor ``-n`` says otherwise
DEFAULT_LINES = 100
#: seconds between two reads of each host's journal with ``-f``
FOLLOW_INTERVAL = 1.0
#: the last entry of the host's whole journal (for its cursor)
TAIL_COMMAND = "journalctl --no-pager -o json -n 1 --output-fields=MESSAGE"


@dataclass(frozen=True)
class Entry:
    """One journal line of one host."""

    usec: int  #: ``__REALTIME_TIMESTAMP``: microseconds since the epoch, the host's clock
    host: str
    unit: str
    message: str
    cursor: str = ""

    def line(self) -> str:
        t = datetime.fromtimestamp(self.usec / 1e6, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"{self.host} {t} {self.unit}: {self.message}"


def units(cfg: HostConfig) -> list[str]:
    """The systemd units whose journal ``logs`` shows for a host of this role (empty: none)."""
    if cfg.role == "front":
        return ["haproxy.service"]
    if cfg.role == "monitor":
        return ["prometheus.service"]
    if cfg.role == "rpc_worker":
        from llamadeploy.roles.rpc import UNIT

        return [f"{UNIT}.service"]
    if cfg.mode == "docker":
        return []
    return [f"{cfg.service.name}.service"]


def journal_command(unit_names: list[str], since: str | None = None, grep: str | None = None,
                    lines: int | None = None, after_cursor: str | None = None) -> str:
    """The host's ``journalctl`` for ``unit_names``, every value quoted."""
    cmd = ["journalctl", "--no-pager", "-o", "json", "--output-fields=MESSAGE,_SYSTEMD_UNIT,SYSLOG_IDENTIFIER"]
    for u in unit_names:
        cmd += ["-u", u]
    if after_cursor:
        cmd += ["--after-cursor", after_cursor]
    elif since:
        cmd += ["--since", since]
    if lines is not None and not after_cursor:
        cmd += ["-n", str(lines)]
    if grep:
        cmd += ["--grep", grep]
    # "-- No entries --" and journalctl's exit 1 when --grep matched nothing are not failures
    return " ".join(shlex.quote(c) for c in cmd) + " 2>/dev/null || true"


def _message(value: Any) -> str:
    """MESSAGE as text: journald stores a non-UTF-8 message as a list of byte values."""
    if isinstance(value, list):
        return bytes(v for v in value if isinstance(v, int) and 0 <= v < 256).decode("utf-8", "replace")
    return str(value) if value is not None else ""


def parse(host: str, output: str) -> list[Entry]:
    """``journalctl -o json`` output (one object per line) as entries; other lines are skipped."""
    entries = []
    for raw in output.splitlines():
        raw = raw.strip()
        if not raw.startswith("{"):
            continue
        try:
            e = json.loads(raw)
            usec = int(e["__REALTIME_TIMESTAMP"])
        except (ValueError, KeyError, TypeError):
            continue
        unit = str(e.get("_SYSTEMD_UNIT") or e.get("SYSLOG_IDENTIFIER") or "-").removesuffix(".service")
        for text in _message(e.get("MESSAGE")).rstrip("\n").split("\n"):
            entries.append(Entry(usec, host, unit, text, str(e.get("__CURSOR", ""))))
    return entries


def merged(batches: Iterable[list[Entry]]) -> list[Entry]:
    """Every host's entries in one list, by time (a stable sort: one host's order is kept)."""
    return sorted((e for batch in batches for e in batch), key=lambda e: (e.usec, e.host))


def stream(inventory: str, limit: list[str] | None = None, since: str | None = None, grep: str | None = None,
           lines: int | None = None, follow: bool = False, interval: float = FOLLOW_INTERVAL,
           out: Callable[[str], object] = print, err: Callable[[str], object] = print,
           rounds: int | None = None, stopped: Callable[[], bool] = lambda: False) -> int:
    """Print the fleet's journal lines; with ``follow``, keep printing new ones until interrupted.

    ``lines``: the last so many entries per host (default: :data:`DEFAULT_LINES`, or all since
    ``since``). Returns the exit code: 0, or 1 when a host could not be read. ``rounds`` bounds
    the follow loop; ``stopped`` ends it between two reads (the CLI's SIGINT and SIGTERM set it:
    an exception raised by a signal inside pyinfra's SSH I/O can leave the connections hanging
    at disconnect, a flag cannot).
    """
    if lines is None and since is None:
        lines = DEFAULT_LINES
    from llamadeploy.status import HostUnreachable, _run, connected

    unreachable: list[str] = []
    rc = 0
    with connected(inventory, state_unreachable=unreachable, limit=limit) as (hosts, configs):
        for name in unreachable:
            err(f"{name}: not reachable; its journal is not shown")
            rc = 1
        readable = []
        for h in hosts:
            unit_names = units(configs[h.name])
            if not unit_names:
                cfg = configs[h.name]
                err(f"{h.name}: docker mode logs to Docker, not the journal: "
                    f"ssh there and run `docker compose logs` in {cfg.docker.project_dir}")
                continue
            readable.append((h, unit_names))
        cursors: dict[str, str] = {}

        def read(first: bool) -> list[list[Entry]]:
            nonlocal rc
            batches = []
            for h, unit_names in readable:
                try:
                    if first and follow:
                        # the journal's end before the first read: where to go on from when these
                        # units have no line yet (a cursor is a position in the whole journal)
                        tail = parse(h.name, _run(h, TAIL_COMMAND))
                        if tail:
                            cursors[h.name] = tail[-1].cursor
                    cmd = (journal_command(unit_names, since=since, grep=grep, lines=lines) if first else
                           journal_command(unit_names, grep=grep, after_cursor=cursors.get(h.name),
                                           lines=None if h.name in cursors else 0))
                    batch = parse(h.name, _run(h, cmd))
                except HostUnreachable as exc:
                    err(str(exc))
                    rc = 1
                    continue
                except Exception as exc:  # a connection lost while following: named, the others go on
                    err(f"{h.name}: {type(exc).__name__}: {exc}")
                    rc = 1
                    continue
                if batch:
                    cursors[h.name] = batch[-1].cursor
                batches.append(batch)
            return batches

        for e in merged(read(first=True)):
            out(e.line())
        done = 0
        try:
            while follow and (rounds is None or done < rounds) and not stopped():
                deadline = time.monotonic() + interval
                while time.monotonic() < deadline and not stopped():
                    time.sleep(0.05)
                if stopped():
                    break
                for e in merged(read(first=False)):
                    out(e.line())
                done += 1
        except KeyboardInterrupt:
            pass
    return rc
