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


def _asked(url: str, body: dict, timeout: int, key_file: str | None, verdict: str, failed: str) -> str:
    """Shell: POST ``body`` to ``url`` (the key piped into curl's header list from its file, never an
    argument); ``verdict`` reads the reply in ``$out`` and exits 0 when it makes sense (pure)."""
    q = shlex.quote
    headers = (f"{{ printf 'Authorization: Bearer '; cat {q(key_file)}; }}" if key_file else "printf ''")
    return (
        f"out=$(mktemp) && code=$({headers} | curl -s -o \"$out\" -w '%{{http_code}}' --max-time {int(timeout)} "
        f"-H @- -H 'Content-Type: application/json' --data {q(json.dumps(body))} {q(url)} || true); "
        f"if [ \"$code\" = 200 ] && v=$({verdict}); then echo \"$v\"; rm -f \"$out\"; exit 0; fi; "
        f"echo {q(failed)} \"$code\": \"$v\" >&2; head -c 600 \"$out\" >&2; rm -f \"$out\"; exit 1"
    )


#: two sentences that mean the same, and one that does not: an embedding model must tell them apart
SIMILAR = ("The cat sits on the mat.", "A cat is sitting on a mat.")
UNRELATED = "Quarterly tax filings are due in April."
#: awk over one vector per line (the reply's ``embedding`` arrays, in input order), with ``want``
#: the model's dimension (0 = unknown): the dimension and cosine similarities; exits 1 unless there
#: are three vectors of one dimension, that dimension is the model's, and the similar pair scores
#: higher than the unrelated one
_COSINES = (
    "awk -F, -v want={want} 'NR==1{{n=NF}} NF!=n{{bad=1}} {{for(i=1;i<=NF;i++)v[NR,i]=$i}} "
    "END{{if(NR!=3||bad||n<2)exit 1; if(want&&n!=want){{printf \"%d dimensions, the model has %d\", n, want; exit 1}} "
    "for(i=1;i<=n;i++){{ab+=v[1,i]*v[2,i];ac+=v[1,i]*v[3,i];"
    "aa+=v[1,i]^2;bb+=v[2,i]^2;cc+=v[3,i]^2}} if(aa*bb*cc==0)exit 1; s=ab/sqrt(aa*bb);u=ac/sqrt(aa*cc); "
    "printf \"%d dimensions, similar %.3f, unrelated %.3f\", n, s, u; exit !(s>u)}}'"
)


@operation()
def embeddings_answer(url: str, alias: str, timeout: int, unit: str, key_file: str | None = None,
                      dimensions: int | None = None):
    """
    ``/v1/embeddings`` must return vectors that make sense: three of the model's dimension, and two
    similar sentences closer (cosine) than an unrelated one.

    + url: ``/v1/embeddings`` as seen from the host itself
    + alias: the embedding model's name
    + timeout: seconds for the whole request (an on-demand model loads first)
    + unit: named in the failure message
    + key_file: host file with the API key, or None
    + dimensions: the length the model's GGUF header gives its vectors; None = unknown (then three
      vectors of any one length pass). A client's index is built for that length: vectors of
      another (a wrong pooling, another model under the alias) would not fit it

    A 200 alone would pass a model that returns zeros or a chat model's hidden states with the
    wrong pooling. The check is awk on the host (no Python needed there).
    """
    body = {"model": alias, "input": [*SIMILAR, UNRELATED]}
    vectors = ("tr -d ' \\n' < \"$out\" | grep -o '\"embedding\":\\[[^]]*\\]' | "
               "sed 's/^\"embedding\":\\[//; s/\\]$//' | " + _COSINES.format(want=int(dimensions or 0)))
    yield _asked(url, body, timeout, key_file, vectors,
                 f"{unit}: embeddings of {alias} at {url} answered")


#: a query, and documents of which exactly one answers it (index 1)
RERANK_QUERY = "What is the capital of France?"
RERANK_DOCUMENTS = ("The cat sat on the mat.", "Paris is the capital and largest city of France.",
                    "Bananas are rich in potassium.")


@operation()
def rerank_answers(url: str, alias: str, timeout: int, unit: str, key_file: str | None = None):
    """
    ``/v1/rerank`` must put the document that answers the query first (the highest score).

    + url: ``/v1/rerank`` as seen from the host itself
    + alias: the reranker's name
    + timeout: seconds for the whole request
    + unit: named in the failure message
    + key_file: host file with the API key, or None
    """
    body = {"model": alias, "query": RERANK_QUERY, "documents": list(RERANK_DOCUMENTS)}
    best = ("tr -d ' \\n' < \"$out\" | grep -o '{[^{}]*\"relevance_score\"[^{}]*}' | "
            "awk '{i=$0; sub(/.*\"index\":/,\"\",i); sub(/[^0-9].*/,\"\",i); s=$0; "
            "sub(/.*\"relevance_score\":/,\"\",s); sub(/[,}].*/,\"\",s); if(NR==1||s+0>m+0){m=s;b=i}} "
            "END{printf \"best document %s (score %s)\", b, m; exit !(NR==3&&b==1)}'")
    yield _asked(url, body, timeout, key_file, best, f"{unit}: reranking by {alias} at {url} answered")


@operation()
def unloaded(url: str, alias: str, key_file: str | None = None):
    """
    Ask the router to unload a model the gate loaded and the inventory loads on demand
    (``POST /models/unload``): after a deploy, on-demand models take no memory until asked for.

    + url: the router's ``/models/unload``
    + alias: the model
    + key_file: host file with the API key, or None
    """
    q = shlex.quote
    headers = (f"{{ printf 'Authorization: Bearer '; cat {q(key_file)}; }}" if key_file else "printf ''")
    yield (f"code=$({headers} | curl -s -o /dev/null -w '%{{http_code}}' --max-time 60 -H @- "
           f"-H 'Content-Type: application/json' --data {q(json.dumps({'model': alias}))} {q(url)} || true); "
           f"[ \"$code\" = 200 ] || {{ echo {q(f'unloading {alias} at {url} answered')} \"$code\" >&2; exit 1; }}")


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
