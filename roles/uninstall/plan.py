"""Pure rules of the uninstall: what on a Docker engine the deploy installed is not its own, and
what the purge of a package the deploy installed leaves behind."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from llamadeploy.roles import front, monitor

#: the engine packages whose runtime state (images, containers, keys) the uninstall removes with
#: them, where the deploy installed them
ENGINE_PACKAGES = frozenset({"docker.io", "docker-ce"})
#: one line per object on the engine: ``container NAME WORKING_DIR``, ``image REPO:TAG``,
#: ``volume NAME`` (nothing when there is no ``docker`` command)
ENGINE_LISTING = (
    "if command -v docker >/dev/null 2>&1; then "
    "docker ps -a --format 'container {{.Names}} {{.Label \"com.docker.compose.project.working_dir\"}}' && "
    "docker image ls --format 'image {{.Repository}}:{{.Tag}}' && "
    "docker volume ls -q | sed 's/^/volume /'; fi"
)


def foreign_engine_objects(listing: Iterable[str], project_dir: str, our_images: Iterable[str]) -> list[str]:
    """What the engine holds that this service did not make (pure): any container outside its
    compose project, any named image whose reference no deploy of it brought, any volume (its
    compose file mounts host directories only). An untagged image has no name anyone asked for:
    it is left out, as ``docker image prune`` would remove it.

    Why: purging an engine the deploy installed takes every container and image on it with it;
    one the operator started on that engine since must keep it."""
    ours = set(our_images)
    foreign = []
    for line in listing:
        kind, _, rest = line.strip().partition(" ")
        if kind == "container":
            name, _, working_dir = rest.partition(" ")
            if working_dir.rstrip("/") != project_dir.rstrip("/"):
                foreign.append(f"container {name}")
        elif kind == "image":
            if rest != "<none>:<none>" and rest not in ours:
                foreign.append(f"image {rest}")
        elif kind == "volume" and rest:
            foreign.append(f"volume {rest}")
    return foreign


@dataclass(frozen=True)
class Leftovers:
    """What a package's purge keeps on Debian although only that package, or the deploy for it, made it."""

    #: files the deploy adds beside the package's own (no package ships them, so the purge keeps
    #: them, and their directory with them)
    files: tuple[str, ...] = ()
    #: the package's configuration directory, which its purge could not remove while those were in it
    dirs_if_empty: tuple[str, ...] = ()
    #: directories that hold only what its service made (removed whole)
    paths: tuple[str, ...] = ()
    #: the system account (user, and its group) its postinst created: Debian never removes one
    accounts: tuple[str, ...] = ()


#: seen on the front's and the monitor's hosts (test_front's snapshot after uninstall): the
#: front's PEM and the monitor's targets, rules and keys; HAProxy's chroot keeps ``dev/log``, the
#: mount point its unit's ``BindReadOnlyPaths`` made; the ``prometheus`` account of Prometheus,
#: Alertmanager and the node exporter stays
PACKAGE_LEFTOVERS: dict[str, Leftovers] = {
    "haproxy": Leftovers(files=(front.PEM,), dirs_if_empty=(front.ETC,), paths=("/var/lib/haproxy",)),
    "prometheus": Leftovers(files=monitor.PROMETHEUS_FILES, dirs_if_empty=(monitor.ETC,), accounts=("prometheus",)),
    "prometheus-alertmanager": Leftovers(files=monitor.ALERTMANAGER_FILES, dirs_if_empty=(monitor.ETC,),
                                         accounts=("prometheus",)),
    "prometheus-node-exporter": Leftovers(accounts=("prometheus",)),
}


def leftovers(purged: Iterable[str], accounts_before: Iterable[str] | None) -> Leftovers:
    """What to remove after purging ``purged`` (pure), in the order it goes: files, then the
    directories they kept, then state, then accounts.

    ``accounts_before``: the lines of the record of the accounts the host had before the first
    deploy (``user NAME``, ``group NAME``); an account named there was the host's and stays.
    Without that record (a host first deployed before it existed) no account is removed: nothing
    shows which of them the deploy made.
    """
    found = [PACKAGE_LEFTOVERS[n] for n in sorted(set(purged) & PACKAGE_LEFTOVERS.keys())]

    def union(field: str) -> tuple[str, ...]:
        return tuple(sorted({v for lo in found for v in getattr(lo, field)}))

    had = {line.split(" ", 1)[1].strip() for line in accounts_before or () if " " in line}
    accounts = () if accounts_before is None else tuple(a for a in union("accounts") if a not in had)
    return Leftovers(files=union("files"), dirs_if_empty=union("dirs_if_empty"), paths=union("paths"),
                     accounts=accounts)
