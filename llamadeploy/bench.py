"""``python -m llamadeploy.bench``: drive a deployed host with concurrent streaming chat clients.

Reports, per concurrency level: aggregate completion tok/s, TTFT p50/p95 and
errors by kind. Every request asks for exactly ``max_tokens`` tokens
(``ignore_eos``) so that two servers are compared on equal work.

Errors are counted, never retried, by what the user saw: the connection could not be made; the
server closed a kept-alive connection before answering (a keep-alive drop: the request never
reached it); the stream broke off after it began (a mid-stream abort); the stream ended without
``data: [DONE]`` or without a ``finish_reason`` (a truncated reply that looked complete to the
transport); an HTTP status; a timeout. Only a stream with a ``finish_reason`` and ``[DONE]`` is a
success.

    python -m llamadeploy.bench --url http://HOST:8080 --clients 1,4,8 [--json]
    python -m llamadeploy.bench --inventory inventory/site.py     # every deployed host

With ``--inventory``, each host's URL and key come from its deploy manifest over
SSH (pyinfra), and a memory-bandwidth probe on the host gives the decode
roofline ratio: tok/s at 1 client x model bytes / read bandwidth.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import httpx

PROMPT = (
    "You are a helpful assistant for an operations team. Explain, step by step and in plain "
    "words, how a load balancer decides which backend receives the next request, what a health "
    "check is, and why connection draining matters during a rolling deploy. Request {n}."
)
#: a one-line question (~20 tokens with a chat template): the kind of load where TTFT is
#: not dominated by evaluating the prompt
SHORT_PROMPT = "Tell me a story about a cat. Request {n}."


@dataclass
class Sample:
    ttft: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    clients: int
    requests: int
    ok: int
    errors: dict[str, int]
    wall_s: float
    tokens: int
    tok_per_s: float
    ttft_p50: float | None
    ttft_p95: float | None


@dataclass
class Report:
    url: str
    model: str
    max_tokens: int
    levels: list[LevelResult] = field(default_factory=list)
    host: str | None = None
    read_bandwidth: int | None = None
    roofline_1_client: float | None = None
    prompt: str = PROMPT


def wait_healthy(url: str, timeout: float = 120) -> None:
    """Until ``<url>/health`` answers 200, else ``TimeoutError`` with the last answer.

    For whoever restarts a server outside a deploy (benchmarks, tests): a deploy's own gate
    runs on the host itself (``roles/health``).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/health", timeout=2).status_code
            if last == 200:
                return
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health never answered 200 within {timeout:g}s (last: {last})")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def _one(client: httpx.AsyncClient, model: str, n: int, max_tokens: int, prompt: str) -> Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt.format(n=n)}],
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.7,
        "stream_options": {"include_usage": True},
    }
    sample = Sample()
    start = time.perf_counter()
    answered = False  # the response's status line arrived
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            answered = True
            if r.status_code != 200:
                sample.error = f"HTTP {r.status_code}"
                return sample
            chunks, done, finished = 0, False, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    sample.tokens = data["usage"]["completion_tokens"]
                for choice in data.get("choices") or []:
                    finished = finished or bool(choice.get("finish_reason"))
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if sample.ttft is None:
                            sample.ttft = time.perf_counter() - start
            sample.tokens = sample.tokens or chunks
            sample.error = stream_error(done, finished)
    except httpx.HTTPError as exc:
        sample.error = error_kind(exc, answered)
    return sample


#: what the user saw, by kind (the keys of ``errors``/``failures``)
CONNECT_FAILURE = "connect failure"
#: llama-server closed a kept-alive connection after a stream, and the next request on it got no
#: response at all (it never reached the server): counted apart from failed requests, never retried
KEEPALIVE_DROP = "keep-alive drop (no response)"
MID_STREAM_ABORT = "mid-stream abort"
NO_DONE = "stream ended without [DONE]"
NO_FINISH_REASON = "stream ended without finish_reason"


def stream_error(done: bool, finished: bool) -> str | None:
    """A stream the transport finished cleanly is a success only with ``[DONE]`` and a
    ``finish_reason`` (pure)."""
    if not done:
        return NO_DONE
    if not finished:
        return NO_FINISH_REASON
    return None


