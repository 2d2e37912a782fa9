"""Service role (native mode): unprivileged user, API key file, manifest, systemd unit, (re)start on change.

Its template is ``templates/service/llama-server.service.j2``; its own operation
(:func:`~llamadeploy.roles.service.operations.check_flags`) refuses flags the
installed binary does not know before the unit changes.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from io import StringIO

from pyinfra import host
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import atomic, units
from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuTopology
from llamadeploy.gpu import FIT_VAR, device_allow, device_node_commands
from llamadeploy.hardening import hardening
from llamadeploy.manifest import build_manifest, manifest_path, release_id
from llamadeploy.render import render
from llamadeploy.roledeploy import role
from llamadeploy.roles import gpu as gpu_role
from llamadeploy.roles import model as model_role
from llamadeploy.roles import router as router_role
from llamadeploy.roles.firewall import guard_unit, rules_path
from llamadeploy.roles.gpu import FitPin, GpuHost
from llamadeploy.roles.model.source import ModelArtifact, ModelFile
from llamadeploy.roles.router import Router, preset_path
from llamadeploy.roles.service.facts import StartedBefore
from llamadeploy.roles.service.operations import check_flags
from llamadeploy.roles.service.operations import restarted as restarted_op
from llamadeploy.tuning import MemoryPlan, server_args, systemd_quote, unit_limits

TEMPLATE = "service/llama-server.service.j2"
ROUTER_PRESET_NOTE = "models.ini"
DEVICES_TEMPLATE = "service/llama-nvidia-devices.service.j2"
#: the unit that makes a CUDA host's device nodes before the server starts (a fixed name)
DEVICES_UNIT = "llama-nvidia-devices.service"


def unit_file(cfg: HostConfig, art: ModelArtifact, binary: str, args: list[str],
              gpus: GpuHost | None = None, pin: FitPin | None = None, aliases: list[str] | None = None) -> str:
    """The rendered systemd unit (pure: config, model and argument vector in, text out)."""
    svc = cfg.service
    devices = device_allow(list(gpus.gpus)) if gpus else []
    return render(
        TEMPLATE,
        unit_name=svc.name,
        service_user=svc.user,
        data_dir=svc.data_dir,
        # router mode: not the aliases, which change with the model set (a reload, not a restart)
        alias=f"several models (router mode, {ROUTER_PRESET_NOTE})" if aliases else art.alias,
        release_key=cfg.build.release_key(),
        # router mode: the models are the preset's; its first one named here would make a re-pin
        # of that model a restart of every model, not a reload of that one
        model_file=None if aliases else art.first.name,
        model_sha256=None if aliases else art.first.sha256,
        # a pinned fit is appended from the environment file (its values, split at whitespace)
        exec_start=" ".join(systemd_quote(a) for a in [binary, *args]) + (f" ${FIT_VAR}" if pin else ""),
        environment_file=pin.env_path if pin else None,
        limits=unit_limits(cfg),
        device_allow=devices,
        # a CPU host's devices are private; a CUDA host's closed but for its NVIDIA nodes
        hardening=hardening(devices if cfg.cuda else None, numa="--numa" in args),
        port=cfg.server.port,
        read_only_paths=[svc.prefix, svc.data_dir, svc.config_dir],
        firewall=rules_path(cfg) if cfg.server.allow_from is not None else None,
        fence_guard=guard_unit(svc.name) if cfg.server.allow_from is not None else None,
    )


@role("llama-server service")
def service(
    cfg: HostConfig, plan: MemoryPlan, art: ModelArtifact, restart_on: list[OperationMeta],
    restart_if: Callable[[], bool] | None = None, gpus: GpuHost | None = None, staged: tuple[ModelFile, ...] = (),
    router: Router | None = None, reload_on: list[OperationMeta] | None = None,
) -> tuple[OperationMeta, OperationMeta, str, list[OperationMeta]]:
    """Render the unit and keep the service running; restart it when an input changed.

    ``restart_on`` are operations (binary link, model) whose change means the
    running process is stale; ``restart_if`` another reason, checked when the restart executes
    (an RPC head whose workers restarted). On a CUDA host (``gpus``) the unit may use exactly the
    NVIDIA devices, and llama.cpp's fit is pinned in a drop-in (roles/gpu). Returns the operations that start and restart the
    service, for the health gate, and the release id (see ``roles/release``). ``staged``: model files
    staged by content (roles/model), linked into place at the switch, after the manifest.
    ``router``: several models (roles/router): the unit runs the router, whose preset is written
    beside the unit. A changed preset, or a new model file (``reload_on``), does not restart it:
    the router re-reads the preset and reloads only the models whose section changed (the fourth
    value returned; the others keep serving, KV caches included). A changed unit, binary, key or
    same-name model content still restarts it.
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

    if router is not None:
        args = router.args
    else:
        args = server_args(cfg, host.get_fact(CpuTopology), plan, f"{cfg.model_dir}/{art.first.name}", art.alias)
    binary = f"{cfg.current_link}/bin/llama-server"
    # the new release must start and know every flag before it becomes current: a failed
    # check stops here, with current and the unit still on the release that serves now
    # (router mode: every preset key too, which the router would refuse at start)
    check_flags(name="New release starts and knows every flag", binary=f"{cfg.release_dir}/bin/llama-server",
                args=router.check_args if router is not None else args)
    # a CUDA host's offload: llama.cpp's fit with the new release, pinned before anything switches
    # (a model that cannot be fitted fails the host here, with the old release still serving)
    pin = gpu_role.fit_pin(cfg, gpus, args, model_role.load_path(cfg, art.first, staged), art.first.sha256)
    fit = gpu_role.pinned(cfg, pin, gpus)
    pins = [fit] if fit is not None else []
    # the key changes only after the check: a refused release must not leave a new key unread
    if cfg.server.api_key is not None:
        key = atomic.put(
            name="API key file (0600)",
            src=StringIO(cfg.server.api_key.get_secret_value() + "\n"),
            dest=cfg.api_key_path,
            user=svc.user,
            group=svc.user,
            mode="600",
            secret=True,
        )
    else:
        key = files.file(name="No API key file", path=cfg.api_key_path, present=False)


    unit_text = unit_file(cfg, art, binary, args, gpus, pin,
                          aliases=[m.entry.alias for m in router.models] if router else None)
    routed = {}
    if router is not None:
        routed = {"models": router.served(), "model_files": router.model_files(), "preset_file": preset_path(cfg),
                  "preset_sha256": router.preset_sha256}
    info = build_manifest(cfg, plan, args, art, unit=svc.name, release=cfg.build.release_key(), binary=binary,
                          api_key_file=cfg.api_key_path if cfg.server.api_key else None,
                          **gpu_role.manifest_fields(cfg, gpus, pin), **routed)
    rid = release_id(cfg.build.version, info.render(), unit_text)
    info = info.model_copy(update={"release_id": rid})
    atomic.put(name="Deploy manifest", src=StringIO(info.render()), dest=manifest_path(svc.config_dir), mode="644")
    # the manifest moves first: a run that fails after it is seen as switched (and rolled back by a
    # rollout), never as "still on the old release" while current already points at the new one;
    # the old release stays on disk; switching back is a link change
    # a same-name model's new content reaches its name only now (a crash before this point restarts
    # the old release on the weights it ran)
    placed = model_role.switched(cfg, staged, stop=f"systemctl stop {shlex.quote(svc.name + '.service')}")
    switched = atomic.link(name="Point current at the release", path=cfg.current_link, target=cfg.release_dir)
    unit_path = f"/etc/systemd/system/{svc.name}.service"
    unit = atomic.put(
        name="systemd unit",
        src=StringIO(unit_text),
        dest=unit_path,
        mode="644",
    )
    # router mode: the model set, read by the router when it (re)starts (no secret in it: paths and
    # options, in the 750 config directory)
    presets = [atomic.put(name="Router presets (models.ini)", src=StringIO(router.preset), dest=preset_path(cfg),
                          mode="644")] if router is not None else []
    devices = []
    if gpus:  # the NVIDIA device nodes exist before the server starts (templates/service)
        units.refuse_foreign({DEVICES_UNIT: "llama_build.backend = 'cuda'"},
                             "a host without a unit of that name, or llama_build.backend 'cpu'")
        text = render(DEVICES_TEMPLATE, unit_name=svc.name,
                      device_commands=device_node_commands(g.index for g in gpus.gpus))
        devices = [atomic.put(name="NVIDIA device nodes unit", src=StringIO(text),
                              dest=f"/etc/systemd/system/{DEVICES_UNIT}", mode="644")]
    # a drop-in an earlier version of this role wrote would override ExecStart: it goes
    legacy = f"{unit_path}.d/gpu-fit.conf"
    if host.get_fact(File, path=legacy):
        devices.append(files.file(name="Old pinned-fit drop-in removed", path=legacy, present=False))
    systemd.daemon_reload(name="Reload systemd", _if=any_changed(unit, *devices))
    if gpus:
        nodes = systemd.service(name="NVIDIA device nodes", service=DEVICES_UNIT, running=True,
                                enabled=True)
        systemd.service(name="NVIDIA device nodes for changed GPUs", service=DEVICES_UNIT,
                        restarted=True, _if=[any_changed(*devices), lambda: not nodes.did_change()])
    # a start that systemd itself refuses (its start job fails: an ExecStartPre, a sandbox it
    # cannot set up, a server that exits before systemd saw it run) is what the gate sees when a
    # server exits after it started: the run goes on to the gate, which fails at once, and the
    # release that served before is reinstated (roles/release fell_back), which timing alone
    # would otherwise decide. That holds for a restart of the release that served already (its
    # key, its workers changed) too: it is reinstated as recorded when it last deployed
    started = systemd.service(
        name="Service enabled and running", service=f"{svc.name}.service", running=True, enabled=True,
        _ignore_errors=True,
    )
    # a server older than its files (a deploy that failed between writing and restarting)
    # (router mode: model files and the preset change under a running router by design, see above)
    stale = host.get_fact(StartedBefore, unit=f"{svc.name}.service", paths=[
        unit_path, *(f"{cfg.model_dir}/{name}" for name in info.model_files if router is None), binary,
        *([pin.env_path] if pin else []), *([cfg.api_key_path] if cfg.server.api_key is not None else [])])
    restarted = restarted_op(
        name="Restart for changed binary, model, key or unit",
        unit=f"{svc.name}.service",
        _ignore_errors=True,
        _if=[lambda: stale or any_changed(unit, key, switched, *pins, *placed, *restart_on)() or bool(restart_if and restart_if()),
             lambda: not started.did_change(), lambda: not started.did_error()],
    )
    reloaded = []
    if router is not None:
        reloaded.append(router_role.reloaded(cfg, router, cfg.api_key_path, [*presets, *(reload_on or [])], started,
                                             restarted))
    return started, restarted, rid, reloaded
