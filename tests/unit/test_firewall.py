"""The firewall role's rules: only allow_from (and the host itself) reach the port; pure rendering."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llamadeploy.config import HostConfig
from llamadeploy.hostdata import parse_config
from llamadeploy.roles.firewall import rules, table_name
from tests.conftest import LOCAL_TIMEOUT


def cfg(**server) -> HostConfig:
    return HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True, **server}})


def test_rules_accept_listed_networks_and_loopback_then_drop_the_port():
    text, digest = rules(cfg(port=8081, allow_from=["10.0.0.0/8", "192.168.1.7", "fd00::/64"]))
    lines = [ln.strip() for ln in text.splitlines()]
    assert "elements = { 10.0.0.0/8, 192.168.1.7/32 }" in lines  # an address is its /32
    assert "elements = { fd00::/64 }" in lines
    assert lines.index('iif "lo" tcp dport 8081 accept') < lines.index("tcp dport 8081 drop")
    assert lines.index("ip saddr @allowed_v4 tcp dport 8081 accept") < lines.index("tcp dport 8081 drop")
    assert f'comment "{digest}"' in lines
    # replaced as a whole in one transaction: declare, delete, define
    assert lines[5:8] == ["table inet llamadeploy_llama_server", "delete table inet llamadeploy_llama_server",
                          "table inet llamadeploy_llama_server {"]


def test_digest_follows_the_inputs_only():
    a = rules(cfg(allow_from=["10.0.0.0/8"]))[1]
    assert a == rules(cfg(allow_from=["10.0.0.0/8", "10.0.0.0/8"][:1]))[1]
    assert a != rules(cfg(allow_from=["10.0.0.0/16"]))[1]
    assert a != rules(cfg(allow_from=["10.0.0.0/8"], port=9000))[1]


def test_empty_list_drops_everyone_but_the_host():
    text, _ = rules(cfg(allow_from=[]))
    assert "set allowed" not in text and "tcp dport 8080 drop" in text


def test_table_name_is_an_nft_identifier():
    c = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True},
                                   "service": {"name": "llama-gemma-2"}})
    assert table_name(c) == "llamadeploy_llama_gemma_2"


@pytest.mark.parametrize(("data", "expected"), [
    ({"llama_server": {"allow_unauthenticated": True, "allow_from": ["10.0.0.0/33"]}},
     "host h1: llama_server.allow_from.0 = '10.0.0.0/33'"),
    ({"llama_server": {"allow_unauthenticated": True, "allow_from": ["10.0.0.7/8"]}},  # host bits set: a typo?
     "host h1: llama_server.allow_from.0 = '10.0.0.7/8'"),
    ({"llama_mode": "docker", "llama_server": {"allow_unauthenticated": True, "allow_from": ["10.0.0.0/8"]}},
     "host h1: llama_server.allow_from = ['10.0.0.0/8']: docker mode publishes"),
])
def test_bad_network_and_docker_mode_refused_with_the_field(data, expected):
    cfg, errs = parse_config("h1", [{"llama_model": {"path": "/m.gguf"}}, data])
    assert cfg is None and len(errs) == 1 and errs[0].startswith(expected), errs


@pytest.mark.skipif(not shutil.which("nft"), reason="nft not installed on the controller")
def test_rules_parse_with_nft(tmp_path):
    """nft's own parser (--check loads nothing), where the controller has nft."""
    f = tmp_path / "r.nft"
    f.write_text(rules(cfg(allow_from=["10.0.0.0/8", "fd00::/64"]))[0])
    proc = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True, timeout=LOCAL_TIMEOUT)
    assert proc.returncode == 0, proc.stderr


