"""Pure rules of the uninstall: what on a Docker engine the deploy installed is not its own."""

from __future__ import annotations

from collections.abc import Iterable

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
