"""The docker role's operations: images, the compose project, the image's flags."""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Generator
from typing import Any

from pyinfra import host
from pyinfra.api import OperationError, operation
from pyinfra.facts.files import File, FileContents
from pyinfra.facts.server import Command

from llamadeploy.chat_template import template_problem
from llamadeploy.roles.docker.facts import DockerImageId, ImageServerHelp, ImageServerTemplates
from llamadeploy.tuning import flag_names, unknown_flags


@operation()
def check_image_flags(image: str, args: list[str]) -> Generator[Any, None, None]:
    """
    Fail before the compose file changes if ``args`` holds a flag ``llama-server`` in ``image`` does not know.

    + image: the local image reference the compose file will run
    + args: the rendered argument vector (the container's command)
    """
    accepted = host.get_fact(ImageServerHelp, image=image)
    if not accepted and not host.state.is_executing:
        # change detection (pyinfra without -y) runs before the image is pulled or loaded
        host.noop(f"llama-server in {image} is checked once the image is on the host")
        return
    if not accepted:
        raise OperationError(f"llama-server in {image} is missing or printed no --help")
    bad = unknown_flags(args, accepted)
    if bad:
        raise OperationError(f"llama-server in {image} does not accept {', '.join(bad)} (see its --help)")
    problem = template_problem(args, host.get_fact(ImageServerTemplates, image=image), f"llama-server in {image}")
    if problem:
        raise OperationError(problem)
    host.noop(f"all {len(flag_names(args))} flags are known to llama-server in {image}")
    yield from ()


def _moved(moved: str | None) -> bool:
    """Whether a rollback re-tagged the reference since it was last loaded or pulled."""
    return bool(moved and host.get_fact(File, path=moved))


def _clear(moved: str | None) -> str:
    return f" && rm -f {shlex.quote(moved)}" if moved else ""


@operation()
def image_loaded(ref: str, tarball: str, sha256: str, moved: str | None = None):
    """
    ``docker load`` a pushed image tarball unless ``ref`` is already the image this tarball gave.

    + ref: the image reference the tarball holds (``repo:tag``)
    + tarball: host path of the tarball, already verified by ``verified_file``
    + sha256: its hash; ``<tarball>.loaded`` records it with the image ID the load gave ``ref``
    + moved: a file a rollback leaves when it re-tags ``ref`` (:func:`image_tagged`)

    The tag can move without a load (a rollback puts it back on an earlier release's image), so
    "loaded" means: the marker names this tarball, ``ref`` is still the image it loaded (a marker
    from before image IDs were recorded names only the tarball) and no rollback re-tagged it since.
    """
    # the tarball's content is guaranteed by the verified_file op right before; the
    # marker says which content was loaded, so no second hash of a large file here
    marker = [line.strip() for line in host.get_fact(FileContents, path=f"{tarball}.loaded") or []]
    now = host.get_fact(DockerImageId, ref=ref)
    if now and marker in ([sha256], [sha256, now]) and not _moved(moved):
        host.noop(f"{ref} is loaded from {tarball}")
        return
    q = shlex.quote
    yield (f"docker load -q -i {q(tarball)} && {{ echo {q(sha256)}; "
           f"docker image inspect --format '{{{{.Id}}}}' {q(ref)}; }} > {q(tarball + '.loaded')}{_clear(moved)}")


@operation()
def image_tagged(ref: str, image_id: str, moved: str | None = None):
    """
    Point the tag ``ref`` at the local image ``image_id`` (a rollback to a release whose image a
    later deploy re-tagged); nothing when it already does. No transfer: the image is on the host.

    + ref: the reference the release's compose file runs
    + image_id: the image that release ran (``sha256:…``)
    + moved: a file to leave behind, so the next deploy loads or pulls ``ref`` again instead of
      taking the re-tagged image for its own
    """
    if host.get_fact(DockerImageId, ref=ref) == image_id:
        host.noop(f"{ref} is {image_id[:19]}")
        return
    q = shlex.quote
    leave = f" && mkdir -p {q(posixpath.dirname(moved))} && echo {q(ref)} > {q(moved)}" if moved else ""
    yield f"docker tag {q(image_id)} {q(ref)}{leave}"


@operation()
def image_pulled(ref: str, moved: str | None = None):
    """
    ``docker pull`` an image reference (tag or tag@digest) unless it is already on the host.

    + ref: what to pull; pin it with a digest so "already there" means "the same image"
    + moved: the file a rollback leaves when it re-tags ``ref``: then the tag is pulled again
    """
    if host.get_fact(DockerImageId, ref=ref) and not _moved(moved):
        host.noop(f"{ref} is present")
        return
    yield f"docker pull -q {shlex.quote(ref)}{_clear(moved)}"


@operation()
def compose_down(project_dir: str, compose: str):
    """
    Stop and remove the compose project (switching to native mode); nothing if there is none.

    + project_dir: where the compose file lives
    + compose: the compose command (``docker-compose`` or ``docker compose``)
    """
    path = f"{project_dir}/docker-compose.yml"
    if not host.get_fact(File, path=path):
        host.noop(f"no compose project in {project_dir}")
        return
    q = shlex.quote
    yield f"cd {q(project_dir)} && {compose} down --remove-orphans && rm -f docker-compose.yml"


@operation()
def compose_running(project_dir: str, compose: str):
    """
    Start the compose project if its container is not running (after a manual stop, a reboot
    without restart policy, ...); nothing when it runs.

    + project_dir: where the compose file lives
    + compose: the compose command
    """
    q = shlex.quote
    state = host.get_fact(
        Command,
        command=f"cd {q(project_dir)} && docker inspect --format '{{{{.State.Running}}}}' "
        f"$({compose} ps -q) 2>/dev/null || true",
    )
    if (state or "").strip() == "true":
        host.noop("the container is running")
        return
    yield f"cd {q(project_dir)} && {compose} up -d --remove-orphans"

