"""The RPC role's own operation: wait until the worker listens."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import operation

from llamadeploy.roles.rpc.facts import RpcListening


@operation()
def listening(address: str, port: int, timeout: int = 60):
    """
    Wait until ggml-rpc-server accepts connections on ``address:port`` (on the worker itself).

    + address, port: what the worker binds
    + timeout: seconds to wait before failing the worker with its journal's tail

    Read when it executes: right after a restart it waits; when the port answers, nothing to do.
    """
    ep = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if host.get_fact(RpcListening, address=address, port=port):
        host.noop(f"ggml-rpc-server listens on {ep}")
        return
    check = f"ss -Hltn src {shlex.quote(address)} 'sport = :{int(port)}' | grep -q ."
    yield (f"for i in $(seq {int(timeout) * 2}); do {check} && exit 0; sleep 0.5; done; "
           f"echo ggml-rpc-server does not listen on {shlex.quote(ep)} after {int(timeout)}s: >&2; "
           "journalctl -u ggml-rpc-server -n 20 --no-pager >&2; exit 1")
