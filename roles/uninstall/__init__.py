"""Uninstall role: remove what the deploy put on a host, in both modes, optionally keeping models.

What goes: the service (unit stopped, disabled, removed) or the compose project and its
image, the releases, config, cache and data directories (models kept with
``keep_models``), the service user and group, the system packages the deploy
recorded as installed by it (``llamadeploy.packages``), with their unused dependencies, what
their purge leaves (roles/uninstall/plan.py: files the deploy added beside theirs, state, the
accounts their postinsts created) and the apt sources and keys the deploy wrote.
What stays: anything that was on the host before the first deploy, and mount points.

    pyinfra INVENTORY llamadeploy.deploy.llama_server_removed [keep_models=true]
"""

from __future__ import annotations

import posixpath
import shlex

from pyinfra import host
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Command, Users
from pyinfra.operations import files, server, systemd
from pyinfra.operations.util import any_changed

from llamadeploy import packages
from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles import front, monitor, node_exporter, ownership
from llamadeploy.roles.docker import compose_command
from llamadeploy.roles.docker.facts import DockerImageId
from llamadeploy.roles.docker.operations import compose_down
from llamadeploy.roles.firewall import keepers_removed, port_unfenced, table_name
from llamadeploy.roles.firewall.operations import table_removed
from llamadeploy.roles.ownership.facts import OwnershipRecords
from llamadeploy.roles.preflight import is_ours
from llamadeploy.roles.release import current_release, records_dir
from llamadeploy.roles.release.facts import Entries, ReleaseRecords
from llamadeploy.roles.release.operations import untagged_image_removed
from llamadeploy.roles.release.plan import foreign_model_entries, image_refs
from llamadeploy.roles.rpc import worker_removed
from llamadeploy.roles.service import DEVICES_UNIT
from llamadeploy.roles.uninstall.operations import (
    engine_state_removed,
    package_leftovers_removed,
    packages_purged,
    tree_removed,
)
from llamadeploy.roles.uninstall.plan import ENGINE_LISTING, ENGINE_PACKAGES, foreign_engine_objects
from llamadeploy.units import UnitFiles, left_alone


