"""Facts we read from hosts, as pyinfra ``FactBase`` subclasses.

Each fact is one command and a pure ``process`` so it can be unit-tested from a
recorded output (see ``tests/unit/test_facts.py``).
"""

from __future__ import annotations

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

    requires_command = "lscpu"

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


class ServerHelp(FactBase[frozenset[str]]):
    """The long options the installed ``llama-server`` accepts, read from its ``--help``.

    Flags change between llama.cpp releases (``--mlock``/``--no-mmap`` became
    ``--load-mode``); we check what we render against the binary, not memory.
    """

    def command(self, binary: str) -> str:
        return f"test -x {binary} && {binary} --help 2>&1 || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return parse_help_flags(output)


def parse_help_flags(lines: list[str]) -> frozenset[str]:
    """All ``-x``/``--xyz`` option names that start an option line of ``--help``."""
    import re

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


class DiskFree(FactBase[int | None]):
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""

    def command(self, path: str) -> str:
        import shlex

        return (
            f"d={shlex.quote(path)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
            "df -PB1 \"$d\" | tail -n 1"
        )

    def process(self, output: list[str]) -> int | None:
        fields = output[-1].split() if output else []
        return int(fields[3]) if len(fields) >= 4 and fields[3].isdigit() else None


class ImageServerHelp(FactBase[frozenset[str]]):
    """The long options ``llama-server`` in a local Docker image accepts (its ``--help``)."""

    def command(self, image: str) -> str:
        import shlex

        return f"docker run --rm --network none {shlex.quote(image)} --help 2>&1 || true"

    def process(self, output: list[str]) -> frozenset[str]:
        return parse_help_flags(output)


class DockerImageId(FactBase[str | None]):
    """The local image ID of a reference, or None when the image is not on the host."""

    def command(self, ref: str) -> str:
        import shlex

        return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(ref)} 2>/dev/null || true"

    def process(self, output: list[str]) -> str | None:
        value = "".join(output).strip()
        return value if value.startswith("sha256:") else None


@dataclass(frozen=True)
class MemInfo:
    total: int  #: MemTotal, bytes
    available: int  #: MemAvailable, bytes
    cgroup_limit: int | None  #: memory.max of the host's own cgroup (a container's limit), bytes
    #: most locked memory systemd can grant a service (bytes); None = no ceiling
    memlock_ceiling: int | None = None

    @property
    def usable(self) -> int:
        """What a service here can ever get: the RAM, capped by a cgroup limit around the host."""
        return min(self.total, self.cgroup_limit) if self.cgroup_limit else self.total


#: capability(7) number: lets PID 1 raise a service's hard rlimits (LimitMEMLOCK=)
CAP_SYS_RESOURCE = 24


class HostMemory(FactBase[MemInfo]):
    """Total and available memory, the cgroup v2 limit the whole host (container) runs under,
    and how much memory systemd can let a service lock.

    A unit's ``LimitMEMLOCK=infinity`` only takes effect when PID 1 may raise hard
    limits (CAP_SYS_RESOURCE, bit 24 of CapEff); a container's init often may not, and
    then a service gets at most PID 1's own hard limit (seen: 8 MiB under systemd-nspawn,
    where llama.cpp's mlock then fails with only a warning).
    """

    def command(self) -> str:
        return (
            "grep -E '^(MemTotal|MemAvailable):' /proc/meminfo; echo cgroup $(cat /sys/fs/cgroup/memory.max 2>/dev/null); "
            "grep '^CapEff:' /proc/1/status; grep '^Max locked memory' /proc/1/limits || true"
        )

    def process(self, output: list[str]) -> MemInfo:
        values: dict[str, int] = {}
        limit = None
        can_raise, pid1_hard = True, None
        for line in output:
            parts = line.replace(":", " ").split()
            if len(parts) >= 2 and parts[0] in ("MemTotal", "MemAvailable"):
                values[parts[0]] = int(parts[1]) * 1024
            elif parts and parts[0] == "cgroup" and len(parts) > 1 and parts[1].isdigit():
                limit = int(parts[1])
            elif parts and parts[0] == "CapEff" and len(parts) > 1:
                can_raise = bool(int(parts[1], 16) & (1 << CAP_SYS_RESOURCE))
            elif line.startswith("Max locked memory"):
                hard = line.split()[4]
                pid1_hard = None if hard == "unlimited" else int(hard)
        total = values.get("MemTotal", 0)
        return MemInfo(total=total, available=values.get("MemAvailable", total), cgroup_limit=limit,
                       memlock_ceiling=None if can_raise else pid1_hard)
