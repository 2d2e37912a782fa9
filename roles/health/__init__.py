"""Health gate: after a (re)start, /health must answer 200 and a chat completion must come back."""

from __future__ import annotations

from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed

from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles.health.operations import chat_answers, wait_healthy


def health_url(host: str, port: int, path: str = "/health") -> str:
    """A URL the host itself can reach for a server bound to ``host:port``
    (loopback when bound to all addresses)."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


@role("Health gate")
def health_gate(cfg: HostConfig, alias: str, after: list[OperationMeta], bind: tuple[str, int] | None = None) -> None:
    """After a (re)start (one of ``after`` changed): /health 200, then one real chat completion.

    ``bind``: where the server listens when that is not the inventory's host and port (a rollback).
    """
    changed = any_changed(*after)
    addr, port = bind or (cfg.server.host, cfg.server.port)
    wait_healthy(
        name=f"Wait for {health_url(addr, port)} (200 within {cfg.health.timeout}s)",
        url=health_url(addr, port),
        timeout=cfg.health.timeout,
        unit=cfg.service.name,
        _if=changed,
    )
    chat_answers(
        name="One chat completion answered",
        url=health_url(addr, port, "/v1/chat/completions"),
        alias=alias,
        timeout=cfg.health.timeout,
        unit=cfg.service.name,
        key_file=cfg.host_key_file if cfg.server.api_key is not None else None,
        _if=changed,
    )
