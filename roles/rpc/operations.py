"""The RPC role's own operation: wait until the worker listens."""

from __future__ import annotations

import shlex
from collections.abc import Callable

from pyinfra import host
from pyinfra.api import OperationError, operation

from llamadeploy.roles.rpc.facts import RpcListening


@operation()
def listening(address: str | None, port: int, timeout: int = 60):
    """
    Wait until ggml-rpc-server accepts connections on ``address:port`` (on the worker itself).

    + address, port: what the worker binds
    + timeout: seconds to wait before failing the worker with its journal's tail

    Read when it executes: right after a restart it waits; when the port answers, nothing to do.
    ``address`` None: this host is no worker (the step is shared so that heads wait for it).
    """
    if address is None:
        host.noop("not an RPC worker")
        return
    ep = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    if host.get_fact(RpcListening, address=address, port=port):
        host.noop(f"ggml-rpc-server listens on {ep}")
        return
    check = f"{RpcListening().command(address, port)} | grep -q ."
    yield (f"for i in $(seq {int(timeout) * 2}); do {check} && exit 0; sleep 0.5; done; "
           f"echo ggml-rpc-server does not listen on {shlex.quote(ep)} after {int(timeout)}s: >&2; "
           "journalctl -u ggml-rpc-server -n 20 --no-pager >&2; exit 1")


@operation()
def workers_checked(workers: list[str], ready: Callable[[], dict[str, bool]]):
    """
    Fail the head, before it changes anything, when a worker of this run did not come up.

    + workers: the head's workers that are in this run
    + ready: worker -> whether its steps succeeded; read when this executes (they ran before)
    """
    if not workers:
        host.noop("no RPC worker in this run (the preflight checked their ports)")
        return
    if not host.state.is_executing:
        host.noop("checked when the workers have run")
        return
    down = [w for w, ok in ready().items() if not ok]
    if down:
        raise OperationError(f"RPC worker(s) {', '.join(down)} did not come up in this run (failed, see their "
                             "errors above; or not run yet: --serial runs hosts one by one, workers first "
                             "is required): the head is not switched onto them")
    host.noop(f"RPC workers {', '.join(workers)} are up")
    yield from ()  # an operation is a generator, even one that only checks
