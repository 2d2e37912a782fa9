"""Docker role: engine, image (pulled or pushed as a tarball), compose file, ``up -d`` on change.

Shares the config model, model files, tuning, manifest and health gate with
native mode; only how the server process runs differs. Its template is
``templates/docker/docker-compose.yml.j2``; its operations and facts sit next to
this file.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from collections.abc import Callable
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyinfra import host
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.server import LinuxDistribution
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import atomic, packages
from llamadeploy.artifacts import file_sha256
from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology
from llamadeploy.manifest import build_manifest, manifest_path, release_id
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles import gpu as gpu_role
from llamadeploy.roles import model as model_role
from llamadeploy.roles.docker.operations import (
    check_image_flags,
    compose_down,
    compose_running,
    image_loaded,
    image_pulled,
)
from llamadeploy.roles.gpu import GpuHost
from llamadeploy.roles.model.source import ModelArtifact, ModelFile
from llamadeploy.tuning import MemoryPlan, compose_resources, server_args

if TYPE_CHECKING:
    from llamadeploy.roles.router import Router

TEMPLATE = "docker/docker-compose.yml.j2"
#: where llama-server listens inside the container (published on llama_server.host:port)
CONTAINER_PORT = 8080
#: the compose service, hence the container's ``com.docker.compose.service`` label
COMPOSE_SERVICE = "llama-server"
#: where compose mounts the key file (a compose secret)
KEY_IN_CONTAINER = "/run/secrets/api_key"
#: where compose mounts the host's model directory, read-only
MODELS_IN_CONTAINER = "/models"
#: the compose file's name in the project directory (and in a release record)
COMPOSE_FILE = "docker-compose.yml"


def compose_command(cfg: HostConfig) -> str:
    return "docker-compose" if cfg.docker.engine == "distro" else "docker compose"


def image_ref(cfg: HostConfig) -> str:
    d = cfg.docker
    return f"{cfg.docker_image}@{d.image_digest}" if d.image_digest and not d.image_tarball else cfg.docker_image


def moved_marker(cfg: HostConfig, ref: str) -> str:
    """The file a rollback leaves when it re-tags ``ref`` (the next deploy loads or pulls it again)."""
    return f"{cfg.service.cache_dir}/images/moved-{hashlib.sha256(ref.encode()).hexdigest()[:16]}"


def compose_path(project_dir: str) -> str:
    return f"{project_dir}/{COMPOSE_FILE}"


def release_version(ref: str) -> str:
    """The version part of a docker release's id: the image's tag, in file-name characters (pure).

    ``ghcr.io/ggml-org/llama.cpp:server-b4000@sha256:…`` -> ``server-b4000``; a digest without a
    tag -> ``digest``; no tag -> ``latest`` (what docker pulls then).
    """
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "digest" if "@" in ref else "latest"
    return re.sub(r"[^A-Za-z0-9._-]", "-", tag) or "image"


def image_pin(cfg: HostConfig) -> str:
    """What says which image a tag meant when it was deployed: the pushed tarball's sha256, or the
    pinned digest ("" for a bare tag, which a later pull may move)."""
    d = cfg.docker
    if d.image_tarball:
        return file_sha256(d.image_tarball)  # cached on the controller (path, size, mtime, inode)
    return d.image_digest or ""


#: Docker's apt key and source (``engine = docker-ce``); recorded as the deploy's where the host
#: had neither (roles/ownership), so that uninstall removes them
APT_KEY = "/etc/apt/keyrings/docker.asc"
APT_SOURCE_NAME = "docker"
APT_SOURCE = f"/etc/apt/sources.list.d/{APT_SOURCE_NAME}.list"


@role("Docker engine")
def engine(cfg: HostConfig) -> None:
    """Docker Engine and Compose from the distribution, or from Docker's apt repository."""
    if cfg.docker.engine == "distro":
        distro: Any = host.get_fact(LinuxDistribution)
        pkgs = distro_engine_packages(distro.get("major") or 12)
        packages.installed(cfg, "docker", name=f"Docker engine from distro packages ({', '.join(pkgs)})",
                           packages=[*pkgs, "curl"], update=True, cache_time=24 * 3600, no_recommends=True)
    else:
        packages.installed(cfg, "docker", name="Prerequisites for Docker's apt repository",
                           packages=["ca-certificates", "curl"], update=True, cache_time=24 * 3600)
        files.download(name="Docker's apt key", src="https://download.docker.com/linux/debian/gpg",
                       dest=APT_KEY, mode="644")
        apt.repo(name="Docker's apt repository",
                 src=f"deb [signed-by={APT_KEY}] https://download.docker.com/linux/debian {_codename()} stable",
                 filename=APT_SOURCE_NAME)
        packages.installed(cfg, "docker", name="Docker engine from Docker's repository (docker-ce, compose plugin)",
                           packages=["docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin"],
                           update=True)
    systemd.service(name="Docker engine enabled and running", service="docker.service", running=True, enabled=True)