def test_fence_keepers_render_for_the_unit_and_rules():
    """The guard unit names its table and rules file once each; the drop-in makes nftables.service
    load the rules after its own file, never failing the host's firewall when the file is gone."""
    from llamadeploy.roles.firewall import guard_paths, guard_unit, keeper_texts

    guard, dropin = keeper_texts("llama-server", "llamadeploy_llama_server", "/etc/llama-server/firewall.nft")
    assert guard_unit("llama-server") == "llama-server-fence.service"
    assert guard_paths("llama-server", "llamadeploy_llama_server") == (
        "/etc/systemd/system/llama-server-fence.service",
        "/etc/systemd/system/nftables.service.d/llamadeploy_llama_server.conf")
    lines = guard.splitlines()
    assert "PartOf=llama-server.service" in lines
    # not StopWhenUnneeded=: the guard is started before the service is bound to it (roles/firewall)
    assert not any(ln.startswith("StopWhenUnneeded") for ln in lines)
    # each start of the service starts its guard: no start limit (reproduced on a host with the
    # default 5 in 10 s: guard restart + service restart three times, and the service's start
    # failed with "a dependency job failed")
    assert "StartLimitIntervalSec=0" in lines[lines.index("[Unit]"):lines.index("[Service]")]
    exec_start = next(ln for ln in lines if ln.startswith("ExecStart="))
    assert exec_start.endswith("' nft-fence llamadeploy_llama_server /etc/llama-server/firewall.nft")
    assert "ExecStart=-/usr/sbin/nft -f /etc/llama-server/firewall.nft" in dropin.splitlines()
    assert "ExecReload=-/usr/sbin/nft -f /etc/llama-server/firewall.nft" in dropin.splitlines()


