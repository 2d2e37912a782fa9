"""The health role's operation: wait for /health after a (re)start."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import operation


@operation()
def chat_answers(url: str, alias: str, timeout: int, unit: str, key_file: str | None = None):
    """
    One real chat completion must come back (200 with a choice) within ``timeout`` seconds.

    + url: ``/v1/chat/completions`` as seen from the host itself
    + alias: the model name to ask for
    + timeout: seconds for the whole request
    + unit: systemd unit (or compose service) named in the failure message
    + key_file: host file with the API key, or None

    ``/health`` says the model loaded; this says it answers: a release that loads and
    then fails on its first batch (a CPU kernel crash, a broken chat template) fails here.
    The key goes from its file through a pipe into curl's header list (``-H @-``): never
    on a command line. Gated with ``_if`` like :func:`wait_healthy`.
    """
    q = shlex.quote
    body = json.dumps({"model": alias, "max_tokens": 1,
                       "messages": [{"role": "user", "content": "Reply with one word: ready?"}]})
    headers = (f"{{ printf 'Authorization: Bearer '; cat {q(key_file)}; }}" if key_file else "printf ''")
    yield (
        f"out=$(mktemp) && code=$({headers} | curl -s -o \"$out\" -w '%{{http_code}}' --max-time {int(timeout)} "
        f"-H @- -H 'Content-Type: application/json' --data {q(body)} {q(url)} || true); "
        f"if [ \"$code\" = 200 ] && grep -q '\"choices\"' \"$out\"; then rm -f \"$out\"; exit 0; fi; "
        f"echo {q(unit + ': a chat completion at ' + url + ' answered')} \"$code\"{q(', not 200 with a choice:')} >&2; "
        f"head -c 600 \"$out\" >&2; rm -f \"$out\"; exit 1"
    )


@operation()
def wait_healthy(url: str, timeout: int, unit: str, alive: str | None = None, logs: str | None = None):
    """
    Wait until ``url`` answers 200; fail with the server's last log lines otherwise, and fail
    at once when the server exits or restarts instead of waiting out ``timeout``.

    + url: the health endpoint as seen from the host itself
    + timeout: seconds to wait (llama-server answers 503 while it loads the model)
    + unit: what is named in the failure message (systemd unit or compose service)
    + alive: shell that prints the server's restart count and exits non-zero when it does not
      run (:func:`unit_alive`, :func:`container_alive`); default: the systemd unit ``unit``
    + logs: shell that prints the server's last log lines; default: ``unit``'s journal

    Run it right after a (re)start, gated with ``_if``: it always "changes", so an
    unconditional health gate would make every deploy look like a change. Why the restart
    count: a server that crashes at start is restarted by systemd (``Restart=on-failure``)
    or Docker and would otherwise look like one that is still loading until the deadline.
    """
    q = shlex.quote
    alive = alive or unit_alive(unit)
    logs = logs or f"journalctl -u {q(unit)} -n 40 --no-pager"
    yield (
        f"deadline=$(( $(date +%s) + {int(timeout)} )); code=000; why={q(f'not 200 within {int(timeout)}s')}; "
        f"n0=$( ({alive}) ) || n0=-1; "
        f"while [ $(date +%s) -lt $deadline ]; do "
        f"code=$(curl -s -o /dev/null -w '%{{http_code}}' --max-time 5 {q(url)} || true); "
        f"[ \"$code\" = 200 ] && exit 0; "
        f"n=$( ({alive}) ) || {{ why='the server is not running (it exited)'; break; }}; "
        f"[ \"$n\" -gt \"$n0\" ] && {{ why='the server restarted (it crashed)'; break; }}; "
        f"sleep 1; done; "
        f"echo {q(unit + ': ' + url + ' answered')} \"$code\"\": $why; last log lines:\" >&2; "
        f"{logs} >&2; exit 1"
    )


def unit_alive(unit: str) -> str:
    """Shell: the systemd unit's restart count (``NRestarts``); exit 1 when it is failed, inactive
    or waiting to restart after a crash (pure)."""
    return (f"s=$(systemctl show -p ActiveState -p SubState -p NRestarts -- {shlex.quote(unit)}) || exit 1; "
            "case \"$s\" in *ActiveState=failed*|*ActiveState=inactive*|*SubState=auto-restart*) exit 1;; esac; "
            "printf '%s\\n' \"$s\" | sed -n 's/^NRestarts=//p'")


def container_alive(project_dir: str, compose: str, service: str) -> str:
    """Shell: the compose service's container restart count; exit 1 when it is not running (pure)."""
    q = shlex.quote
    return (f"c=$(cd {q(project_dir)} && {compose} ps -q {q(service)}) && [ -n \"$c\" ] || exit 1; "
            "s=$(docker inspect -f '{{.State.Status}} {{.RestartCount}}' \"$c\") || exit 1; "
            "case \"$s\" in running\\ *) echo \"${s#* }\";; *) exit 1;; esac")
