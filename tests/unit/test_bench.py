"""Bench arithmetic (the load itself is exercised against a real server in tests/e2e)."""

import pytest

from llamadeploy.bench import LevelResult, Report, format_report, percentile, roofline_ratio


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 50) == 10.0
    assert percentile(values, 95) == 19.0
    assert percentile(values, 100) == 20.0


def test_roofline():
    # 65 tok/s x 253 MB per token / 20 GB/s = 0.82
    assert round(roofline_ratio(65, 253_113_024, 20e9), 2) == 0.82


def test_format_report_shows_errors():
    r = Report("http://h:8080", "m", 128, [LevelResult(8, 24, 21, {"RemoteProtocolError": 3}, 10.0, 2688, 268.8, 0.2, 0.4)])
    text = format_report(r)
    assert "RemoteProtocolError: 3" in text and "268.8" in text


def test_soak_rss_growth_from_the_first_warm_sample():
    from llamadeploy.bench import SoakResult

    r = SoakResult("u", 8, 100.0, 10, 9, 1, {}, 90, 1.0, 0.1, 0.2,
                   rss_kib=[(0.0, 100), (5.0, 400), (10.0, 1000), (50.0, 1020), (95.0, 1050)])
    assert abs(r.rss_growth - 0.05) < 1e-9  # 1050 / 1000 - 1: the cold samples before 10 s do not count
    assert SoakResult("u", 8, 100.0, 0, 0, 0, {}, 0, 0.0, None, None).rss_growth is None


def test_a_stream_is_a_success_only_with_done_and_finish_reason():
    from llamadeploy.bench import NO_DONE, NO_FINISH_REASON, stream_error

    assert stream_error(done=True, finished=True) is None
    assert stream_error(done=False, finished=True) == NO_DONE
    assert stream_error(done=True, finished=False) == NO_FINISH_REASON


def _chunk(data: str) -> bytes:
    body = data.encode()
    return f"{len(body):x}\r\n".encode() + body + b"\r\n"


def _event(content: str | None = None, finish: str | None = None) -> str:
    import json

    delta = {"content": content} if content else {}
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"


#: what a server sends, per case: a whole stream, one without [DONE], one without a
#: finish_reason, one that breaks off inside the stream, and a connection closed unanswered
STREAMS = {
    "complete": [_event("Hi"), _event(" there"), _event(finish="length"), "data: [DONE]\n\n"],
    "no_done": [_event("Hi"), _event(finish="length")],
    "no_finish": [_event("Hi"), "data: [DONE]\n\n"],
}


def _serve(case: str):
    """A real HTTP/1.1 server on a loopback port (asyncio streams) that answers as ``case`` says."""
    import asyncio

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        if case != "unanswered":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            if case == "aborted":
                writer.write(_chunk(_event("Hi")) + b"40\r\npartial")  # a chunk cut short, then closed
            else:
                writer.write(b"".join(_chunk(e) for e in STREAMS[case]) + b"0\r\n\r\n")
            await writer.drain()
        writer.close()

    return asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize(("case", "expected"), [
    ("complete", None), ("no_done", "stream ended without [DONE]"),
    ("no_finish", "stream ended without finish_reason"), ("aborted", "mid-stream abort"),
    ("unanswered", "keep-alive drop (no response)"), ("refused", "connect failure"),
])
def test_each_request_is_counted_by_what_the_user_saw(case, expected):
    """One streamed request against a real local HTTP server per case."""
    import asyncio
    import socket

    import httpx

    from llamadeploy.bench import _one

    async def go():
        # "refused": a port bound but not listening, held through the request (no other process
        # can take it meanwhile, as one could a port closed before the request)
        held = socket.socket()
        server = None
        try:
            if case == "refused":
                held.bind(("127.0.0.1", 0))
                port = held.getsockname()[1]
            else:
                server = await _serve(case)
                port = server.sockets[0].getsockname()[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                return await _one(client, "m", 1, 8, "{n}")
        finally:
            held.close()
            if server is not None:
                server.close()

    sample = asyncio.run(go())
    assert sample.error == expected, sample
    if expected is None:
        assert sample.tokens == 2 and sample.ttft is not None
