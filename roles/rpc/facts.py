"""What the RPC role reads from a head: can it reach its workers' ports."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class RpcReachable(FactBase[dict[str, bool]]):
    """``address:port`` -> whether this host (a head) is connected to the worker, or can connect.

    From the head, because the workers' fences admit only their heads. ggml-rpc-server serves
    one client at a time with a listen backlog of one: while the head's llama-server holds its
    connection, a probe waits in the accept queue and, once that is full, its SYN is dropped.
    So an established connection of the head counts first; only without one is a connection
    tried (3 seconds).
    """

    def command(self, endpoints: list[str]) -> str:
        checks = []
        for ep in endpoints:
            addr, port = ep.rsplit(":", 1)
            addr, port = addr.strip("[]"), str(int(port))
            probe = shlex.quote(f"exec 3<>/dev/tcp/{addr}/{port}")
            checks.append(
                f"if ss -Htn state established dst {shlex.quote(addr)} dport = :{port} | grep -q . "
                f"|| timeout 3 bash -c {probe} 2>/dev/null; then echo {shlex.quote(ep)} up; "
                f"else echo {shlex.quote(ep)} down; fi")
        return "; ".join(checks) or "true"

    def process(self, output: list[str]) -> dict[str, bool]:
        out = {}
        for line in output:
            ep, _, state = line.rpartition(" ")
            if ep and state in ("up", "down"):
                out[ep] = state == "up"
        return out

    @staticmethod
    def default() -> dict[str, bool]:
        return {}


class RpcConnected(FactBase[dict[str, bool]]):
    """``address:port`` -> whether this host (a head) holds an established connection to it.

    The head's llama-server keeps one open to each worker while it runs; a worker that stopped
    or restarted closed it, and took the tensors the head had sent with it.
    """

    def command(self, endpoints: list[str]) -> str:
        checks = []
        for ep in endpoints:
            addr, port = ep.rsplit(":", 1)
            addr, port = addr.strip("[]"), str(int(port))
            checks.append(f"if ss -Htn state established dst {shlex.quote(addr)} dport = :{port} | grep -q .; "
                          f"then echo {shlex.quote(ep)} up; else echo {shlex.quote(ep)} down; fi")
        return "; ".join(checks) or "true"

    def process(self, output: list[str]) -> dict[str, bool]:
        return RpcReachable().process(output)

    @staticmethod
    def default() -> dict[str, bool]:
        return {}


class RpcListening(FactBase[bool]):
    """Whether ggml-rpc-server listens on ``address:port`` on this host (a worker): read from the
    socket table, not by connecting (a connection would queue behind the head's, see above)."""

    def command(self, address: str, port: int) -> str:
        return f"ss -Hltn src {shlex.quote(address)} 'sport = :{int(port)}'"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() for line in output)

    @staticmethod
    def default() -> bool:
        return False


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
