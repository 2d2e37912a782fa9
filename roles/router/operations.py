"""The router role's operation: re-read the presets without a restart."""

from __future__ import annotations

import json
import shlex

from pyinfra.api import operation


@operation()
def models_reloaded(base: str, startup: list[str], key_file: str | None = None):
    """
    Ask the router to re-read its presets (``GET /models?reload=1``), then load the startup models.

    + base: the router's address as seen from the host, e.g. ``http://127.0.0.1:8080``
    + startup: aliases that load at startup; a reload lists new models but never spawns one
      (``server-models.cpp``), so each is asked to load; "already running" is fine
    + key_file: host file with the API key, or None

    The router unloads only the models whose section changed or went, and waits for them; the
    others keep serving with their KV caches. Gate on "the presets or a model file changed".
    """
    q = shlex.quote
    headers = (f"{{ printf 'Authorization: Bearer '; cat {q(key_file)}; }}" if key_file else "printf ''")
    fail = "{ echo \"$what answered $code:\" >&2; head -c 400 \"$out\" >&2; rm -f \"$out\"; exit 1; }"
    lines = [
        "out=$(mktemp)",
        f"what={q('GET ' + base + '/models?reload=1')}",
        f"code=$({headers} | curl -s -o \"$out\" -w '%{{http_code}}' --max-time 300 -H @- {q(base + '/models?reload=1')}"
        " || true)",
        f"[ \"$code\" = 200 ] || {fail}",
    ]
    for alias in startup:
        lines += [
            f"what={q('loading ' + alias)}",
            f"code=$({headers} | curl -s -o \"$out\" -w '%{{http_code}}' --max-time 60 -H @- "
            f"-H 'Content-Type: application/json' --data {q(json.dumps({'model': alias}))} {q(base + '/models/load')}"
            " || true)",
            f"{{ [ \"$code\" = 200 ] || {{ [ \"$code\" = 400 ] && grep -q 'already running' \"$out\"; }}; }} || {fail}",
        ]
    yield "; ".join([*lines, "rm -f \"$out\""])
