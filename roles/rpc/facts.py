"""What the RPC role reads: from a head, its workers' ports; from a worker, its own socket."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


def _endpoint_checks(endpoints: list[str], probe: bool) -> str:
    """Shell: ``<endpoint> up|down`` per endpoint; up = this host holds an established connection
    to it, or (``probe``) a new connection opens within 3 seconds."""
    checks = []
    for ep in endpoints:
        addr, port = ep.rsplit(":", 1)
        addr, port = addr.strip("[]"), str(int(port))
        test = f"ss -Htn state established dst {shlex.quote(addr)} dport = :{port} | grep -q ."
        if probe:
            test += f" || timeout 3 bash -c {shlex.quote(f'exec 3<>/dev/tcp/{addr}/{port}')} 2>/dev/null"
        checks.append(f"if {test}; then echo {shlex.quote(ep)} up; else echo {shlex.quote(ep)} down; fi")
    return "; ".join(checks) or "true"


def _endpoint_states(output: list[str]) -> dict[str, bool]:
    out = {}
    for line in output:
        ep, _, state = line.rpartition(" ")
        if ep and state in ("up", "down"):
            out[ep] = state == "up"
    return out


class RpcReachable(FactBase[dict[str, bool]]):
    """``address:port`` -> whether this host (a head) is connected to the worker, or can connect.

    From the head, because the workers' fences admit only their heads. ggml-rpc-server serves
    one client at a time with a listen backlog of one: while the head's llama-server holds its
    connection, a probe waits in the accept queue and, once that is full, its SYN is dropped.
    So an established connection of the head counts first; only without one is a connection
    tried (3 seconds).
    """

    def command(self, endpoints: list[str]) -> str:
        return _endpoint_checks(endpoints, probe=True)

    def process(self, output: list[str]) -> dict[str, bool]:
        return _endpoint_states(output)

    @staticmethod
    def default() -> dict[str, bool]:
        return {}


class RpcConnected(FactBase[dict[str, bool]]):
    """``address:port`` -> whether this host (a head) holds an established connection to it.

    The head's llama-server keeps one open to each worker while it runs; a worker that stopped
    or restarted closed it, and took the tensors the head had sent with it.
    """

    def command(self, endpoints: list[str]) -> str:
        return _endpoint_checks(endpoints, probe=False)

    def process(self, output: list[str]) -> dict[str, bool]:
        return _endpoint_states(output)

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
