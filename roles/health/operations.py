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
