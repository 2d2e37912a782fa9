"""status: drift between a host's manifest and its inventory settings, the table, the manifest format."""

from __future__ import annotations

from llamadeploy.config import HostConfig
from llamadeploy.manifest import Manifest, PlanRecord, manifest_path
from llamadeploy.status import HostStatus, drift, format_table

SHA = "a" * 64


def manifest(**over) -> Manifest:
    fields = dict(mode="native", unit="llama-server", host="0.0.0.0", port=8080, alias="g",
                  model_path="/var/lib/llama-server/models/m.gguf", model_files={"m.gguf": SHA},
                  release=HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"host": "127.0.0.1"}})
                  .build.release_key(), args=["--port", "8080"],
                  memory_plan=PlanRecord(limit=1, model_bytes=1, kv_bytes_per_token=1, ctx_size=512, parallel=1))
    return Manifest(**{**fields, **over})


def cfg(**server) -> HostConfig:
    return HostConfig.model_validate({"model": {"path": "/m.gguf", "alias": "g"},
                                      "server": {"allow_unauthenticated": True, **server}})


def test_no_drift_when_the_host_matches():
    assert drift(cfg(), manifest(), SHA) == []


def test_each_difference_is_named():
    m = manifest(api_key_file="/etc/llama-server/api-key", mode="docker", release=None)
    out = drift(cfg(port=9000), m, "b" * 64)
    assert out == ["mode docker -> native", f"release None -> {cfg().build.release_key()}",
                   "model sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb", "bind 0.0.0.0:8080 -> 0.0.0.0:9000",
                   "api key set -> none"]


def test_manifest_round_trip_is_byte_stable():
    m = manifest(chat_template="gemma")
    text = m.render()
    assert Manifest.parse(text) == m and Manifest.parse(text).render() == text
    assert m.model_sha256 == SHA and len(m.flags_digest()) == 12
    assert manifest_path("/srv/llama/etc") == "/srv/llama/etc/deploy.json"
    # a newer writer's extra field does not break an older reader
    assert Manifest.parse(text.replace('"mode"', '"future": 1,\n  "mode"', 1)) == m


def test_table_shows_errors_and_drift():
    def row(name, service, health, drift):
        return HostStatus(name, "native", "b1-x", "b1-r2", ["b1-r1", "b1-r0"], "g", SHA[:12], "0123456789ab",
                          service, health, drift)

    rows = [row("a", "active", "ok", []), HostStatus("b", error="unreachable over SSH"),
            row("c", "failed", "HTTP 000", ["api key none -> set"])]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["host", "mode", "release", "release_id", "previous", "model", "model_sha256",
                                "flags_digest", "service", "health", "rpc", "drift"]
    assert lines[1].split()[3:5] == ["b1-r2", "b1-r1,b1-r0"]
    assert lines[1].split()[-1] == "-" and "unreachable over SSH" in lines[2] and lines[3].endswith("api key none -> set")


def test_flag_changes_are_drift_with_the_flags_named():
    m = manifest()
    assert drift(cfg(), m, SHA, ["--port", "8080"]) == []
    (line,) = drift(cfg(), m, SHA, ["--port", "8080", "--ctx-size", "4096"])
    assert line == f"flags {m.flags_digest()} -> {Manifest.digest(['--port', '8080', '--ctx-size', '4096'])} (--ctx-size)"
    (line,) = drift(cfg(), m, SHA, ["--port", "9090"])
    assert line.endswith("(values)")


# --- router mode ----------------------------------------------------------------------------

def router_manifest(**models: str) -> Manifest:
    from llamadeploy.manifest import ServedModel

    served = [ServedModel(alias=a, kind="embedding" if a.startswith("embed") else "chat", files={f"{a}.gguf": sha})
              for a, sha in models.items()]
    return manifest().model_copy(update={"models": served, "model_files": {f"{a}.gguf": s for a, s in models.items()},
                                         "preset_file": "/etc/llama-server/models.ini"})


def test_model_drift_names_models_added_removed_and_repinned():
    from llamadeploy.status import model_drift

    m = router_manifest(chat="a" * 64, embed="b" * 64, old="c" * 64)
    assert model_drift(m, {"chat": "a" * 64, "embed": "d" * 64, "new": None}) == [
        "model new to be added", "model old to be removed", f"model embed sha256 {'b' * 12} -> {'d' * 12}"]
    assert model_drift(m, {"chat": None, "embed": "b" * 64, "old": "c" * 64}) == []


def test_a_switch_between_one_model_and_router_mode_is_drift():
    router_cfg = HostConfig.model_validate({
        "models": [{"path": "/m/a.gguf", "alias": "chat"}, {"path": "/m/a.gguf", "alias": "embed", "kind": "embedding"}],
        "server": {"host": "127.0.0.1"}})
    assert "one model -> several (router mode)" in drift(router_cfg, manifest(), None)
    assert "several models (router mode) -> one" in drift(cfg(), router_manifest(chat=SHA), SHA)
    assert drift(router_cfg, router_manifest(chat=SHA, embed=SHA).model_copy(update={"host": "127.0.0.1"}), None) == []


