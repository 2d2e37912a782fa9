"""Ownership: refused paths and accounts, the record, and the facts that feed them (pure)."""

from __future__ import annotations

from llamadeploy.config import HostConfig
from llamadeploy.roles.ownership import (
    ancestors,
    configured_dirs,
    files_in,
    ownership_problem,
    parents_in,
    record_lines,
)
from llamadeploy.roles.ownership.facts import OwnershipRecords, PathStates

CFG = HostConfig.model_validate({"model": {"path": "/m/m.gguf"}, "server": {"allow_unauthenticated": True},
                                 "service": {"data_dir": "/srv/llm"}})
DIRS = configured_dirs(CFG)
FRESH = dict.fromkeys(DIRS.values(), "absent")


def test_a_fresh_host_passes_and_everything_is_recorded():
    assert ownership_problem(DIRS, FRESH, frozenset(), False, "llama", False) is None
    assert record_lines(DIRS, None, "llama") == sorted(
        ["account llama", "dir /opt/llama.cpp", "dir /srv/llm", "dir /etc/llama-server", "dir /var/cache/llama.cpp",
         "dir /opt/llama-server-compose"])


def test_a_foreign_directory_with_content_is_refused_naming_the_field():
    states = {**FRESH, "/srv/llm": "2 models notes.txt "}
    assert ownership_problem(DIRS, states, frozenset(), False, "llama", False) == (
        "llama_service.data_dir = '/srv/llm' exists on this host and holds 2 entries this deploy did not create "
        "(models, notes.txt); allowed: a new or empty directory, or one an earlier deploy created")
    many = {**FRESH, "/etc/llama-server": "7 a b c "}
    assert "holds 7 entries this deploy did not create (a, b, c, ...)" in str(
        ownership_problem(DIRS, many, frozenset(), False, None, False))
    assert "is a file on this host" in str(ownership_problem(DIRS, {**FRESH, "/srv/llm": "file"}, frozenset(),
                                                             False, None, False))


def test_empty_recorded_or_adopted_directories_pass():
    states = {**FRESH, "/srv/llm": "2 models notes.txt "}
    assert ownership_problem(DIRS, {**FRESH, "/srv/llm": "empty"}, frozenset(), False, None, False) is None
    assert ownership_problem(DIRS, states, frozenset({"dir /srv/llm"}), False, None, False) is None
    assert ownership_problem(DIRS, states, frozenset(), True, None, False) is None  # an earlier deploy's host


def test_an_existing_account_is_refused_unless_recorded():
    msg = ownership_problem(DIRS, FRESH, frozenset(), False, "svc", True)
    assert msg == ("llama_service.user = 'svc' is an existing account this deploy did not create; allowed: a new "
                   "account (the deploy creates and records it), or one an earlier deploy created")
    assert ownership_problem(DIRS, FRESH, frozenset({"account svc"}), False, "svc", True) is None
    assert ownership_problem(DIRS, FRESH, frozenset(), False, None, True) is None  # docker mode: no account


def test_record_keeps_what_it_held():
    lines = record_lines({"f": "/a"}, frozenset({"dir /old", "account llama"}), None)
    assert lines == ["account llama", "dir /a", "dir /old"]


def test_facts_parse_records_and_path_states():
    out = ["== llama-server.owned", "dir /opt/llama.cpp", "account llama", "== other.owned", "dir /srv/x"]
    assert OwnershipRecords().process(out) == {"llama-server.owned": frozenset({"dir /opt/llama.cpp", "account llama"}),
                                               "other.owned": frozenset({"dir /srv/x"})}
    assert OwnershipRecords().process([]) == {}
    states = PathStates().process(["/a\tabsent", "/b\t0 ", "/c\t2 models notes.txt ", "/d\tfile"])
    assert states == {"/a": "absent", "/b": "empty", "/c": "2 models notes.txt", "/d": "file"}


def test_model_files_a_run_places_are_recorded_and_read_back_per_directory():
    lines = record_lines({"f": "/a"}, frozenset({"file /a/models/old.gguf"}), None, ["/a/models/new.gguf"])
    assert lines == ["dir /a", "file /a/models/new.gguf", "file /a/models/old.gguf"]
    record = frozenset([*lines, "file /a/models/sub/x.gguf", "file /b/models/y.gguf", "dir /a/models"])
    assert files_in(record, "/a/models") == {"new.gguf", "old.gguf"}
    assert files_in(record, "/a/models/") == {"new.gguf", "old.gguf"}
    assert files_in(None, "/a/models") == set()


def test_parents_the_deploy_creates_are_recorded_and_removed_deepest_first():
    assert ancestors(["/srv/llm/data", "/srv/llm/etc", "/opt/llama.cpp", "/srv/llm/data/"]) == ["/srv/llm", "/opt", "/srv"]
    lines = record_lines({"f": "/srv/llm/data"}, None, None, parents=["/srv/llm"])
    assert lines == ["dir /srv/llm/data", "parent /srv/llm"]
    assert parents_in(frozenset([*lines, "parent /srv", "parent /srv/llm/x"])) == ["/srv/llm/x", "/srv/llm", "/srv"]
    assert parents_in(None) == []
