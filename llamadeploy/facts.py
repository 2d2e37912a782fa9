"""Facts we read from hosts, as pyinfra ``FactBase`` subclasses.

Only what several roles read lives here (CPU topology: preflight, service and
docker; the ``--help`` parser: service and docker). A fact one role needs sits
in that role's ``facts.py``. Each fact is one command and a pure
``process`` so it can be unit-tested from a recorded output
(``tests/unit/test_facts.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyinfra.api import FactBase


@dataclass(frozen=True)
class CpuInfo:
    """CPU topology; tuning picks threads from it."""

    logical: int
    physical: int
    sockets: int
    numa_nodes: int
    flags: frozenset[str] = frozenset()


class CpuTopology(FactBase[CpuInfo]):
    """Logical CPUs, physical cores (SMT siblings counted once), sockets, NUMA nodes, CPU flags.

    ``lscpu -p`` lists one line per logical CPU that this process may run on, so a
    cpuset-restricted host reports what it can really use.
    """

    def requires_command(self, *args: object, **kwargs: object) -> str:
        return "lscpu"

    def command(self) -> str:
        return "lscpu -p=CPU,CORE,SOCKET,NODE && grep -m1 '^flags' /proc/cpuinfo || true"

    def process(self, output: list[str]) -> CpuInfo:
        cpus, cores, sockets, nodes = set(), set(), set(), set()
        flags: frozenset[str] = frozenset()
        for line in output:
            if line.startswith("flags"):
                flags = frozenset(line.split(":", 1)[1].split())
                continue
            if not line or line.startswith("#"):
                continue
            cpu, core, socket, node = (line.split(",") + ["", "", ""])[:4]
            cpus.add(cpu)
            cores.add((socket, core))
            sockets.add(socket)
            nodes.add(node or "0")
        logical = len(cpus) or 1
        return CpuInfo(
            logical=logical,
            physical=len(cores) or logical,
            sockets=len(sockets) or 1,
            numa_nodes=len(nodes) or 1,
            flags=flags,
        )


def parse_help_flags(lines: list[str]) -> frozenset[str]:
    """All ``-x``/``--xyz`` option names that start an option line of ``--help``."""
    flags: set[str] = set()
    for line in lines:
        if not line.startswith("-"):
            continue
        # the option column: leading chunks (split on 2+ spaces) that start with "-"
        for chunk in re.split(r"\s{2,}", line.strip()):
            if not chunk.startswith("-"):
                break
            for token in re.split(r"[,\s]+", chunk):
                if re.fullmatch(r"--?[A-Za-z0-9][A-Za-z0-9-]*", token):
                    flags.add(token)
    return frozenset(flags)
