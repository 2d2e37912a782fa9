"""What the ownership role reads from a host: its record, and the state of the configured paths."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class OwnershipRecords(FactBase[dict[str, frozenset[str]]]):
    """Every ownership record in a directory: file name -> its lines (``dir /opt/llama.cpp``,
    ``account llama``); {} on a fresh host or one deployed before records existed."""

    def command(self, path: str) -> str:
        p = shlex.quote(path)
        return f"for f in {p}/*.owned; do [ -f \"$f\" ] || continue; echo \"== ${{f##*/}}\"; cat \"$f\"; done"

    @staticmethod
    def default() -> dict[str, frozenset[str]]:
        return {}

    def process(self, output: list[str]) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        name = None
        for line in output:
            if line.startswith("== "):
                name = line[3:].strip()
                out[name] = set()
            elif name and line.strip():
                out[name].add(line.strip())
        return {k: frozenset(v) for k, v in out.items()}


class PathStates(FactBase[dict[str, str]]):
    """For each path: ``absent``, ``empty`` (a directory with nothing in it but mount points),
    ``file`` (not a directory), or ``<n> <first entries>`` for a directory that holds something."""

    def command(self, paths: list[str]) -> str:
        # mount points are not content: a cache bind-mounted into the cache directory (the sandbox's
        # shared ccache), an NFS model share; uninstall never crosses them either
        entries = ("ls -A \"$p\" | while IFS= read -r e; do mountpoint -q \"$p/$e\" 2>/dev/null || "
                   "printf '%s\\n' \"$e\"; done")
        return "; ".join(
            f"p={shlex.quote(p)}; if [ -d \"$p\" ]; then n=$({entries} | wc -l); "
            f"printf '%s\\t%s %s\\n' \"$p\" \"$n\" \"$({entries} | head -n 3 | tr '\\n' ' ')\"; "
            "elif [ -e \"$p\" ]; then printf '%s\\tfile\\n' \"$p\"; else printf '%s\\tabsent\\n' \"$p\"; fi"
            for p in paths
        )

    @staticmethod
    def default() -> dict[str, str]:
        return {}

    def process(self, output: list[str]) -> dict[str, str]:
        out = {}
        for line in output:
            path, _, state = line.partition("\t")
            state = state.strip()
            out[path] = "empty" if state.split()[:1] == ["0"] else state
        return out
