"""The health role's operation: wait for /health after a (re)start."""

from __future__ import annotations

import shlex

from pyinfra.api import operation


@operation()
def wait_healthy(url: str, timeout: int, unit: str):
    """
    Wait until ``url`` answers 200; fail with the unit's last journal lines otherwise.

    + url: the health endpoint as seen from the host itself
    + timeout: seconds to wait (llama-server answers 503 while it loads the model)
    + unit: systemd unit whose journal is shown on failure

    Run it right after a (re)start, gated with ``_if``: it always "changes", so an
    unconditional health gate would make every deploy look like a change.
    """
    q = shlex.quote
    yield (
        f"deadline=$(( $(date +%s) + {int(timeout)} )); code=000; "
        f"while [ $(date +%s) -lt $deadline ]; do "
        f"code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {q(url)} || true); "
        f"[ \"$code\" = 200 ] && exit 0; sleep 1; done; "
        f"echo {q(unit + ': ' + url + ' answered')} \"$code\""
        f"{q(f', not 200, within {int(timeout)}s; last journal lines:')} >&2; "
        f"journalctl -u {q(unit)} -n 40 --no-pager >&2; exit 1"
    )
