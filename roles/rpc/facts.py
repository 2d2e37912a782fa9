"""What the RPC role reads from a head: can it reach its workers' ports."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class RpcReachable(FactBase[dict[str, bool]]):
    """``address:port`` -> whether a TCP connection from this host opens within 3 seconds.

    From the head, because the workers' fences admit only their heads: a check from
    anywhere else would be refused by design.
    """

    def command(self, endpoints: list[str]) -> str:
        checks = []
        for ep in endpoints:
            addr, port = ep.rsplit(":", 1)
            probe = f"exec 3<>/dev/tcp/{addr.strip('[]')}/{int(port)}"
            checks.append(f"if timeout 3 bash -c {shlex.quote(probe)} 2>/dev/null; then echo {shlex.quote(ep)} up; "
                          f"else echo {shlex.quote(ep)} down; fi")
        return "; ".join(checks) or "true"

    def process(self, output: list[str]) -> dict[str, bool]:
        out = {}
        for line in output:
            ep, _, state = line.rpartition(" ")
            if ep:
                out[ep] = state == "up"
        return out

    @staticmethod
    def default() -> dict[str, bool]:
        return {}


class UnitStartedAt(FactBase[int | None]):
    """When ``unit`` last became active, in seconds since the epoch; None when it is not active.

    Wall-clock on purpose: a head compares its own start with its workers' (other hosts, one
    clock by NTP). A worker restarted after its head took its tensors with it: the head must
    restart too, or its next request fails.
    """

    def command(self, unit: str) -> str:
        u = shlex.quote(unit)
        return (f"systemctl is-active --quiet {u} && "
                f"date -d \"$(systemctl show -p ActiveEnterTimestamp --value {u})\" +%s || true")

    def process(self, output: list[str]) -> int | None:
        return int(output[0]) if output and output[0].strip().isdigit() else None