def _guard_command(tmp_path) -> list[str]:
    """The guard's ExecStart as systemd would run it: ``$$`` is a literal ``$`` (systemd.service(5))."""
    import shlex

    from llamadeploy.roles.firewall import keeper_texts

    guard, _ = keeper_texts("llama-server", "t1", str(tmp_path / "rules.nft"))
    line = next(ln for ln in guard.splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart=").replace("$$", "$"))


def _stand_in_nft(tmp_path):
    """A stand-in ``nft`` on PATH: the table is a file in ``state``, ``nft -f`` creates it (and
    fails while ``state/fail`` exists), ``monitor`` prints what is written into the FIFO."""
    import os

    bindir, state, fifo = tmp_path / "bin", tmp_path / "state", tmp_path / "events"
    bindir.mkdir()
    state.mkdir()
    os.mkfifo(fifo)
    (bindir / "nft").write_text(f"""#!/bin/sh
case "$1" in
  list) test -e {state}/$4 ;;
  -f) echo load >> {state}/log; test -e {state}/fail && exit 1; touch {state}/t1 ;;
  monitor) exec cat {fifo} ;;
esac
""")
    (bindir / "nft").chmod(0o755)
    return state, fifo, {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def _loads(state) -> int:
    return (state / "log").read_text().count("load") if (state / "log").exists() else 0


def test_guard_loads_the_table_again_when_it_goes_and_ends_when_it_cannot(tmp_path):
    """The guard's shell, run against a stand-in ``nft`` (a script: the table is a file, ``monitor``
    prints what the test writes into a FIFO): it loads a missing table at start, loads it again
    after an event that removed it, leaves a present one alone, and ends (so that the fenced
    unit, bound to it, stops) when a load fails: with status 1, so that systemd shows it failed (a
    shell killed by SIGTERM is a clean stop to systemd)."""
    import time

    state, fifo, env = _stand_in_nft(tmp_path)
    guard = subprocess.Popen(_guard_command(tmp_path), env=env)
    try:
        events = open(fifo, "w")  # noqa: SIM115 - held open for the guard's whole life

        def loads() -> int:
            return _loads(state)

        def wait_for(cond) -> None:
            for _ in range(100):
                if cond():
                    return
                time.sleep(0.05)
            raise AssertionError("the guard did not react")

        wait_for(lambda: loads() == 1)  # missing at start: loaded
        events.write("add table inet other\n")
        events.flush()
        (state / "t1").unlink()
        events.write("delete table inet t1\n")
        events.flush()
        wait_for(lambda: loads() == 2)  # gone: loaded again
        events.write("add table inet t1\n")
        events.flush()
        time.sleep(0.3)
        assert loads() == 2 and guard.poll() is None  # present: left alone, still running
        (state / "fail").touch()
        (state / "t1").unlink()
        events.write("flush ruleset\n")
        events.flush()
        guard.wait(timeout=10)  # a load failed: the guard ended, failed
        assert loads() == 3
        assert guard.returncode == 1
        events.close()
    finally:
        if guard.poll() is None:
            guard.kill()
            guard.wait(timeout=LOCAL_TIMEOUT)


def test_guard_stopped_by_systemd_ends_cleanly_and_loads_nothing_after(tmp_path):
    """systemd stops the guard with SIGTERM to its main shell: a clean stop (not failed), and the
    loop it leaves behind loads no table after it (it checks that the main shell still runs)."""
    import signal
    import time

    state, fifo, env = _stand_in_nft(tmp_path)
    (state / "t1").touch()  # loaded: nothing to do at start
    guard = subprocess.Popen(_guard_command(tmp_path), env=env)
    try:
        with open(fifo, "w") as events:
            time.sleep(0.3)
            assert guard.poll() is None and _loads(state) == 0
            guard.send_signal(signal.SIGTERM)
            assert guard.wait(timeout=10) == -signal.SIGTERM
            (state / "t1").unlink()
            events.write("delete table inet t1\n")
            events.flush()
            time.sleep(0.3)
            assert _loads(state) == 0
    finally:
        if guard.poll() is None:
            guard.kill()
            guard.wait(timeout=LOCAL_TIMEOUT)


def test_the_guard_shell_holds_nothing_systemd_would_rewrite():
    """GUARD_SHELL goes into a unit file's ExecStart with only its $ doubled; a % (a specifier) or a
    backslash (an escape) would be rewritten by systemd there and not in a fan-out peer's script
    file, so the two guards would differ."""
    from llamadeploy.roles.firewall import GUARD_SHELL

    assert "%" not in GUARD_SHELL and "\\" not in GUARD_SHELL


def test_the_mark_is_read_from_the_tables_own_comment_not_a_sets():
    """``nft list table`` prints the table's comment at its top level; a set or chain of
    someone else's table may carry a comment that reads like the deploy's mark: not the table's."""
    from llamadeploy.roles.firewall.facts import NftTableComment

    fact = NftTableComment()
    ours = ["table inet llamadeploy_llama_server {", '\tcomment "llamadeploy 0123456789abcdef"',
            "\tset allowed_v4 {", "\t\ttype ipv4_addr", "\t\tflags interval", "\t\telements = { 10.0.0.0/8 }", "\t}",
            "\tchain input {", "\t\ttype filter hook input priority filter; policy accept;", "\t}", "}"]
    assert fact.process(ours) == "llamadeploy 0123456789abcdef"
    theirs = ["table inet llamadeploy_llama_server {", "\tset blocked {", "\t\ttype ipv4_addr",
              '\t\tcomment "llamadeploy 0123456789abcdef"', "\t}", "}"]
    assert fact.process(theirs) == ""
    assert fact.process([]) is None


def test_first_lines_fact_reads_each_regular_file_in_one_command(tmp_path):
    """The drop-ins' first lines in one shell command, run here as on a host: an empty file reads
    "", a missing path or a directory is left out, and a name with a space or a quote stays one
    argument."""
    from llamadeploy.roles.firewall.facts import FirstLines

    ours = tmp_path / "ours.conf"
    ours.write_text("# Managed by llamadeploy (pyinfra).\n[Service]\n")
    odd = tmp_path / "it's a site.conf"
    odd.write_text("# site policy\n[Service]\n")
    empty = tmp_path / "empty.conf"
    empty.write_text("")
    paths = [str(p) for p in (ours, odd, empty, tmp_path / "missing.conf", tmp_path)]
    fact = FirstLines()
    out = subprocess.run(["sh", "-c", fact.command(paths)], capture_output=True, text=True, check=True,
                         timeout=LOCAL_TIMEOUT)
    assert fact.process(out.stdout.splitlines()) == {str(ours): "# Managed by llamadeploy (pyinfra).",
                                                      str(odd): "# site policy", str(empty): ""}
