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
