"""Firewall role (native mode): optional nftables rules that let only configured networks reach the port.

``llama_server.allow_from`` lists CIDRs; the role installs nftables, writes our own
table (``inet llamadeploy_<unit>``, template ``templates/firewall/llama-server.nft.j2``)
and loads it. The unit loads the same file before every start (``ExecStartPre=+nft -f``),
so after a reboot the port never opens before its rules. Other tables (the operator's
own firewall, Docker's) are never touched; without ``allow_from`` our table and file go.
"""

from __future__ import annotations

import hashlib
import ipaddress
from io import StringIO

from llamadeploy import atomic, packages
from llamadeploy.config import HostConfig
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles.firewall.operations import table_loaded, table_removed

TEMPLATE = "firewall/llama-server.nft.j2"


def table_name(cfg: HostConfig) -> str:
    """nftables identifiers take no '-': ``llama-server`` -> ``llamadeploy_llama_server``."""
    return "llamadeploy_" + cfg.service.name.replace("-", "_")


def rules_path(cfg: HostConfig) -> str:
    return f"{cfg.service.config_dir}/firewall.nft"


def rules(cfg: HostConfig) -> tuple[str, str]:
    """The rules file and the digest it tags the table with (pure)."""
    nets = [ipaddress.ip_network(n, strict=False) for n in cfg.server.allow_from or []]
    v4 = sorted(str(n) for n in nets if n.version == 4)
    v6 = sorted(str(n) for n in nets if n.version == 6)
    port = cfg.server.port
    digest = "llamadeploy " + hashlib.sha256(repr((table_name(cfg), port, v4, v6)).encode()).hexdigest()[:16]
    text = render(TEMPLATE, table=table_name(cfg), unit_name=cfg.service.name, port=port, v4=v4, v6=v6,
                  digest=digest)
    return text, digest


@role("Firewall")
def firewall(cfg: HostConfig) -> None:
    """Rules in place and loaded when ``allow_from`` is set (before the unit that loads them)."""
    path = rules_path(cfg)
    if cfg.server.allow_from is None:
        return
    packages.installed(cfg, "firewall", name="nftables", packages=["nftables"], update=True, cache_time=24 * 3600,
                       no_recommends=True)
    text, digest = rules(cfg)
    atomic.put(name="nftables rules for the port", src=StringIO(text), dest=path, mode="600")
    table_loaded(name="nftables rules loaded", path=path, table=table_name(cfg), digest=digest)


@role("Firewall removed")
def firewall_off(cfg: HostConfig) -> None:
    """Without ``allow_from``: our table goes, once the unit that loaded it has been replaced.

    The rules file stays: a recorded release whose unit loads it (``ExecStartPre``) must still
    start after a rollback; uninstall removes it with the config directory.
    """
    if cfg.server.allow_from is None:
        table_removed(name="No nftables table for the port", table=table_name(cfg))
