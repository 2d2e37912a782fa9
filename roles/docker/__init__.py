"""Docker mode: engine, image (pulled or pushed as a tarball), compose file, ``up -d`` on change.

Shares the config model, model files, tuning and health gate with native mode;
only how the server process is run differs.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

from pyinfra import host
from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt, files, server, systemd

from llamadeploy import atomic
from llamadeploy.artifacts import file_sha256
from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology
from llamadeploy.models import ModelArtifact
from llamadeploy.operations import check_flags, compose_down, compose_running, image_loaded, image_pulled
from llamadeploy.tuning import MemoryPlan, compose_resources, server_args
from roles.service import manifest

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
KEY_IN_CONTAINER = "/run/secrets/api_key"


def compose_command(cfg: HostConfig) -> str:
    return "docker-compose" if cfg.docker.engine == "distro" else "docker compose"


def image_ref(cfg: HostConfig) -> str:
    d = cfg.docker
    return f"{cfg.docker_image}@{d.image_digest}" if d.image_digest and not d.image_tarball else cfg.docker_image


@deploy("Docker engine")
def engine(cfg: HostConfig) -> None:
    """Docker Engine and Compose from the distribution, or from Docker's apt repository."""
    if cfg.docker.engine == "distro":
        apt.packages(name="Docker engine from distro packages (docker.io, docker-compose v1)",
                     packages=["docker.io", "docker-compose", "curl"], update=True, cache_time=24 * 3600,
                     no_recommends=True)
    else:
        apt.packages(name="Prerequisites for Docker's apt repository", packages=["ca-certificates", "curl"],
                     update=True, cache_time=24 * 3600)
        files.download(name="Docker's apt key", src="https://download.docker.com/linux/debian/gpg",
                       dest="/etc/apt/keyrings/docker.asc", mode="644")
        apt.repo(name="Docker's apt repository",
                 src="deb [signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian "
                     f"{_codename()} stable",
                 filename="docker")
        apt.packages(name="Docker engine from Docker's repository (docker-ce, compose plugin)",
                     packages=["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"], update=True)
    systemd.service(name="Docker engine enabled and running", service="docker.service", running=True, enabled=True)


def _codename() -> str:
    return host.get_fact(LinuxDistribution)["release_meta"].get("VERSION_CODENAME", "bookworm")


@deploy("Docker image")
def image(cfg: HostConfig) -> list[OperationMeta]:
    """Make the image present: ``docker load`` of a pushed tarball (air-gapped), or a pull."""
    d = cfg.docker
    if d.image_tarball:
        sha = file_sha256(d.image_tarball)
        dest = f"{cfg.service.cache_dir}/images/{Path(d.image_tarball).name}"
        files.directory(name="Image cache", path=f"{cfg.service.cache_dir}/images", mode="700")
        from llamadeploy.operations import verified_file

        pushed = verified_file(name=f"Image tarball {Path(d.image_tarball).name}", src=d.image_tarball,
                               dest=dest, sha256=sha, mode="0600")
        loaded = image_loaded(name=f"docker load {cfg.docker_image}", ref=cfg.docker_image, tarball=dest, sha256=sha)
        return [pushed, loaded]
    return [image_pulled(name=f"docker pull {image_ref(cfg)}", ref=image_ref(cfg))]


@deploy("Stop native service")
def stop_native(cfg: HostConfig) -> None:
    """Switching to docker: the systemd unit must not hold the port."""
    systemd.service(name="Native llama-server stopped and disabled", service=f"{cfg.service.name}.service",
                    running=False, enabled=False)


@deploy("Stop docker service")
def stop_compose(cfg: HostConfig) -> None:
    """Switching to native: the compose project must not hold the port."""
    compose_down(name="Compose project down", project_dir=cfg.docker.project_dir, compose=compose_command(cfg))


@deploy("llama-server in Docker")
def compose_service(cfg: HostConfig, plan: MemoryPlan, art: ModelArtifact,
                    restart_on: list[OperationMeta]) -> tuple[OperationMeta, OperationMeta]:
    """Render the compose file; ``up -d --force-recreate`` when file, image, key or model changed."""
    svc, d = cfg.service, cfg.docker
    files.directory(name="Config directory", path=svc.config_dir, user="root", group="root", mode="755")
    key_file = f"{svc.config_dir}/docker-api-key"
    if cfg.server.api_key is not None:
        key = atomic.put(name="API key file for the container (0400, container uid)",
                        src=StringIO(cfg.server.api_key.get_secret_value() + "\n"), dest=key_file,
                        user="nobody", group="nogroup", mode="400")
    else:
        key = files.file(name="No API key file", path=key_file, present=False)

    args = server_args(cfg, host.get_fact(CpuTopology), plan, f"/models/{art.first.name}", art.alias,
                       bind=("0.0.0.0", 8080), key_path=KEY_IN_CONTAINER)
    ref = image_ref(cfg)
    check_flags(name="Flags known to llama-server in the image", binary="", args=args, image=ref)
    # the same manifest as native mode, with what differs in docker mode
    info = manifest(cfg, plan, args, art, f"{cfg.model_dir}/{art.first.name}")
    for native_only in ("release", "binary"):
        info.pop(native_only)
    info.update(unit=None, compose_project=d.project_dir, image=ref,
                api_key_file=key_file if cfg.server.api_key else None)
    atomic.put(
        name="Deploy manifest",
        src=StringIO(json.dumps(info, indent=2) + "\n"),
        dest=f"{svc.config_dir}/deploy.json", mode="644",
    )
    files.directory(name="Compose project directory", path=d.project_dir, mode="755")
    compose_file = atomic.template(
        name="Compose file",
        src=str(TEMPLATES / "docker-compose.yml.j2"),
        dest=f"{d.project_dir}/docker-compose.yml",
        mode="644",
        image=ref, args=args, bind_host=cfg.server.host, port=cfg.server.port, model_dir=cfg.model_dir,
        api_key_file=key_file if cfg.server.api_key else None, resources=compose_resources(cfg),
        gpu=cfg.server.gpu_layers > 0, log_max_size=d.log_max_size, log_max_files=d.log_max_files,
        model_file=art.first.name, model_sha256=art.first.sha256,
    )
    inputs = [compose_file, key, *restart_on]
    up = server.shell(
        name="docker compose up -d (changed file, image, key or model)",
        commands=[f"cd {d.project_dir} && {compose_command(cfg)} up -d --force-recreate --remove-orphans"],
        _if=lambda: any(op.did_change() for op in inputs),
    )
    running = compose_running(name="Container running", project_dir=d.project_dir, compose=compose_command(cfg))
    return up, running
