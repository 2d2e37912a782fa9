"""Health gate: after a (re)start, /health must answer 200 within the timeout."""

from __future__ import annotations

from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed

from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles.health.operations import wait_healthy


def health_url(host: str, port: int) -> str:
    """The /health URL the host itself can reach for a server bound to ``host:port``
    (loopback when bound to all addresses)."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


@role("Health gate")
def health_gate(cfg: HostConfig, after: list[OperationMeta]) -> None:
    """Wait for /health only when one of ``after`` (start/restart) changed something."""
    wait_healthy(
        name=f"Wait for {health_url(cfg.server.host, cfg.server.port)} (200 within {cfg.health.timeout}s)",
        url=health_url(cfg.server.host, cfg.server.port),
        timeout=cfg.health.timeout,
        unit=cfg.service.name,
        _if=any_changed(*after),
    )
