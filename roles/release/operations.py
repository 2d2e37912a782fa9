"""The release role's operations: record a release on the host, prune old ones, copy host files."""

from __future__ import annotations

import posixpath
import shlex

from pyinfra import host
from pyinfra.api import OperationError, operation
from pyinfra.facts.files import File, Link, Sha1File
from pyinfra.facts.server import Command

from llamadeploy.atomic import durable_rename, staging_path
from llamadeploy.roles.docker.facts import DockerImageId
from llamadeploy.roles.release.facts import Entries, ReleaseRecords
from llamadeploy.roles.release.plan import prune_plan


@operation()
def release_recorded(records_dir: str, release_id: str, sources: dict[str, str], image: str | None = None):
    """
    Keep ``release_id``'s files under ``records_dir/<id>/`` and mark it the latest activated.

    + records_dir: ``<config_dir>/releases``
    + release_id: the release now serving
    + sources: record file name -> host path to copy (the unit or compose file, the manifest)
    + image: docker mode: the image reference the release runs; its local image ID is kept in
      ``image.id`` (a tag can move; the ID is what a rollback reinstates)

    The record is assembled in a temporary directory and renamed into place, so a
    record is complete or absent. Activation order is a counter in ``activated``
    (timestamps of two switches within a second would tie).
    """
    q = shlex.quote
    records = host.get_fact(ReleaseRecords, path=records_dir)
    latest = max((r.activated for r in records), default=0)
    mine = next((r for r in records if r.id == release_id), None)
    entry = posixpath.join(records_dir, release_id)
    if mine is not None:
        # a bare tag may name another image than when the release was first recorded
        moved = image is not None and mine.image_id != host.get_fact(DockerImageId, ref=image)
        is_latest = mine.activated == latest and sum(r.activated == latest for r in records) == 1
        if is_latest and not moved:
            host.noop(f"release {release_id} is recorded and the latest")
            return
        if moved:
            yield _image_id_command(str(image), entry)
        if not is_latest:
            yield (f"echo {latest + 1} > {q(entry)}/activated.tmp && "
                   f"{durable_rename(f'{entry}/activated.tmp', f'{entry}/activated')}")
        return
    tmp = f"{entry}.partial"
    copies = " && ".join(f"cp -p {q(src)} {q(tmp)}/{q(name)}" for name, src in sorted(sources.items()))
    if image is not None:
        copies += f" && {_image_id_command(image, tmp)}"
    yield (
        f"rm -rf {q(tmp)} && mkdir -p {q(tmp)} && {copies} && echo {latest + 1} > {q(tmp)}/activated && "
        f"sync -f {q(tmp)}/activated && mv -T {q(tmp)} {q(entry)} && sync -- {q(records_dir)}"
    )


def _image_id_command(image: str, entry: str) -> str:
    """Shell: write the local image ID ``image`` names now to ``<entry>/image.id``, by rename."""
    q = shlex.quote
    tmp = f"{entry}/image.id.tmp"
    return (f"docker image inspect --format '{{{{.Id}}}}' {q(image)} > {q(tmp)} && "
            f"{durable_rename(tmp, f'{entry}/image.id')}")


@operation()
def releases_pruned(records_dir: str, builds_dir: str, current_link: str, model_dir: str,
                    current_id: str, keep: int, placed: list[str] | None = None, record: str | None = None,
                    images: list[str] | None = None):
    """
    Remove releases beyond the current one and ``keep`` previous ones: their records, and the
    builds and model files no kept release uses.

    + records_dir: ``<config_dir>/releases``
    + builds_dir: ``<prefix>/releases`` (one directory per build)
    + current_link: ``<prefix>/current``; its target is never removed
    + model_dir: the model directory (only ``*.gguf`` files and their records are candidates, and
      the content kept under ``.kept/<sha256>/`` for releases that ran it)
    + current_id: the release serving now
    + keep: how many previous releases stay reinstatable
    + placed: names in ``model_dir`` that the host's ownership record says a deploy placed (a
      release that failed its gate brought them and no record names them)
    + record: that ownership record; the ``file`` lines of the placed files pruned here leave it
      in the same change (a later run that dropped them would report a change of its own)
    + images: the image tags the ownership record says a deploy brought (``image REF``); a pruned
      release's tag that is not among them (the operator's, another service's) is not removed,
      and neither is its image. None: no record (a host from before records), every tag as then

    Runs after the gate, so a release is only pruned once a newer one serves.
    """
    records = host.get_fact(ReleaseRecords, path=records_dir)
    link = host.get_fact(Link, path=current_link)
    target = posixpath.basename(str(link.get("link_target") or "").rstrip("/")) if link else ""
    plan = prune_plan(records, current_id, keep, host.get_fact(Entries, path=builds_dir),
                      host.get_fact(Entries, path=model_dir), protected_build=target,
                      kept_models=host.get_fact(Entries, path=posixpath.join(model_dir, ".kept")), placed=placed)
    if plan.empty:
        host.noop(f"{len(records)} release(s) recorded, nothing beyond {keep} previous to prune")
        return
    q = shlex.quote
    paths = ([posixpath.join(records_dir, r) for r in plan.records]
             + [posixpath.join(builds_dir, b) for b in plan.builds]
             + [posixpath.join(model_dir, m) for m in plan.models]
             + [posixpath.join(model_dir, ".kept", k) for k in plan.kept])
    yield f"rm -rf -- {' '.join(q(p) for p in paths)}"
    ours = set(placed or ())
    gone = [f"file {posixpath.join(model_dir, m)}" for m in plan.models if m in ours]
    if record and gone:
        yield record_lines_dropped(record, gone)
    for image, refs in plan.images:
        yield untagged_image_removed(image, refs if images is None else tuple(r for r in refs if r in images))


