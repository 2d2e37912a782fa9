"""What the preflight reads from a host: memory, cgroup limit, what systemd can let a service lock."""

from __future__ import annotations

from dataclasses import dataclass

from pyinfra.api import FactBase


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


@dataclass(frozen=True)
class PortHolder:
    pid: int
    name: str  #: the process name ``ss`` shows
    cgroup: str  #: its cgroup path (``/system.slice/ssh.service``), "" when unreadable
    address: str  #: the local address it listens on (``0.0.0.0:22``)


class PortHolders(FactBase[list[PortHolder]]):
    """The processes that listen on a TCP port (any address), with their cgroups: ``ss -ltnp``.

    Why the cgroup: a port held by this deploy's own server (its unit's cgroup, or Docker's proxy
    for its container) is no conflict; anything else is.
    """

    def command(self, port: int) -> str:
        return (
            f"command -v ss >/dev/null || exit 0; ss -Hltnp 'sport = :{int(port)}' | while read -r _ _ _ local _ users; do "
            "printf '%s\\n' \"$users\" | grep -o '\"[^\"]*\",pid=[0-9]*' | while IFS=, read -r name pid; do "
            "pid=${pid#pid=}; echo \"$pid $local $name $(tail -n 1 /proc/$pid/cgroup 2>/dev/null | cut -d: -f3)\"; "
            "done; done"
        )

    @staticmethod
    def default() -> list[PortHolder]:
        return []

    def process(self, output: list[str]) -> list[PortHolder]:
        out = []
        for line in output:
            parts = line.split()
            if len(parts) >= 3 and parts[0].isdigit():
                out.append(PortHolder(int(parts[0]), parts[2].strip('"'), parts[3] if len(parts) > 3 else "", parts[1]))
        return sorted(set(out), key=lambda h: (h.pid, h.address))
