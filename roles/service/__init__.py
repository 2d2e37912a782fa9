"""Service role: unprivileged user, API key file, systemd unit, (re)start on change."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, server, systemd

from llamadeploy import atomic
from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology
from llamadeploy.operations import check_flags
from llamadeploy.models import ModelArtifact
from llamadeploy.tuning import MemoryPlan, server_args, systemd_quote, unit_limits

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def manifest(cfg: HostConfig, plan: MemoryPlan, args: list[str], art: ModelArtifact, model_path: str) -> dict:
    """What was deployed, readable by the shipped testinfra suite and fleet tools.

    Holds no secret: only the path of the key file, never the key.
    """
    return {
        "unit": cfg.service.name,
        "mode": cfg.mode,
        "port": cfg.server.port,
        "host": cfg.server.host,
        "alias": art.alias,
        "model_path": model_path,
        "model_files": {f.name: f.sha256 for f in art.files},
        "model_repo": art.repo_id,
        "model_commit": art.commit,
        "release": cfg.build.release_key(),
        "binary": f"{cfg.current_link}/bin/llama-server",
        "api_key_file": cfg.api_key_path if cfg.server.api_key else None,
        "args": args,
        "memory_plan": {"limit": plan.limit, "model_bytes": plan.model_bytes,
                        "kv_bytes_per_token": plan.kv_bytes_per_token, "ctx_size": plan.ctx_size,
                        "parallel": plan.parallel, "swa_full": plan.swa_full,
                        "load_mode": plan.load_mode},
    }


@deploy("llama-server service")
def service(
    cfg: HostConfig, plan: MemoryPlan, art: ModelArtifact, model_path: str, restart_on: list[OperationMeta]
) -> tuple[OperationMeta, OperationMeta]:
    """Render the unit and keep the service running; restart it when an input changed.

    ``restart_on`` are operations (binary link, model) whose change means the
    running process is stale. Returns the operation that (re)started the
    service, for the health gate.
    """
    svc = cfg.service
    server.group(name="Service group", group=svc.user, system=True)
    server.user(
        name="Service user",
        user=svc.user,
        group=svc.user,
        system=True,
        home=svc.data_dir,
        create_home=False,
        shell="/usr/sbin/nologin",
    )
    files.directory(name="Config directory", path=svc.config_dir, user="root", group=svc.user, mode="750")

    if cfg.server.api_key is not None:
        key = atomic.put(
            name="API key file (0600)",
            src=StringIO(cfg.server.api_key.get_secret_value() + "\n"),
            dest=cfg.api_key_path,
            user=svc.user,
            group=svc.user,
            mode="600",
        )
    else:
        key = files.file(name="No API key file", path=cfg.api_key_path, present=False)

    cpu = host.get_fact(CpuTopology)
    args = server_args(cfg, cpu, plan, model_path, art.alias)
    binary = f"{cfg.current_link}/bin/llama-server"
    check_flags(name="Flags known to the installed llama-server", binary=binary, args=args)

    atomic.put(
        name="Deploy manifest",
        src=StringIO(json.dumps(manifest(cfg, plan, args, art, model_path), indent=2) + "\n"),
        dest=f"{svc.config_dir}/deploy.json",
        mode="644",
    )
    unit = atomic.template(
        name="systemd unit",
        src=str(TEMPLATES / "llama-server.service.j2"),
        dest=f"/etc/systemd/system/{svc.name}.service",
        mode="644",
        unit_name=svc.name,
        service_user=svc.user,
        data_dir=svc.data_dir,
        alias=art.alias,
        release_key=cfg.build.release_key(),
        model_file=art.first.name,
        model_sha256=art.first.sha256,
        exec_start=" ".join(systemd_quote(a) for a in [binary, *args]),
        limits=unit_limits(cfg),
        gpu=cfg.server.gpu_layers > 0,
        port=cfg.server.port,
        read_only_paths=[svc.prefix, svc.data_dir, svc.config_dir],
    )
    systemd.daemon_reload(name="Reload systemd", _if=unit.did_change)
    started = systemd.service(
        name="Service enabled and running", service=f"{svc.name}.service", running=True, enabled=True
    )
    inputs = [unit, key, *restart_on]
    restarted = systemd.service(
        name="Restart for changed binary, model, key or unit",
        service=f"{svc.name}.service",
        restarted=True,
        _if=lambda: any(op.did_change() for op in inputs) and not started.did_change(),
    )
    return started, restarted