def record_lines_dropped(record: str, lines: list[str]) -> str:
    """Shell: rewrite ``record`` without ``lines`` (whole lines, fixed strings), through a staged
    sibling and a durable rename, so that a crash leaves the old record or the new one."""
    q = shlex.quote
    staged = staging_path(record)
    patterns = " ".join(f"-e {q(line)}" for line in lines)
    # grep exits 1 when it prints nothing (a record of only these lines becomes empty, not a
    # failure); anything worse leaves the record as it was and no staged file; bytes, not a locale
    return (f"LC_ALL=C grep -vxF {patterns} -- {q(record)} > {q(staged)}; rc=$?; "
            f"if [ $rc -gt 1 ]; then rm -f {q(staged)}; exit $rc; fi; "
            f"chmod 644 {q(staged)} && {durable_rename(staged, record)}")


def untagged_image_removed(image: str, refs: tuple[str, ...] = ()) -> str:
    """Shell: untag ``refs`` where they still name ``image`` (an ID), then remove the image if no
    tag names it any more, else say it stays.

    ``refs`` are the tags the pruned releases ran it under (an upgrade leaves the old version's
    tag on the old image). ``docker image rm`` by ID would also untag an operator's own tags of
    it; an image a container still uses is refused by docker: both stay, and the run says so.
    """
    q = shlex.quote
    kept = q(f"image {image} kept: still tagged or in use")
    untag = "".join(
        f"if [ \"$(docker image inspect --format '{{{{.Id}}}}' {q(ref)} 2>/dev/null)\" = {q(image)} ]; "
        f"then docker image rm {q(ref)} >/dev/null || true; fi; " for ref in refs)
    return (f"{untag}if ! docker image inspect {q(image)} >/dev/null 2>&1; then :; "
            f"elif [ \"$(docker image inspect --format '{{{{len .RepoTags}}}}' {q(image)})\" = 0 ]; "
            f"then docker image rm {q(image)} || echo {kept}; else echo {kept}; fi")


@operation()
def refused(reason: str):
    """
    Fail this host at execution with ``reason`` (and only this host: a refusal raised while
    pyinfra prepares would stop every host of the run).

    + reason: one line naming the host and what is missing
    """
    if not host.state.is_executing:
        host.noop(reason)
        return
    raise OperationError(reason)
    yield  # an operation is a generator


@operation()
def gate_failed(reason: str):
    """
    Fail this host at execution with ``reason``, after its new release failed its gate and the
    deploy reinstated what served before (or stopped what could not serve). The deploy gates it
    with ``_if`` on the gate's failure, so it runs only then.

    + reason: one line naming the host, the release that failed and the one that serves now
    """
    if not host.state.is_executing:
        host.noop("runs only if the gate fails")
        return
    raise OperationError(reason)
    yield  # an operation is a generator


@operation()
def secret_copied(src: str, dest: str, user: str, group: str, mode: str = "600"):
    """
    Put the host file ``src`` (a recorded secret: a release's API key) at ``dest`` with owner
    and mode, by rename, when content, owner or mode differ.

    + src: host path in a release record
    + dest: host path the service reads
    + user, group, mode: of ``dest``

    Compared with ``cmp`` on the host: no hash of the secret is computed, printed or kept (a
    stable hash in pyinfra's output at ``-vvv`` would identify the key).
    """
    q = shlex.quote
    same = host.get_fact(Command, command=f"cmp -s {q(src)} {q(dest)} && echo same || echo differs")
    info = host.get_fact(File, path=dest)
    if same == "same" and info and info.get("user") == user and info.get("group") == group \
            and str(info.get("mode")) == mode.lstrip("0"):
        host.noop(f"{dest} already holds the release's key")
        return
    stage = staging_path(dest)
    yield (f"install -m {q(mode)} -o {q(user)} -g {q(group)} {q(src)} {q(stage)} && "
           f"{durable_rename(stage, dest)}")


@operation()
def copied(src: str, dest: str, mode: str = "644"):
    """
    Replace ``dest`` with a copy of the host file ``src`` by rename, when their content differs.

    + src: host path (e.g. a recorded unit)
    + dest: host path the service reads
    + mode: file mode of ``dest``

    For reinstating a recorded release: nothing crosses the network.
    """
    if host.get_fact(Sha1File, path=dest) == host.get_fact(Sha1File, path=src):
        host.noop(f"{dest} already equals {src}")
        return
    q = shlex.quote
    stage = staging_path(dest)
    yield f"cp {q(src)} {q(stage)} && chmod {q(mode)} {q(stage)} && {durable_rename(stage, dest)}"