def test_router_states_read_from_the_routers_models_reply():
    from llamadeploy.status import router_states

    reply = '{"data": [{"id": "chat", "status": {"value": "loaded"}}, {"id": "embed", "status": {"value": "unloaded"}}]}'
    assert router_states(reply) == {"chat": "loaded", "embed": "unloaded"}
    assert router_states("Unauthorized") == {} and router_states('{"data": 1}') == {}


def test_table_lists_each_model_of_a_router_host():
    from llamadeploy.status import ModelStatus

    row = HostStatus("h1", mode="native", model="chat,embed", health="ok",
                     models=[ModelStatus("chat", "chat", "a" * 12, "loaded"),
                             ModelStatus("embed", "embedding", "b" * 12, "unloaded")])
    text = format_table([row])
    assert "models (router mode)" in text
    assert any(line.split() == ["h1", "embed", "embedding", "b" * 12, "unloaded"] for line in text.splitlines())




#: run in a child: pyinfra's CLI module monkey-patches the whole process for gevent on import
LIMIT_PROBE = """
import json, sys
from llamadeploy.hostdata import ConfigError
from llamadeploy.status import connected
unreachable = []
try:
    with connected(sys.argv[1], state_unreachable=unreachable, limit=json.loads(sys.argv[2])) as (hosts, configs):
        print(json.dumps({"connected": [h.name for h in hosts], "validated": sorted(configs),
                          "unreachable": unreachable}))
except ConfigError as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def test_limit_connects_only_the_hosts_and_groups_it_names(tmp_path):
    """``--limit`` by host or by group, against a real pyinfra inventory and real (refused)
    connections: only those hosts are tried (pyinfra names each failed attempt), a down host named
    by its group is reported unreachable (not left out), every host is validated, and a name that
    is neither a host nor a group is refused before anything connects."""
    import json
    import re
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a local port nothing listens on: a connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = {"ssh_hostname": "127.0.0.1", "ssh_port": port, "llama_server": {"allow_unauthenticated": True}}
    inv = tmp_path / "inv.py"
    inv.write_text(f"servers = [('a', {conn!r}), ('b', {conn!r})]\nfront = [('c', {conn!r})]\n")

    def probe(limit: list[str] | None) -> tuple[dict, list[str]]:
        proc = subprocess.run([sys.executable, "-c", LIMIT_PROBE, str(inv), json.dumps(limit)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return (json.loads(proc.stdout.strip().splitlines()[-1]),
                sorted(re.findall(r"^\[(\w+)\] Could not connect", proc.stderr, re.M)))

    for limit, tried in ((None, ["a", "b", "c"]), (["servers"], ["a", "b"]), (["c"], ["c"]),
                         (["front", "a"], ["a", "c"])):
        got, attempts = probe(limit)
        assert got == {"connected": [], "validated": ["a", "b", "c"], "unreachable": tried}, limit
        assert attempts == tried, limit
    got, attempts = probe(["servers", "nope"])
    assert "--limit nope: no host or group of that name" in got["refused"] and attempts == []


def test_several_reads_come_back_from_one_command_each_under_its_name():
    """status asks a host everything in one round trip: each part runs on its own (an ``exit`` or
    a failure ends only that part, stderr is dropped), its lines come back under its name."""
    import subprocess

    from llamadeploy.status import parts_command, split_parts

    parts = {"manifest": "printf '{\"a\": 1}\\nsecond line\\n'", "records": "[ -d /nonexistent ] || exit 0; echo never",
             "code": "printf 200", "failing": "echo partial; ls /nonexistent; false", "last": "echo 'x y'"}
    proc = subprocess.run(["sh", "-c", parts_command(parts)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert split_parts(proc.stdout) == {"manifest": '{"a": 1}\nsecond line\n', "records": "", "code": "200",
                                        "failing": "partial\n", "last": "x y\n"}


def test_a_served_models_dimension_is_written_only_when_known():
    """A chat (or rerank) model's manifest entry is byte-equal to what earlier versions wrote, so
    a router host's release id does not change for it; an embedding model's carries its length."""
    import json

    from llamadeploy.manifest import ServedModel

    routed = manifest(models=[ServedModel(alias="chat", kind="chat", files={"m.gguf": SHA}),
                              ServedModel(alias="embed", kind="embedding", files={"m.gguf": SHA}, dimensions=640)])
    entries = json.loads(routed.render())["models"]
    assert entries[0] == {"alias": "chat", "kind": "chat", "on_demand": False, "files": {"m.gguf": SHA}}
    assert entries[1]["dimensions"] == 640
    assert Manifest.parse(routed.render()).models == routed.models
