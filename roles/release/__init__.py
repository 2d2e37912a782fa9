"""Release role: every release that passed its gate is recorded; old ones are pruned; any kept one
can be reinstated with no transfer and no compile.

A release is what serves: the llama.cpp build (``<prefix>/releases/<key>``; in docker mode the
image), the model files (``<data_dir>/models``) and the rendered unit or compose file with its
manifest. The record, ``<config_dir>/releases/<id>/``, holds the unit or compose file and the
manifest as deployed (docker: and the image's ID); build, image and model files stay where they
are, shared by the releases that use them. Switching is the ``current`` link (one rename) plus
the unit (one rename) and a restart; in docker mode the compose file (one rename, the tag put
back on the release's image if a later deploy moved it) and a recreate.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Callable, Sequence

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.facts.files import File, FileContents
from pyinfra.operations import server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import atomic, lock
from llamadeploy.atomic import VerifiedSha256
from llamadeploy.config import HostConfig
from llamadeploy.manifest import Manifest, manifest_path
from llamadeploy.roledeploy import role
from llamadeploy.roles import docker, ownership
from llamadeploy.roles.docker.facts import DockerImageId
from llamadeploy.roles.docker.operations import check_image_flags, compose_down, image_tagged
from llamadeploy.roles.firewall import guard_paths, keepers_removed, kept, refuse_foreign_fence, rules_path, table_name
from llamadeploy.roles.firewall.operations import table_removed
from llamadeploy.roles.health import health_gate
from llamadeploy.roles.model import kept_dir
from llamadeploy.roles.model.operations import kept_path, restored
from llamadeploy.roles.release.facts import ReleaseRecord, ReleaseRecords, records_dir
from llamadeploy.roles.release.operations import (
    copied,
    gate_failed,
    refused,
    release_recorded,
    releases_pruned,
    secret_copied,
)
from llamadeploy.roles.router import preset_path
from llamadeploy.roles.service.operations import check_flags

UNIT_FILE = "unit.service"
#: conditions an operation runs under, all evaluated as the run executes (pyinfra's ``_if``)
Conditions = Sequence[Callable[[], bool]]
MANIFEST_FILE = "deploy.json"
KEY_FILE = "api-key"
RULES_FILE = "firewall.nft"
#: router mode: the model set (roles/router)
PRESET_FILE = "models.ini"


def unit_path(cfg: HostConfig) -> str:
    return f"/etc/systemd/system/{cfg.service.name}.service"


@role("Release record")
def recorded(cfg: HostConfig, current_id: str) -> None:
    """After the gate: record the release that serves, then prune beyond ``keep_releases``."""
    served = {UNIT_FILE: unit_path(cfg)} if cfg.mode == "native" else \
        {docker.COMPOSE_FILE: docker.compose_path(cfg.docker.project_dir)}
    # what else the release ran with, reinstated by a rollback: its key (0600, as deployed, and
    # its record directory root's and the service's only) and its firewall rules
    if cfg.server.api_key is not None:
        served[KEY_FILE] = cfg.host_key_file
    if cfg.mode == "native" and cfg.server.allow_from is not None:
        served[RULES_FILE] = rules_path(cfg)
    if cfg.router_mode:
        served[PRESET_FILE] = preset_path(cfg)
    release_recorded(name=f"Release {current_id} recorded", records_dir=records_dir(cfg), release_id=current_id,
                     sources={**served, MANIFEST_FILE: manifest_path(cfg.service.config_dir)},
                     image=docker.image_ref(cfg) if cfg.mode == "docker" else None)
    _record_refreshed(cfg, current_id, served)
    releases_pruned(name=f"Releases beyond {cfg.service.keep_releases} previous pruned", records_dir=records_dir(cfg),
                    builds_dir=f"{cfg.service.prefix}/releases", current_link=cfg.current_link,
                    model_dir=cfg.model_dir, current_id=current_id, keep=cfg.service.keep_releases,
                    placed=sorted(ownership.owned_files(cfg, cfg.model_dir)), record=ownership.record_path(cfg),
                    images=_sorted_or_none(ownership.owned_images(cfg)))


def _record_refreshed(cfg: HostConfig, current_id: str, served: dict[str, str]) -> None:
    """A release recorded before keeps the key file and fence rules it serves with now.

    Both can change under the same release id (the unit names the key file and the rules file,
    not what they hold): a rotated key, other ``allow_from`` networks. A rollback or a deploy's
    fallback reinstates what the record holds, so a record left as first written would bring a
    key rotated away from (one that leaked) or a fence's old networks back. Compared on the host
    (``cmp``: no hash of the key), replaced by rename; nothing runs when they are equal. A new
    record copies them whole (``release_recorded``)."""
    if not any(r.id == current_id for r in host.get_fact(ReleaseRecords, path=records_dir(cfg))):
        return
    entry = posixpath.join(records_dir(cfg), current_id)
    if KEY_FILE in served:
        owner, group = _key_owner(cfg, cfg.mode)
        secret_copied(name=f"Record of {current_id}: the key it serves with now", src=served[KEY_FILE],
                      dest=f"{entry}/{KEY_FILE}", user=owner, group=group)
    if RULES_FILE in served:
        copied(name=f"Record of {current_id}: the fence rules it serves with now", src=served[RULES_FILE],
               dest=f"{entry}/{RULES_FILE}", mode="600")


def _key_owner(cfg: HostConfig, mode: str) -> tuple[str, str]:
    """Owner and group of the host's key file in ``mode``: the service's account (roles/service),
    or the container's ``nobody:nogroup`` (roles/docker); a record's copy keeps them (``cp -p``)."""
    return (cfg.service.user, cfg.service.user) if mode == "native" else ("nobody", "nogroup")


def _sorted_or_none(values: set[str] | None) -> list[str] | None:
    return None if values is None else sorted(values)


def build_dir(cfg: HostConfig, m: Manifest) -> str:
    """Where the build a native release ran is kept on the host."""
    return f"{cfg.service.prefix}/releases/{m.release}"


def current_release(cfg: HostConfig) -> Manifest | None:
    lines = host.get_fact(FileContents, path=manifest_path(cfg.service.config_dir))
    try:
        return Manifest.parse("\n".join(lines)) if lines else None
    except ValueError:
        return None


def choose(records: list[ReleaseRecord], current_id: str | None, to: str | None) -> ReleaseRecord:
    """The release to reinstate: ``to``, or the most recently activated one that is not current (pure)."""
    known = ", ".join(r.id for r in reversed(records)) or "none"
    if to is not None:
        for r in records:
            if r.id == to:
                return r
        raise DeployError(f"host {host.name}: no release {to!r} recorded (recorded: {known})")
    for r in reversed(records):
        if r.id != current_id:
            return r
    raise DeployError(f"host {host.name}: no earlier release recorded to roll back to (recorded: {known})")


def refusal(cfg: HostConfig, to: str | None, mode: str | None = None) -> tuple[ReleaseRecord | None, str | None]:
    """The release to reinstate on this host, or why there is none to reinstate (read at prepare).

    ``mode``: the mode the host runs when the reinstating starts (default: the manifest's).
    """
    current = current_release(cfg)
    try:
        target = choose(host.get_fact(ReleaseRecords, path=records_dir(cfg)),
                        current.release_id if current else None, to)
    except DeployError as exc:
        return None, str(exc)
    m = target.manifest
    now = mode or (current.mode if current else cfg.mode)
    if m.mode != now:
        return None, (f"host {host.name}: release {target.id} ran in {m.mode} mode and the host runs {now} mode "
                      f"now: deploy with llama_mode {m.mode!r} instead (a rollback does not switch modes)")
    if m.mode == "docker":
        if not _image_of(target):
            return None, (f"host {host.name}: release {target.id} ran image {m.image} "
                          f"({target.image_id or 'ID not recorded'}), which is gone from the host")
    else:
        build = build_dir(cfg, m)
        if not host.get_fact(File, path=f"{build}/bin/llama-server"):
            return None, f"host {host.name}: release {target.id} needs build {m.release}, which is gone from {build}"
    if m.gpu_pin_file and not host.get_fact(File, path=m.gpu_pin_file):
        # its unit reads the file optionally: without it the server would silently run its own fit
        return None, (f"host {host.name}: release {target.id} runs the GPU offload pinned in {m.gpu_pin_file}, "
                      "which is gone: deploy instead (it fits again)")
    for name, sha in m.model_files.items():
        if _model_source(cfg, name, sha) is None:
            return None, (f"host {host.name}: release {target.id} needs model file {name} (sha256 {sha[:12]}…), "
                          f"which is neither in {cfg.model_dir} nor kept in {kept_dir(cfg)}")
    return target, None


def _model_source(cfg: HostConfig, name: str, sha: str) -> str | None:
    """Where a release's model file is intact: in place ("in place"), kept aside ("kept"), or None."""
    state = host.get_fact(VerifiedSha256, path=f"{cfg.model_dir}/{name}")
    if state is not None and state.sha256 == sha:
        return "in place"
    kept = host.get_fact(VerifiedSha256, path=kept_path(kept_dir(cfg), sha, name))
    return "kept" if kept is not None and kept.sha256 == sha else None


def models_restored(cfg: HostConfig, target: ReleaseRecord, when: Conditions = (),
                    replaced: bool = False) -> list[OperationMeta]:
    """The release's model files back in place from ``.kept`` where a newer model replaced them.

    ``replaced``: also files in place now, which this run replaces before the reinstating runs
    (a deploy's own fallback); the operation reads the file again when it executes.
    """
    wanted = ("kept", "in place") if replaced else ("kept",)
    # the server that runs now stops before its file name gets other content (see ``restored``)
    stop = (docker.stopped_command(cfg) if cfg.mode == "docker"
            else f"systemctl stop {shlex.quote(cfg.service.name + '.service')}")
    return [restored(name=f"Model {name} of the release back in place (a link, no transfer; the server stopped first)",
                     dest=f"{cfg.model_dir}/{name}", sha256=sha, kept_dir=kept_dir(cfg), stop=stop, _if=list(when))
            for name, sha in target.manifest.model_files.items() if _model_source(cfg, name, sha) in wanted]


def _image_of(target: ReleaseRecord) -> str | None:
    """The local image a docker release runs: its recorded ID if still on the host (else None);
    a record without an ID (written by an older version) trusts the tag when it is there."""
    if target.image_id:
        return target.image_id if host.get_fact(DockerImageId, ref=target.image_id) else None
    return target.manifest.image if target.manifest.image and host.get_fact(DockerImageId, ref=target.manifest.image) \
        else None


@role("Rollback")
def rolled_back(cfg: HostConfig, to: str | None = None) -> None:
    """Reinstate a recorded release: link, unit and manifest from the host itself, restart, gate
    (docker mode: the image's tag, compose file and manifest, recreate, gate).

    A host that cannot (no earlier release, its build, image or model gone) fails on its own, at
    execution, with the reason; the other hosts of the run roll back.
    """
    target, why = refusal(cfg, to)
    if target is None:
        refused(name="A release to reinstate", reason=str(why))
        return
    m = target.manifest
    if m.mode == "docker":
        check_image_flags(name="Reinstated image's llama-server knows every flag", image=_image_of(target) or str(m.image),
                          args=list(m.args))
    else:
        check_flags(name="Reinstated release starts and knows every flag", binary=f"{build_dir(cfg, m)}/bin/llama-server",
                    args=list(m.args))
    _reinstated(cfg, target, models_restored(cfg, target))


def _reinstated(cfg: HostConfig, target: ReleaseRecord, models: list[OperationMeta], when: Conditions = (),
                ignore_errors: bool = False, restart: bool = False) -> Callable[[], bool]:
    """The switch back to ``target`` shared by a rollback and a deploy's fallback: manifest, model
    files, link and unit or compose file, restart, gate, marked the latest. Every operation runs only
    when all of ``when`` hold (evaluated as the run executes). ``restart``: restart the server even
    when none of its files changed (a fallback: the failed release's server is down or not well,
    whatever the two releases share). Returns "its gate failed"."""
    m = target.manifest
    entry = posixpath.join(records_dir(cfg), target.id)
    # the manifest first: whatever fails later, it never claims the old release while current moved
    # (or while the model file already holds the old release's content)
    copied(name="Deploy manifest of the release", src=f"{entry}/{MANIFEST_FILE}",
           dest=manifest_path(cfg.service.config_dir), _if=list(when))
    models = [*models, *_files_reinstated(cfg, target, entry, list(when))]
    switch = _docker_switched if m.mode == "docker" else _native_switched
    restarted = switch(cfg, target, entry, models, list(when), restart, ignore_errors)
    if m.mode == "native" and not host.get_fact(File, path=f"{entry}/{RULES_FILE}"):
        # a release that ran without allow_from: once its unit (not bound to a guard) runs, the
        # fence a later release added goes, guard and drop-in first (else the port stays fenced)
        keepers_removed(cfg.service.name, table_name(cfg), when=list(when))
        table_removed(name="No nftables table for the port (the release ran without one)", table=table_name(cfg),
                      _if=list(when))
    # the gate asks the address the reinstated release listens on, with its key: not the inventory's
    failed = health_gate(cfg, m.alias, after=[restarted], release=m, ignore_errors=ignore_errors)
    release_recorded(name=f"Release {target.id} marked the latest", records_dir=records_dir(cfg),
                     release_id=target.id, sources={}, _if=[*when, lambda: not failed()])
    return failed


def _files_reinstated(cfg: HostConfig, target: ReleaseRecord, entry: str,
                      when: list[Callable[[], bool]]) -> list[OperationMeta]:
    """The release's key file and firewall rules as recorded when it last deployed (a later
    deploy may have removed or replaced them); a change restarts the server like a model's."""
    m = target.manifest
    ops = []
    if m.api_key_file and host.get_fact(File, path=f"{entry}/{KEY_FILE}"):
        owner, group = _key_owner(cfg, m.mode)
        ops.append(secret_copied(name="API key of the release", src=f"{entry}/{KEY_FILE}", dest=m.api_key_file,
                                 user=owner, group=group, _if=when))
    if m.preset_file and host.get_fact(File, path=f"{entry}/{PRESET_FILE}"):
        ops.append(copied(name="Router presets of the release (its model set)", src=f"{entry}/{PRESET_FILE}",
                          dest=m.preset_file, mode="644", _if=when))
    if m.mode == "native" and host.get_fact(File, path=f"{entry}/{RULES_FILE}"):
        # its unit loads the rules (ExecStartPre), which replace a table of the fence's name whole:
        # an operator's table or drop-in made since a later release dropped the fence stays theirs
        # (a deploy's fallback is prepared in every deploy, whether its gate will fail or not)
        what = "this deploy's fallback" if when else "the rollback"
        refuse_foreign_fence(table_name(cfg), f"{what} to release {target.id}, which ran with llama_server.allow_from",
                             [guard_paths(cfg.service.name, table_name(cfg))[1]])
        ops.append(copied(name="Firewall rules of the release", src=f"{entry}/{RULES_FILE}", dest=rules_path(cfg),
                          mode="600", _if=when))
        # its unit is bound to the fence's guard (BindsTo=): a later deploy without allow_from removed it
        ops.extend(kept(cfg.service.name, table_name(cfg), rules_path(cfg), when=when))
    return ops


def _native_switched(cfg: HostConfig, target: ReleaseRecord, entry: str, models: list[OperationMeta],
                     when: list[Callable[[], bool]], restart: bool = False,
                     ignore_errors: bool = False) -> OperationMeta:
    """Native mode's switch: ``current`` to the release's build, its unit, restart (a restart
    systemd refuses, with ``ignore_errors``, is judged by the gate: the run names what failed)."""
    m = target.manifest
    switched = atomic.link(name=f"Point current at {m.release}", path=cfg.current_link, target=build_dir(cfg, m),
                           _if=when)
    unit = copied(name="systemd unit of the release", src=f"{entry}/{UNIT_FILE}", dest=unit_path(cfg), _if=when)
    systemd.daemon_reload(name="Reload systemd", _if=[*when, unit.did_change])
    return systemd.service(name="Restart on the reinstated release", service=f"{cfg.service.name}.service",
                           running=True, restarted=True, enabled=True, _ignore_errors=ignore_errors,
                           _if=[*when, lambda: restart or any_changed(unit, switched, *models)()])


def _docker_switched(cfg: HostConfig, target: ReleaseRecord, entry: str, models: list[OperationMeta],
                     when: list[Callable[[], bool]], restart: bool = False,
                     ignore_errors: bool = False) -> OperationMeta:
    """Docker mode's switch: the recorded image under the release's tag, its compose file, recreate."""
    m = target.manifest
    project = m.compose_project or cfg.docker.project_dir
    # a tag can be moved back; a digest reference names one image and cannot
    tagged = [image_tagged(name=f"{m.image} is the release's image", ref=str(m.image), image_id=target.image_id,
                           moved=docker.moved_marker(cfg, str(m.image)), _if=when)] \
        if target.image_id and m.image and "@" not in m.image else []
    compose = copied(name="Compose file of the release", src=f"{entry}/{docker.COMPOSE_FILE}",
                     dest=docker.compose_path(project), _if=when)
    changed = any_changed(compose, *tagged, *models)
    return docker.recreated(cfg, project, _if=lambda: all(c() for c in when) and (restart or changed()),
                            ignore_errors=ignore_errors)


def fell_back_reason(host_name: str, new_id: str, serving_id: str) -> str:
    """The line a run fails with after its deploy rolled a host back (pure); ``llamadeploy rollout``
    reads it (:data:`llamadeploy.rollout.FELL_BACK`). The same id twice: the release that served
    already failed its gate after this run restarted it (a rotated key, changed workers), and its
    files as recorded when it last deployed were reinstated."""
    recorded = (" as recorded when it last deployed (its recorded key file and fence rules replace this run's)"
                if new_id == serving_id else "")
    return (f"host {host_name}: release {new_id} failed its gate; rolled back to {serving_id}{recorded}, which "
            "serves now (the gate's log lines are above)")


@role("Fallback")
def fell_back(cfg: HostConfig, new_id: str, failed: Callable[[], bool]) -> None:
    """When this run's release failed its gate (``failed``, evaluated at execution): reinstate the
    release that served before, through a rollback's own steps, then fail the host naming the
    release that serves now. With nothing to reinstate, stop and disable the server (no crash
    loop), then fail. Nothing here runs when the gate passed.

    "Before" is the host's latest recorded release (recorded only after it passed a gate), not
    the manifest, which this run or an interrupted earlier one may have switched already. When
    that is this run's release itself (this run restarted it for a new key, changed workers),
    it is reinstated as it was recorded when it last deployed: its recorded key file and fence
    rules replace this run's, so a rotated key the server refuses leaves the old key serving,
    where stopping and disabling it would have taken down a release that served.
    """
    lock.tried(host, new_id)  # the audit line names it, whether it passes or not
    records = host.get_fact(ReleaseRecords, path=records_dir(cfg))
    head = f"host {host.name}: release {new_id} failed its gate"
    target: ReleaseRecord | None = None
    why: str | None = "no earlier release is recorded"
    if records:
        target, why = refusal(cfg, records[-1].id, mode=cfg.mode)
    if target is None:
        if cfg.mode == "docker":
            compose_down(name="Failed release's container stopped", project_dir=cfg.docker.project_dir,
                         compose=docker.compose_command(cfg), _if=failed)
        else:
            # by systemctl itself: pyinfra's running=False sees a unit between crash and restart
            # ("activating") as stopped already, and would leave it to restart
            server.shell(name="Failed release's server stopped and disabled",
                         commands=[f"systemctl disable --now {shlex.quote(cfg.service.name + '.service')}"], _if=failed)
        gate_failed(name="Run fails: the new release did not pass its gate",
                    reason=f"{head}; not rolled back: {why}. Its server is stopped and disabled (no crash loop; "
                           "the gate's log lines are above).",
                    _if=failed)
        return
    models = models_restored(cfg, target, when=[failed], replaced=True)
    again = _reinstated(cfg, target, models, when=[failed], ignore_errors=True, restart=True)
    gate_failed(name="Run fails: the new release did not pass its gate",
                reason=fell_back_reason(host.name, new_id, target.id), _if=[failed, lambda: not again()])
    gate_failed(name="Run fails: the new release did not pass its gate, nor the one before it",
                reason=f"{head}; rolled back to {target.id}, which failed its gate too (see above)", _if=again)
