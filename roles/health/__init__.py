"""Health gate: after a (re)start, /health must answer 200 within the timeout."""

from __future__ import annotations

from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed

from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles.health.operations import wait_healthy


def health_url(cfg: HostConfig) -> str:
    """The URL the host itself can reach: loopback when bound to all addresses."""
    addr = cfg.server.host
    if addr in ("0.0.0.0", "::"):
        addr = "127.0.0.1"
    elif ":" in addr:
        addr = f"[{addr}]"
    return f"http://{addr}:{cfg.server.port}/health"


@role("Health gate")
def health_gate(cfg: HostConfig, after: list[OperationMeta]) -> None:
    """Wait for /health only when one of ``after`` (start/restart) changed something."""
    wait_healthy(
        name=f"Wait for {health_url(cfg)} (200 within {cfg.health.timeout}s)",
        url=health_url(cfg),
        timeout=cfg.health.timeout,
        unit=cfg.service.name,
        _if=any_changed(*after),
    )