def error_kind(exc: httpx.HTTPError, answered: bool) -> str:
    """The kind of a transport error (pure): ``answered``: the status line had arrived."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return CONNECT_FAILURE
    if isinstance(exc, httpx.TimeoutException):
        return type(exc).__name__
    if answered:
        return MID_STREAM_ABORT
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return KEEPALIVE_DROP
    return type(exc).__name__


async def run_level(url: str, model: str, clients: int, per_client: int, max_tokens: int,
                    headers: dict[str, str], prompt: str = PROMPT, keepalive: bool = True) -> LevelResult:
    """``clients`` concurrent clients, each sending ``per_client`` requests back to back
    over its own kept-alive connection (as an SDK client does); ``keepalive=False``: a new
    connection per request, which no server-side close can hit (what is left is the server's
    own speed)."""
    samples: list[Sample] = []
    limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)

    async def client_loop(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
            for i in range(per_client):
                samples.append(await _one(client, model, c * 1000 + i, max_tokens, prompt))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - start
    ok = [s for s in samples if s.error is None]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    tokens = sum(s.tokens for s in ok)
    return LevelResult(
        clients=clients, requests=len(samples), ok=len(ok),
        errors=dict(Counter(s.error for s in samples if s.error)),
        wall_s=round(wall, 3), tokens=tokens, tok_per_s=round(tokens / wall, 2),
        ttft_p50=percentile(ttfts, 50), ttft_p95=percentile(ttfts, 95),
    )



@dataclass
class SoakResult:
    url: str
    clients: int
    seconds: float
    requests: int
    ok: int
    keepalive_drops: int
    #: every other error, by kind (connect failures, mid-stream aborts, truncated streams, HTTP
    #: status, timeouts): a soak passes with none
    failures: dict[str, int]
    tokens: int
    tok_per_s: float
    ttft_p50: float | None
    ttft_p95: float | None
    #: (seconds since start, server RSS in KiB), sampled while the load runs
    rss_kib: list[tuple[float, int]] = field(default_factory=list)

    @property
    def rss_warm_kib(self) -> list[int]:
        """The RSS samples once warm: from the first after a tenth of the run (loading and the
        first requests' allocations come before), the base :attr:`rss_growth` is measured from."""
        return [kib for t, kib in self.rss_kib if t >= self.seconds / 10]

    @property
    def rss_growth(self) -> float | None:
        """Last RSS over the RSS once warm (the first sample after a tenth of the run), minus 1."""
        warm = self.rss_warm_kib
        return warm[-1] / warm[0] - 1 if len(warm) >= 2 and warm[0] else None


async def _soak(url: str, model: str, clients: int, seconds: float, max_tokens: int, headers: dict[str, str],
                prompt: str, sample_rss: Callable[[], int] | None, interval: float) -> SoakResult:
    samples: list[Sample] = []
    rss: list[tuple[float, int]] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def client_loop(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
            i = 0
            while time.perf_counter() < deadline:
                samples.append(await _one(client, model, c * 100_000 + i, max_tokens, prompt))
                i += 1

    async def sampler() -> None:
        while sample_rss is not None and time.perf_counter() < deadline:
            rss.append((round(time.perf_counter() - start, 1), await asyncio.to_thread(sample_rss)))
            await asyncio.sleep(interval)

    await asyncio.gather(sampler(), *(client_loop(c) for c in range(clients)))
    wall = time.perf_counter() - start
    ok = [x for x in samples if x.error is None]
    errors = Counter(x.error for x in samples if x.error)
    drops = errors.pop(KEEPALIVE_DROP, 0)
    ttfts = [x.ttft for x in ok if x.ttft is not None]
    tokens = sum(x.tokens for x in ok)
    return SoakResult(url, clients, round(wall, 1), len(samples), len(ok), drops, dict(errors), tokens,
                      round(tokens / wall, 2), percentile(ttfts, 50), percentile(ttfts, 95), rss)


def soak(url: str, clients: int, seconds: float, max_tokens: int = 64, api_key: str | None = None,
         sample_rss: Callable[[], int] | None = None, interval: float = 10.0, prompt: str = PROMPT) -> SoakResult:
    """``clients`` streaming chat clients back to back for ``seconds``, each on its own kept-alive
    connection; ``sample_rss`` (the server's RSS in KiB, e.g. read over SSH) every ``interval`` s.

    Keep-alive drops are counted in ``keepalive_drops``, every other error in ``failures``.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    return asyncio.run(_soak(url, model, clients, seconds, max_tokens, headers, prompt, sample_rss, interval))


def bench(url: str, levels: list[int], per_client: int, max_tokens: int, api_key: str | None = None,
          model: str | None = None, prompt: str = PROMPT) -> Report:
    """Warm up, then run each concurrency level in turn.

    ``prompt`` is formatted with ``n`` (client x 1000 + request) so that prompts differ
    in their tail, as real requests do, while sharing a prefix a server may cache.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if model is None:
        model = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    report = Report(url=url, model=model, max_tokens=max_tokens, prompt=prompt)
    # warm-up: one short request so model pages and caches are hot for every server alike
    asyncio.run(run_level(url, model, 1, 1, 8, headers, prompt))
    for clients in levels:
        report.levels.append(asyncio.run(run_level(url, model, clients, per_client, max_tokens, headers, prompt)))
    return report


def format_report(report: Report) -> str:
    head = f"{report.url}  model={report.model}  max_tokens={report.max_tokens}"
    if report.read_bandwidth:
        head += f"  read bandwidth {report.read_bandwidth / 1e9:.1f} GB/s  roofline(1 client) {report.roofline_1_client:.2f}"
    lines = [head,
             f"{'clients':>7} {'reqs':>5} {'ok':>4} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9}  errors"]
    for lv in report.levels:
        f = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9}"  # noqa: E731
        errs = ", ".join(f"{k}: {v}" for k, v in lv.errors.items()) or "0"
        lines.append(f"{lv.clients:>7} {lv.requests:>5} {lv.ok:>4} {lv.tok_per_s:>8.1f} {f(lv.ttft_p50)} {f(lv.ttft_p95)}  {errs}")
    return "\n".join(lines)


#: Single-threaded read-bandwidth probe run on the host (only python3 needed):
#: ``bytes.find`` of an absent byte scans the whole (really written, 512 MiB) buffer with
#: memchr, so bytes/s ≈ single-core read bandwidth.
BANDWIDTH_PROBE = (
    "python3 -c \"import time;b=b'\\x02'*(1<<29);b.find(1);t=time.perf_counter();n=8\n"
    "for _ in range(n): b.find(1)\n"
    "print(int(n*len(b)/(time.perf_counter()-t)))\""
)


def roofline_ratio(tok_per_s: float, model_bytes: int, read_bytes_per_s: float) -> float:
    """Share of the memory-bandwidth bound reached at decode: each token reads all weights once."""
    return tok_per_s * model_bytes / read_bytes_per_s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llamadeploy bench", description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", action="append", help="base URL; repeat for several hosts")
    target.add_argument("--inventory", help="pyinfra inventory file: bench every deployed host of it")
    p.add_argument("--clients", default="1,4,8", help="comma-separated concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default=PROMPT,
                   help="user message; {n} becomes the request number (default: a ~60-word ops question)")
    p.add_argument("--api-key-file", help="file holding the bearer key")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = p.parse_args(argv)
    key = open(a.api_key_file).read().strip() if a.api_key_file else None
    levels = [int(x) for x in a.clients.split(",")]
    if a.inventory:
        from llamadeploy.status import inventory_targets

        reports = []
        for t in inventory_targets(a.inventory, BANDWIDTH_PROBE):
            r = bench(t.url, levels, a.requests_per_client, a.max_tokens, t.api_key, prompt=a.prompt)
            r.host, r.read_bandwidth = t.host, t.read_bandwidth
            if t.read_bandwidth and r.levels and r.levels[0].clients == 1:
                r.roofline_1_client = round(roofline_ratio(r.levels[0].tok_per_s, t.model_bytes, t.read_bandwidth), 3)
            reports.append(r)
    else:
        reports = [bench(u.rstrip("/"), levels, a.requests_per_client, a.max_tokens, key, prompt=a.prompt)
                   for u in a.url]
    if a.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0 if all(lv.ok for r in reports for lv in r.levels) else 1


if __name__ == "__main__":
    sys.exit(main())

