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


class FirstLines(FactBase[dict[str, str]]):
    """For each of ``paths`` that is a regular file: its first line ("" for an empty file); a
    path without one is not in the result. One command for all of them: what a fence checks while
    pyinfra prepares (its drop-ins' headers) costs one round trip, not one per file."""

    def command(self, paths: list[str]) -> str:
        return "; ".join(f"p={shlex.quote(p)}; [ -f \"$p\" ] && printf '%s\\t%s\\n' \"$p\" \"$(head -n 1 \"$p\")\""
                         for p in paths) + "; true"

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def process(self, output: list[str]) -> dict[str, str]:
        return {path: first for path, sep, first in (line.partition("\t") for line in output) if sep}
