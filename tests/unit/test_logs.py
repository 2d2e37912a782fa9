"""``llamadeploy logs``: which units per role, the journalctl command, parsing, the merge by time."""

from __future__ import annotations

import json
import shlex

import pytest

from llamadeploy.config import HostConfig
from llamadeploy.logs import DEFAULT_LINES, Entry, journal_command, merged, parse, units


def record(usec: int, message: object, unit: str | None = "llama-server.service", cursor: str = "c") -> str:
    """One line of ``journalctl -o json`` as journald writes it (every value a string)."""
    e: dict[str, object] = {"__CURSOR": cursor, "__REALTIME_TIMESTAMP": str(usec), "MESSAGE": message}
    if unit:
        e["_SYSTEMD_UNIT"] = unit
    return json.dumps(e)


OPEN = {"allow_unauthenticated": True}


@pytest.mark.parametrize(("data", "expected"), [
    ({"server": OPEN}, ["llama-server.service"]),
    ({"server": OPEN, "service": {"name": "llm-chat"}}, ["llm-chat.service"]),
    ({"role": "front"}, ["haproxy.service"]),
    ({"role": "monitor"}, ["prometheus.service"]),
    ({"role": "rpc_worker", "rpc": {"address": "10.0.0.2"}}, ["ggml-rpc-server.service"]),
    ({"server": OPEN, "mode": "docker"}, []),
])
def test_units_by_role(data, expected):
    """A router is the same unit as one model; a docker-mode server has none (json-file)."""
    assert units(HostConfig.model_validate(data)) == expected


def test_journal_command_quotes_every_value():
    cmd = journal_command(["llama-server.service"], since="1 hour ago", grep="it's $(reboot) a \"test\"")
    argv = shlex.split(cmd.removesuffix(" 2>/dev/null || true"))
    assert argv[:4] == ["journalctl", "--no-pager", "-o", "json"]
    assert argv[argv.index("--since") + 1] == "1 hour ago"
    assert argv[argv.index("--grep") + 1] == "it's $(reboot) a \"test\""
    assert argv[argv.index("-u") + 1] == "llama-server.service"
    assert "-n" not in argv  # --since alone: everything since then
    # a follow round: after the cursor, never the --since again nor a line count
    nxt = shlex.split(journal_command(["a.service", "b.service"], since="x", lines=5, after_cursor="s=1;i=2")
                      .removesuffix(" 2>/dev/null || true"))
    assert nxt[nxt.index("--after-cursor") + 1] == "s=1;i=2" and "--since" not in nxt and "-n" not in nxt
    assert [nxt[i + 1] for i, a in enumerate(nxt) if a == "-u"] == ["a.service", "b.service"]
    first = shlex.split(journal_command(["a.service"], lines=DEFAULT_LINES).removesuffix(" 2>/dev/null || true"))
    assert first[first.index("-n") + 1] == str(DEFAULT_LINES)


def test_parse_journal_json():
    out = "\n".join([
        record(1_764_780_000_123_456, "srv  update_slots: all slots are idle", cursor="c1"),
        "-- No entries --",
        "not json {",
        record(1_764_780_001_000_000, [104, 105, 0xff], cursor="c2"),  # non-UTF-8: bytes
        record(1_764_780_002_000_000, "first\nsecond\n", unit=None, cursor="c3"),
        json.dumps({"MESSAGE": "no time"}),
    ])
    entries = parse("s1", out)
    assert [(e.unit, e.message, e.cursor) for e in entries] == [
        ("llama-server", "srv  update_slots: all slots are idle", "c1"),
        ("llama-server", "hi\ufffd", "c2"),
        ("-", "first", "c3"), ("-", "second", "c3"),
    ]
    assert entries[0].line() == "s1 2025-12-03T16:40:00.123456Z llama-server: srv  update_slots: all slots are idle"


def test_merged_by_time_across_hosts():
    a = [Entry(3, "a", "u", "a3"), Entry(5, "a", "u", "a5")]
    b = [Entry(1, "b", "u", "b1"), Entry(4, "b", "u", "b4"), Entry(5, "b", "u", "b5")]
    assert [e.message for e in merged([a, b])] == ["b1", "a3", "b4", "a5", "b5"]
    # one host's lines of the same microsecond keep their journal order
    same = [Entry(7, "a", "u", "x"), Entry(7, "a", "u", "y")]
    assert [e.message for e in merged([same])] == ["x", "y"]