@role("Remove llama-server")
def removed(cfg: HostConfig, keep_models: bool = False) -> None:
    """Everything the deploy installed goes, in the reverse order of the deploy."""
    svc, d = cfg.service, cfg.docker
    records = host.get_fact(OwnershipRecords, path=ownership.RECORD_DIR)
    unit = f"/etc/systemd/system/{svc.name}.service"
    # units of that name that someone else made (``llama_service.name: sshd`` is an alias of
    # sshd's unit) are neither stopped nor removed
    foreign = ownership.unit_problem(svc.name, host.get_fact(UnitFiles, names=ownership.service_units(svc.name)),
                                     frozenset().union(*records.values()))
    removed_units = []
    if foreign:
        host.noop(f"units named after {svc.name} are not the deploy's, left alone: {foreign}")
    else:
        if host.get_fact(File, path=unit):
            server.shell(name="Native service stopped and disabled",
                         commands=[f"systemctl disable --now {svc.name}.service"])
        removed_units.append(files.file(name="systemd unit removed", path=unit, present=False))
    devices = f"/etc/systemd/system/{DEVICES_UNIT}"  # a CUDA host's (roles/service)
    if not left_alone(DEVICES_UNIT):
        if host.get_fact(File, path=devices):
            server.shell(name="NVIDIA device nodes unit disabled", commands=[f"systemctl disable {DEVICES_UNIT}"])
        removed_units.append(files.file(name="NVIDIA device nodes unit removed", path=devices, present=False))
    systemd.daemon_reload(name="Reload systemd", _if=any_changed(*removed_units))
    if not foreign:
        keepers_removed(svc.name, table_name(cfg))
    table_removed(name="nftables table removed", table=table_name(cfg))
    worker_removed(name="RPC worker")  # an RPC worker's (roles/rpc)
    # a front's and a monitor's fences (roles/front, roles/monitor): no-ops on any other host
    port_unfenced("haproxy", front.EXPORTER_TABLE, front.EXPORTER_RULES)
    port_unfenced("prometheus", monitor.TABLE, monitor.FENCE_RULES)
    port_unfenced(node_exporter.UNIT, node_exporter.TABLE, node_exporter.FENCE_RULES)  # roles/node_exporter
    node_exporter.gpu_metrics_removed()  # a CUDA host's (roles/node_exporter)

    # exactly what this service's ownership record names and no other service's record does; a
    # host an earlier deploy served before records existed, or a front or monitor deployed before
    # they kept one: the directories it evidently made (roles/ownership); a host never deployed:
    # none of them
    name = posixpath.basename(ownership.record_path(cfg))
    mine = records.get(name)
    others: frozenset[str] = frozenset().union(*(v for k, v in records.items() if k != name))
    legacy = mine is None and ownership.read(cfg)[2]
    legacy_dirs = ownership.adopted(cfg) if mine is None else frozenset()

    def ours(line: str) -> bool:
        if mine is None:
            return (line[len("dir "):] in legacy_dirs if line.startswith("dir ") else legacy) and line not in others
        return line in mine and line not in others

    # a front's marks of the servers a rollout drained (roles/front): its record names them (a
    # front deployed before records: their name is the deploy's alone)
    if mine is None or ours(f"dir {front.MARKS_DIR}"):
        tree_removed(name="Rollout drain marks removed", path=front.MARKS_DIR)
    has_docker = bool(host.get_fact(Command, command="command -v docker || true"))
    if has_docker:
        compose_down(name="Compose project down", project_dir=d.project_dir, compose=compose_command(cfg))
        if host.get_fact(DockerImageId, ref=cfg.docker_image):
            if ours(f"image {cfg.docker_image}"):
                ref = shlex.quote(cfg.docker_image)
                # unless a container still uses it (another service's, started from the image this
                # one brought): docker would refuse, and that service would lose its image
                server.shell(name=f"Image {cfg.docker_image} removed (unless a container uses it)",
                             commands=[f'if [ -z "$(docker ps -aq --filter ancestor={ref})" ]; then '
                                       f"docker image rm {ref}; else echo 'the image stays: a container uses it'; fi"])
            else:  # the host had it before the deploy (or another service brought it): not ours
                host.noop(f"image {cfg.docker_image} stays: no deploy of this service brought it")
        # images earlier releases ran, kept for rollbacks (roles/release); untagged ones go
        recorded = image_refs(host.get_fact(ReleaseRecords, path=records_dir(cfg)))
        # (only tags a deploy of this service brought: an image the host had keeps its tag, and so stays)
        left = [(i, tuple(sorted(r for r in refs if ours(f"image {r}")))) for i, refs in sorted(recorded.items())
                if host.get_fact(DockerImageId, ref=i)]
        if left:
            server.shell(name="Images of recorded releases removed",
                         commands=[untagged_image_removed(i, refs) for i, refs in left])
    if ours(f"dir {d.project_dir}"):
        tree_removed(name="Compose project directory removed", path=d.project_dir)
    if ours(f"dir {svc.prefix}"):
        tree_removed(name="Releases removed", path=svc.prefix)
    if ours(f"dir {svc.config_dir}"):
        tree_removed(name="Config directory removed", path=svc.config_dir)
    if ours(f"dir {svc.data_dir}"):
        if keep_models:
            tree_removed(name="Data directory removed, models kept", path=svc.data_dir, keep=cfg.model_dir)
        else:
            _data_removed(cfg, ownership.files_in(mine, cfg.model_dir))

    account = host.get_fact(Users).get(svc.user)
    # never an account the deploy did not make
    if account is not None and (is_ours(cfg, account) and svc.data_dir in legacy_dirs if mine is None
                                else ours(f"account {svc.user}")):
        server.user(name="Service user removed", user=svc.user, present=False)
        server.group(name="Service group removed", group=svc.user, present=False)
    # the records of what to purge live in the cache directory: purge first, then remove it. A
    # Docker engine the deploy installed goes with its state, unless it holds someone else's
    # containers, images or volumes: then it stays, with its packages
    engine = ENGINE_PACKAGES & set(packages.recorded(host.get_fact(FileContents, path=packages.record_path(cfg, "docker"))))
    theirs: list[str] = []
    if engine and has_docker:
        listing = (host.get_fact(Command, command=ENGINE_LISTING) or "").splitlines()
        our_images = {cfg.docker_image} if ours(f"image {cfg.docker_image}") else set()
        our_images |= {r for refs in recorded.values() for r in refs if ours(f"image {r}")}
        theirs = foreign_engine_objects(listing, d.project_dir, our_images)
    if theirs:
        host.noop(f"the Docker engine the deploy installed stays, with its packages: it holds what this service "
                  f"did not make ({', '.join(theirs)})")
    # (a kept engine keeps what it runs on: its NVIDIA runtime and driver, its apt source and key)
    kept = ("docker", "gpu") if theirs else ()
    purged = packages_purged(name="Packages the deploy installed purged", cache_dir=svc.cache_dir, kept_roles=kept)
    if engine and not theirs:
        engine_state_removed(name="State of the Docker engine the deploy installed removed", _if=purged.did_change)
    # after the purge: a purge that fails leaves a front or a monitor with every file its service reads
    package_leftovers_removed(name="What the purged packages left removed (files, state, the accounts they created)",
                              cache_dir=svc.cache_dir, kept_roles=kept, _if=purged.did_change)
    # the apt sources and keys the deploy wrote (Docker's, NVIDIA's), now that what came from them is purged
    for path in ownership.apt_files_in(mine, kept_engine=bool(theirs)):
        if ours(f"file {path}"):
            files.file(name=f"{path} removed", path=path, present=False)
    if ours(f"dir {svc.cache_dir}"):
        tree_removed(name="Cache directory removed", path=svc.cache_dir)
    record = files.file(name="Ownership record removed", path=ownership.record_path(cfg), present=False)
    parents = [p for p in ownership.parents_in(mine) if f"parent {p}" not in others]
    if parents:  # the parents the deploy created for its directories, where nothing else is in them now
        server.shell(name="Parent directories the deploy created removed (where empty)",
                     commands=[f"rmdir {shlex.quote(p)} 2>/dev/null || true" for p in parents], _if=record.did_change)
    server.shell(name="Ownership records directory removed (no other service's record in it)",
                 commands=[f"rmdir {shlex.quote(ownership.RECORD_DIR)} 2>/dev/null || true"],
                 _if=[record.did_change, lambda: not others])


