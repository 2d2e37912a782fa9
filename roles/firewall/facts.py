"""What the firewall role reads from a host: the comment of its nftables table."""

from __future__ import annotations

import re
import shlex

from pyinfra.api import FactBase


class NftTableComment(FactBase[str | None]):
    """The comment of ``table inet NAME`` (the rules' digest), "" for a table without one,
    None when the table is not loaded (or nft is not installed)."""

    def command(self, table: str) -> str:
        return f"command -v nft >/dev/null && nft list table inet {shlex.quote(table)} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        if not output:
            return None
        depth = 0  # the table's own comment is at depth 1: a set's or a chain's is deeper
        for line in output:
            m = re.match(r'\s*comment\s+"([^"]*)"', line)
            if m and depth == 1:
                return m.group(1)
            depth += line.count("{") - line.count("}")
        return ""