def distro_engine_packages(debian_major: int) -> list[str]:
    """Debian's engine and compose for a release (pure). Debian 13 moved the ``docker`` command
    out of ``docker.io`` into ``docker-cli`` (only recommended, and the deploy installs without
    recommends), and its ``docker-compose`` is compose v2, which still installs ``/usr/bin/docker-compose``;
    Debian 12's is compose v1."""
    return ["docker.io", "docker-cli", "docker-compose"] if debian_major >= 13 else ["docker.io", "docker-compose"]


def _codename() -> str:
    return host.get_fact(LinuxDistribution)["release_meta"].get("VERSION_CODENAME", "bookworm")


@role("Docker image")
def image(cfg: HostConfig) -> list[OperationMeta]:
    """Make the image present: ``docker load`` of a pushed tarball (air-gapped), or a pull."""
    d = cfg.docker
    if d.image_tarball:
        sha = file_sha256(d.image_tarball)
        dest = f"{cfg.service.cache_dir}/images/{Path(d.image_tarball).name}"
        files.directory(name="Image cache", path=f"{cfg.service.cache_dir}/images", mode="700")
        pushed = atomic.verified_file(name=f"Image tarball {Path(d.image_tarball).name}", src=d.image_tarball,
                               dest=dest, sha256=sha, mode="0600")
        loaded = image_loaded(name=f"docker load {cfg.docker_image}", ref=cfg.docker_image, tarball=dest, sha256=sha,
                              moved=moved_marker(cfg, cfg.docker_image))
        return [pushed, loaded]
    return [image_pulled(name=f"docker pull {image_ref(cfg)}", ref=image_ref(cfg),
                         moved=moved_marker(cfg, image_ref(cfg)))]


@role("Stop native service")
def stop_native(cfg: HostConfig) -> None:
    """Switching to docker: the systemd unit must not hold the port."""
    systemd.service(name="Native llama-server stopped and disabled", service=f"{cfg.service.name}.service",
                    running=False, enabled=False)


@role("Stop docker service")
def stop_compose(cfg: HostConfig) -> None:
    """Switching to native: the compose project must not hold the port."""
    compose_down(name="Compose project down", project_dir=cfg.docker.project_dir, compose=compose_command(cfg))


def compose_file(cfg: HostConfig, art: ModelArtifact, image: str, args: list[str], key_file: str | None,
                 preset_mount: tuple[str, str] | None = None) -> str:
    """The rendered compose file (pure: config, model, image and argument vector in, text out).
    ``preset_mount``: router mode's (host directory, container directory) of the preset."""
    d = cfg.docker
    return render(
        TEMPLATE,
        service=COMPOSE_SERVICE, image=image, args=args, bind_host=cfg.server.host, port=cfg.server.port, container_port=CONTAINER_PORT,
        model_dir=cfg.model_dir, models_in_container=MODELS_IN_CONTAINER, api_key_file=key_file,
        resources=compose_resources(cfg), log_max_size=d.log_max_size, log_max_files=d.log_max_files,
        model_file=art.first.name, model_sha256=art.first.sha256, preset_mount=preset_mount,
    )