def _data_removed(cfg: HostConfig, placed: set[str]) -> None:
    """The data directory goes; files in the model directory that no deploy brought stay, with it.

    What deploys brought: every recorded release's model files, the current manifest's and what
    the ownership record names (``placed``: a deploy whose release failed its gate is in no
    release record). An operator's file beside them is theirs, as dpkg leaves a directory it
    finds other files in.
    """
    svc = cfg.service
    current = current_release(cfg)
    brought = {n for r in host.get_fact(ReleaseRecords, path=records_dir(cfg)) for n in r.manifest.model_files}
    brought |= (set(current.model_files) if current else set()) | placed
    entries = host.get_fact(Entries, path=cfg.model_dir)
    foreign = foreign_model_entries(entries, brought)
    if not foreign:
        tree_removed(name="Data directory removed", path=svc.data_dir)
        return
    mine = [posixpath.join(cfg.model_dir, e) for e in entries if e not in foreign]
    if mine:
        server.shell(name="Model files our releases brought removed",
                     commands=[f"rm -rf --one-file-system -- {' '.join(shlex.quote(p) for p in mine)}"])
    tree_removed(name=f"Data directory removed; {cfg.model_dir} stays, with files no release brought: "
                      f"{', '.join(foreign)}", path=svc.data_dir, keep=cfg.model_dir)
