"""The firewall role's rules: only allow_from (and the host itself) reach the port; pure rendering."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from llamadeploy.config import HostConfig
from llamadeploy.hostdata import parse_config
from llamadeploy.roles.firewall import rules, table_name


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
    proc = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
