"""The front role's operation: a server's state through HAProxy's runtime API."""

from __future__ import annotations

import shlex

from pyinfra import host
from pyinfra.api import OperationError, operation
from pyinfra.facts.server import Command


@operation()
def serving(backend: str, socket: str, timeout: int):
    """
    Wait until HAProxy has at least one server of ``backend`` UP (its health checks passed).

    + backend: HAProxy backend name
    + socket: the admin socket
    + timeout: seconds

    A front that just started or reloaded answers 503 until its checks pass; the deploy is
    done when clients would be served. Gated with ``_if`` on a start or reload.
    """
    q = shlex.quote
    yield (
        f"deadline=$(( $(date +%s) + {int(timeout)} )); "
        f"while [ $(date +%s) -lt $deadline ]; do "
        f"echo 'show stat' | socat stdio {q(socket)} 2>/dev/null | "
        f"awk -F, -v b={q(backend)} '$1 == b && $2 != \"BACKEND\" && $2 != \"FRONTEND\" && $18 ~ /^UP/ {{up=1}} END {{exit !up}}' "
        f"&& exit 0; sleep 1; done; echo {q(f'no server of {backend} passed its health check within {int(timeout)}s')} >&2; "
        f"echo 'show stat' | socat stdio {q(socket)} | cut -d, -f1,2,18,37 >&2; exit 1"
    )


@operation()
def server_state(backend: str, server: str, state: str, socket: str, wait: int = 0):
    """
    Set ``backend/server`` to ``ready``, ``drain`` or ``maint`` through the admin socket.

    + backend, server: HAProxy names
    + state: ``ready`` (enable), ``drain`` (no new requests, running ones finish) or ``maint``
    + socket: the admin socket (``stats socket ... level admin``)
    + wait: seconds to wait, after a drain, until the server's running requests have finished
      (its current sessions reach 0), after ``ready``, until the front sees it up; 0 = no wait

    Reads the server's administrative state first and does nothing when it already
    matches. Rollouts drain a host before its switch and enable it after its gate.
    """
    if state not in ("ready", "drain", "maint"):
        raise OperationError(f"state must be ready, drain or maint, not {state!r}")
    q = shlex.quote
    ask = f"echo {q('show servers state ' + backend)} | socat stdio {q(socket)}"
    # columns: ... srv_name(4) ... srv_admin_state(7); admin bits: 0x01 forced maint, 0x08 forced drain
    current = host.get_fact(Command, command=f"({ask} | awk -v s={q(server)} '$4 == s {{print $7}}') 2>/dev/null || true")
    admin = int(current or -1) if str(current or "").lstrip("-").isdigit() else -1
    now = {0: "ready", 8: "drain", 1: "maint"}.get(admin) if admin >= 0 else None
    if now == state:
        host.noop(f"{backend}/{server} is already {state}")
        return
    cmd = q(f"set server {backend}/{server} state {state}")
    yield f"out=$(echo {cmd} | socat stdio {q(socket)}); [ -z \"$(printf %s \"$out\" | tr -d '[:space:]')\" ] || {{ echo \"$out\" >&2; exit 1; }}"
    if wait and state in ("drain", "ready"):
        # show stat CSV: pxname(1) svname(2) scur(5) status(18)
        test = "$5 == 0" if state == "drain" else "$18 ~ /^UP/"
        what = "its running requests to finish" if state == "drain" else "the front to see it up"
        yield (
            f"deadline=$(( $(date +%s) + {int(wait)} )); while [ $(date +%s) -lt $deadline ]; do "
            f"echo 'show stat' | socat stdio {q(socket)} | awk -F, -v b={q(backend)} -v s={q(server)} "
            f"'$1 == b && $2 == s {{ if ({test}) ok=1 }} END {{exit !ok}}' && exit 0; sleep 1; done; "
            f"echo {q(f'{backend}/{server}: waited {int(wait)}s for {what}')} >&2; exit 1"
        )
