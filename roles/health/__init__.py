"""Health gate: after a (re)start, /health must answer 200 and a chat completion must come back."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

from pyinfra.api.operation import OperationMeta
from pyinfra.operations.util import any_changed

from llamadeploy.config import HostConfig
from llamadeploy.manifest import Manifest, ServedModel
from llamadeploy.roledeploy import role
from llamadeploy.roles import docker
from llamadeploy.roles.health.operations import (
    chat_answers,
    container_alive,
    embeddings_answer,
    rerank_answers,
    unit_alive,
    unloaded,
    wait_healthy,
)

#: what the gate asks a model of each kind, and where (router mode)
ASKED: dict[str, tuple[Callable[..., OperationMeta], str, str]] = {
    "chat": (chat_answers, "/v1/chat/completions", "One chat completion answered by"),
    "embedding": (embeddings_answer, "/v1/embeddings", "Embeddings that make sense from"),
    "rerank": (rerank_answers, "/v1/rerank", "The relevant document ranked first by"),
}


def health_url(host: str, port: int, path: str = "/health") -> str:
    """A URL the host itself can reach for a server bound to ``host:port``
    (loopback when bound to all addresses)."""
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def server_probes(cfg: HostConfig) -> tuple[str, str]:
    """Shell that tells whether the server runs (its restart count) and shell for its last log
    lines: the systemd unit (native) or the compose service's container (docker) (pure)."""
    if cfg.mode == "docker":
        project, compose = cfg.docker.project_dir, docker.compose_command(cfg)
        return (container_alive(project, compose, docker.COMPOSE_SERVICE),
                f"( cd {shlex.quote(project)} && {compose} logs --no-color --tail 40 {docker.COMPOSE_SERVICE} )")
    unit = f"{cfg.service.name}.service"
    return unit_alive(unit), f"journalctl -u {shlex.quote(unit)} -n 40 --no-pager"


@role("Health gate")
def health_gate(cfg: HostConfig, alias: str, after: list[OperationMeta], release: Manifest | None = None,
                ignore_errors: bool = False, models: Sequence[ServedModel] = ()) -> Callable[[], bool]:
    """After a (re)start (one of ``after`` changed): /health 200, then one real chat completion.

    ``release``: a reinstated release's manifest (a rollback): its address, port and key file are
    asked, not the inventory's (a release may have run with a key the inventory no longer has).
    ``ignore_errors``: a failed gate does not stop the host, so that the deploy can reinstate the
    release that served before (``roles/release`` :func:`fell_back`). Returns "the gate failed",
    to be called when the run executes.

    ``models`` (router mode; a reinstated release's own when ``release`` is given): each model is
    asked what its kind serves (a chat completion, embeddings that tell similar from unrelated,
    a ranking), which loads an on-demand one; those are unloaded again after their check.
    """
    # a (re)start that failed with its error ignored (roles/service: systemd refused the start job)
    # is judged here too, as a server that exited: the gate fails whatever it then sees (systemd's
    # Restart= may have brought the server up meanwhile; the release still did not start when asked)
    started = any_changed(*after)

    def errored() -> bool:
        return any(op.did_error() for op in after)

    def changed() -> bool:
        return started() or errored()

    addr, port = (release.host, release.port) if release else (cfg.server.host, cfg.server.port)
    if release is not None:
        key_file = release.api_key_file
    else:
        key_file = cfg.host_key_file if cfg.server.api_key is not None else None
    alive, logs = server_probes(cfg)
    health = wait_healthy(
        name=f"Wait for {health_url(addr, port)} (200 within {cfg.health.timeout}s)",
        url=health_url(addr, port),
        timeout=cfg.health.timeout,
        unit=cfg.service.name,
        alive=alive,
        logs=logs,
        _if=changed,
        _ignore_errors=ignore_errors,
    )
    served = list(release.models) if release is not None else list(models)
    if not served:
        chat = chat_answers(
            name="One chat completion answered",
            url=health_url(addr, port, "/v1/chat/completions"),
            alias=alias,
            timeout=cfg.health.timeout,
            unit=cfg.service.name,
            key_file=key_file,
            _if=[changed, lambda: health.did_succeed()],
            _ignore_errors=ignore_errors,
        )
        return lambda: errored() or health.did_error() or chat.did_error()
    asked = []
    # on-demand models first: asking one loads it, and at models_max the router unloads the model
    # used least recently, a startup one too; asked last, the startup models are the ones loaded
    # when the gate ends (an on-demand model is unloaded again right after it answered)
    for m in sorted(served, key=lambda m: not m.on_demand):
        op, path, what = ASKED[m.kind]
        dims = {"dimensions": m.dimensions} if m.kind == "embedding" else {}
        asked.append(op(name=f"{what} {m.alias}", url=health_url(addr, port, path), alias=m.alias,
                        timeout=cfg.health.timeout, unit=cfg.service.name, key_file=key_file, **dims,
                        _if=[changed, lambda: health.did_succeed()], _ignore_errors=ignore_errors))
        if m.on_demand:
            unloaded(name=f"{m.alias} unloaded again (it loads on demand)", url=health_url(addr, port, "/models/unload"),
                     alias=m.alias, key_file=key_file, _if=[changed, lambda: health.did_succeed()],
                     _ignore_errors=ignore_errors)
    return lambda: errored() or health.did_error() or any(op.did_error() for op in asked)
