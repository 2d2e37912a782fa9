"""The front role's operation: a server's state through HAProxy's runtime API."""

from __future__ import annotations

import posixpath
import shlex

from pyinfra import host
from pyinfra.api import OperationError, operation
from pyinfra.facts.files import File
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


#: awk over ``show servers state``: the version line, the header, and the lines of servers whose
#: "NAME ADDRESS PORT" is in ``keep`` (``|``-separated). The header ("# be_id be_name srv_id
#: srv_name srv_addr ...", $1 being "#") names the columns, which HAProxy 2.6 and 3.0 share
STATE_PICK = ('BEGIN {n = split(keep, k, "|"); for (i = 1; i <= n; i++) want[k[i]] = 1} '
              'NR == 1 {print; next} /^#/ {for (i = 2; i <= NF; i++) c[$i] = i - 1; print; next} '
              '($c["srv_name"] " " $c["srv_addr"] " " $c["srv_port"]) in want {print}')


def worker_pid(socket: str) -> str:
    """Shell printing the PID of the HAProxy worker that answers the admin ``socket`` (nothing
    when none answers): a reload starts another."""
    return f"echo 'show info' | socat stdio {shlex.quote(socket)} 2>/dev/null | awk -F': ' " + \
        shlex.quote('$1 == "Pid" {print $2}')


@operation()
def reloaded_keeping_states(service: str, socket: str, state_file: str, backend: str, keep: list[str],
                            timeout: int = 30):
    """
    Reload HAProxy with its servers' states carried over: a drain or maintenance set by hand,
    a server its checks took down.

    + service: the systemd unit (``haproxy.service``)
    + socket: the admin socket
    + state_file: the config's ``server-state-file``, read once by the new process
      (``load-server-state-from-file global``)
    + backend: the backend whose servers' states are kept (the per-model backends track it)
    + keep: ``"NAME ADDRESS PORT"`` of each server in the new config
    + timeout: seconds to wait for the new worker, after which the file goes anyway

    HAProxy applies a state file's address and port over the config's (a known trap:
    haproxy/haproxy#1412, #3296), so only the lines of servers whose name, address and port
    are unchanged are kept: a moved server starts from its config. The file is removed once
    the new worker answers (the new process has read it), and on exit or a signal: an
    operator's later ``systemctl reload`` finds no stale states to restore (a SIGKILL leaves it
    until the next deploy's reload or the next boot: it lives under /run).
    """
    q = shlex.quote
    ask = f"socat stdio {q(socket)}"
    worker = worker_pid(socket)
    staged = f"{state_file}.new"
    yield (
        f"trap {q(f'rm -f {q(state_file)} {q(staged)}')} EXIT; trap 'exit 1' HUP INT TERM; pid=$({worker}); "
        f"[ -n \"$pid\" ] || {{ echo {q('HAProxy runtime API did not answer: not reloaded')} >&2; exit 1; }}; "
        f"echo {q('show servers state ' + backend)} | {ask} | awk -v keep={q('|'.join(keep))} {q(STATE_PICK)} "
        f"> {q(staged)} && mv -f {q(staged)} {q(state_file)}; "
        f"systemctl reload {q(service)} || exit 1; "
        f"for i in $(seq {int(timeout) * 10}); do now=$({worker}); "
        '[ -n "$now" ] && [ "$now" != "$pid" ] && exit 0; sleep 0.1; done; '
        f"echo {q(f'HAProxy reloaded, but no new worker answered within {int(timeout)}s')} >&2; exit 1"
    )


@operation()
def server_state(backend: str, server: str, state: str, socket: str, wait: int = 0, marker: str | None = None):
    """
    Set ``backend/server`` to ``ready``, ``drain`` or ``maint`` through the admin socket.

    + backend, server: HAProxy names
    + state: ``ready`` (enable), ``drain`` (no new requests, running ones finish) or ``maint``
    + socket: the admin socket (``stats socket ... level admin``)
    + wait: seconds to wait, after a drain, until the server's running requests have finished
      (its current sessions reach 0), after ``ready``, until the front sees it up; 0 = no wait
    + marker: a rollout's own mark on this front (a host file): a drain of a ready server writes
      it, and ``ready`` enables only a server that carries it, then removes it. So a server the
      operator drained stays drained, and a rollout killed mid-batch leaves marks the next one
      repairs. None: set the state as asked (the operator's own use)

    Reads the server's administrative state first and does nothing when it already
    matches. A server the front does not know yet (its deploy comes after the servers') has
    nothing to drain or enable: a noop. Rollouts drain a host before its switch and enable it
    after its gate.
    """
    if state not in ("ready", "drain", "maint"):
        raise OperationError(f"state must be ready, drain or maint, not {state!r}")
    q = shlex.quote
    ask = f"echo {q('show servers state ' + backend)} | socat stdio {q(socket)}"
    # columns: ... srv_name(4) ... srv_admin_state(7); admin bits: 0x01 forced maint, 0x08 forced drain
    current = host.get_fact(Command, command=f"(out=$({ask}) && printf '%s\\n' \"$out\" | awk -v s={q(server)} "
                                             "'$4 == s {print $7; f=1} END {if (!f) print \"absent\"}') 2>/dev/null || true")
    if (current or "").strip() == "absent":
        host.noop(f"{backend}/{server} is not in this front's configuration yet: nothing to {state}")
        return
    admin = int(current or -1) if str(current or "").lstrip("-").isdigit() else -1
    now = {0: "ready", 8: "drain", 1: "maint"}.get(admin) if admin >= 0 else None
    marked = bool(marker and host.get_fact(File, path=marker))
    if marker and state == "ready" and not marked:
        host.noop(f"{backend}/{server} is {now or 'in an unknown state'} and no rollout drained it: left as it is")
        return
    if marker and state != "ready" and now not in ("ready", None):
        host.noop(f"{backend}/{server} is {now} already ({'by a rollout' if marked else 'not by a rollout'}): "
                  "left as it is")
        return
    if now == state:
        if marked and state == "ready":
            yield f"rm -f {q(str(marker))}"
            return
        host.noop(f"{backend}/{server} is already {state}")
        return
    if marker and state != "ready":  # marked before the drain: a run killed in between is repaired later
        yield f"mkdir -p {q(posixpath.dirname(marker))} && touch {q(marker)}"
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
    if marked and state == "ready":
        yield f"rm -f {q(str(marker))}"