@role("llama-server in Docker")
def compose_service(cfg: HostConfig, plan: MemoryPlan, art: ModelArtifact, restart_on: list[OperationMeta],
                    gpus: GpuHost | None = None, staged: tuple[ModelFile, ...] = (), router: Router | None = None,
                    reload_on: list[OperationMeta] | None = None,
                    ) -> tuple[OperationMeta, OperationMeta, str, list[OperationMeta]]:
    """Render the compose file; ``up -d --force-recreate`` when file, image, key or model changed.

    Returns the operations that start and recreate the container, for the health gate, the
    release id: image, model and compose file as one release, recorded like a native one
    (``roles/release``) so that a rollback can reinstate it, and router mode's reload.
    ``staged``: model files staged by content (roles/model), linked into place after the
    manifest, right before the recreate.

    ``router`` (``llama_models``): the container runs the router, with the preset from a host
    directory it mounts read-only; a changed preset or model file (``reload_on``) is a reload
    (``GET /models?reload=1``), as in native mode, not a recreate.
    """
    svc, d = cfg.service, cfg.docker
    files.directory(name="Config directory", path=svc.config_dir, user="root", group="root", mode="755")
    key_file = cfg.host_key_file
    if router is not None:
        args = router.args
    else:
        args = server_args(cfg, host.get_fact(CpuTopology), plan, f"{MODELS_IN_CONTAINER}/{art.first.name}", art.alias,
                           bind=("0.0.0.0", CONTAINER_PORT), key_path=KEY_IN_CONTAINER)
    ref = image_ref(cfg)
    check_image_flags(name="Flags known to llama-server in the image", image=ref,
                      args=router.check_args if router is not None else args)
    # the key changes only after the check: a refused image must not leave a new key unread
    if cfg.server.api_key is not None:
        key = atomic.put(name="API key file for the container (0600, the container's uid)",
                         src=StringIO(cfg.server.api_key.get_secret_value() + "\n"), dest=key_file,
                         user="nobody", group="nogroup", mode="600", secret=True)
    else:
        key = files.file(name="No API key file", path=key_file, present=False)

    routed: dict[str, Any] = {}
    mount = None
    if router is not None:
        from llamadeploy.roles.router import PRESET_DIR_IN_CONTAINER, preset_dir, preset_path

        routed = {"models": router.served(), "model_files": router.model_files(), "preset_file": preset_path(cfg),
                  "preset_sha256": router.preset_sha256}
        mount = (preset_dir(cfg), PRESET_DIR_IN_CONTAINER)
    info = build_manifest(cfg, plan, args, art, compose_project=d.project_dir, compose_service=COMPOSE_SERVICE, image=ref,
                          api_key_file=key_file if cfg.server.api_key else None,
                          **gpu_role.manifest_fields(cfg, gpus, None), **routed)
    compose_text = compose_file(cfg, art, ref, args, key_file if cfg.server.api_key else None, mount)
    # the same tag from another tarball or digest is another release
    rid = release_id(release_version(ref), info.render(), compose_text + "\0" + image_pin(cfg))
    info = info.model_copy(update={"release_id": rid})
    atomic.put(name="Deploy manifest", src=StringIO(info.render()), dest=manifest_path(svc.config_dir), mode="644")
    placed = model_role.switched(cfg, staged, stop=stopped_command(cfg))
    presets = []
    if router is not None and mount is not None:
        # the model set, read by the router at its start and at a reload (paths and options, no secret)
        files.directory(name="Router presets directory", path=mount[0], user="root", group="root", mode="755")
        presets = [atomic.put(name="Router presets (models.ini)", src=StringIO(router.preset),
                              dest=routed["preset_file"], mode="644")]
    files.directory(name="Compose project directory", path=d.project_dir, mode="755")
    compose = atomic.put(name="Compose file", src=StringIO(compose_text), dest=compose_path(d.project_dir), mode="644")
    # new content under a file name a model already uses is a recreate in both modes (a loaded
    # child keeps the file it opened); router mode's new files and presets are a reload (below)
    up = recreated(cfg, d.project_dir, _if=any_changed(compose, key, *placed, *restart_on))
    running = compose_running(name="Container running", project_dir=d.project_dir, compose=compose_command(cfg))
    reloaded = []
    if router is not None:
        from llamadeploy.roles.router import reloaded as router_reloaded  # (the router role imports this one)

        # a container started just now read the preset
        reloaded.append(router_reloaded(cfg, router, key_file, [*presets, *(reload_on or [])], running, up))
    return up, running, rid, reloaded


def stopped_command(cfg: HostConfig) -> str:
    """Shell: stop the compose project's container (before a same-name model switches under it)."""
    return f"cd {shlex.quote(cfg.docker.project_dir)} && {compose_command(cfg)} stop"


def recreated(cfg: HostConfig, project_dir: str, _if: Callable[[], bool], ignore_errors: bool = False) -> OperationMeta:
    """``up -d --force-recreate`` of the compose project in ``project_dir``, when ``_if`` says so
    (``ignore_errors``: a failure is left to the gate that follows, as a fallback's is)."""
    return server.shell(
        name="docker compose up -d (changed file, image, key or model)",
        commands=[f"cd {shlex.quote(project_dir)} && {compose_command(cfg)} up -d --force-recreate --remove-orphans"],
        _if=_if,
        _ignore_errors=ignore_errors,
    )
