"""Model role: the GGUF file(s) on the host, verified by sha256 before they are used.

Where the bytes come from is decided on the controller (:mod:`.source`):

* ``distribution: controller`` (and controller files): pushed from the controller,
  which downloaded the Hub file once for all hosts;
* ``distribution: host``: each host downloads with its own isolated
  huggingface_hub, the token in a 0600 file.

Either way a file lands under a temporary name, is verified, and is renamed into
place; a file already there with the right hash is neither fetched nor sent.

A file name that holds other content now (a newer model of the same file name) is never
written while the old release serves: the new content is staged by content, under
``<model_dir>/.kept/<sha256>/<name>``, and linked into place only at the switch (the
service role calls :func:`switched` right before ``current`` and the unit change). Until
then a crash or reboot of the running release loads the weights it ran. The old content
stays under its own ``.kept/<sha256>/`` (a hard link) for the releases that ran it.
"""

from __future__ import annotations

import importlib.metadata
import posixpath
from dataclasses import dataclass
from io import StringIO

from pyinfra import host
from pyinfra.api import DeployError
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files, pip

from llamadeploy import atomic, packages
from llamadeploy.atomic import HashState, VerifiedSha256
from llamadeploy.config import HostConfig
from llamadeploy.roledeploy import role
from llamadeploy.roles import transfer
from llamadeploy.roles.model.facts import DiskFree
from llamadeploy.roles.model.operations import hub_download, kept_path, restored
from llamadeploy.roles.model.source import (
    ModelArtifact,
    ModelError,
    ModelFile,
    download,
    margin,
    resolve,
    token_for,
)

_PREPARED: dict[tuple, ModelArtifact] = {}


@dataclass(frozen=True)
class OnHost:
    """What a host holds of a model's files, read once while preparing (for the disk check) and
    handed to the operations, which do not read it again."""

    #: files in place with the right sha256, by name
    present: dict[str, HashState]
    #: files whose path holds other content (by name: that content's state), kept aside before it is replaced
    other: dict[str, HashState]
    #: files not in place whose content the host kept (``.kept/<sha256>/<name>``): a link away
    kept: frozenset[str]


def prepare(cfg: HostConfig) -> tuple[ModelArtifact, OnHost]:
    """Resolve (and in controller mode download + verify) the model, once per run for all hosts.

    Returns the artifact and what this host holds of it (read once here, for the disk check,
    and not again by the operations). Raises DeployError naming the host; runs before any
    operation executes.
    """
    spec = cfg.model
    key = (spec.model_dump_json(),)
    try:
        if key not in _PREPARED:
            art = resolve(spec)
            if spec.distribution == "controller":
                art = download(art, spec)
            _PREPARED[key] = art
        art = _PREPARED[key]
    except ModelError as exc:
        raise DeployError(f"model for host {host.name}: {exc}") from None
    return art, check_host_disk(cfg, art)


def kept_dir(cfg: HostConfig) -> str:
    """Where replaced model content stays while a kept release uses it (``roles/release`` prunes it)."""
    return f"{cfg.model_dir}/.kept"


def model_path(cfg: HostConfig, art: ModelArtifact) -> str:
    """What ``--model`` gets: the first (or only) file."""
    return f"{cfg.model_dir}/{art.first.name}"


def check_host_disk(cfg: HostConfig, art: ModelArtifact) -> OnHost:
    """Refuse before any transfer when the host's model disk is too small for what is missing.

    Returns what the host holds: files in place with the right sha256 (hashed only where no
    current record vouches for the hash, or with ``llama_verify = "full"``), files holding other
    content, and files whose content it kept for an earlier release (no transfer needed).
    """
    present: dict[str, HashState] = {}
    other: dict[str, HashState] = {}
    for f in art.files:
        state = host.get_fact(VerifiedSha256, path=f"{cfg.model_dir}/{f.name}", full=cfg.verify == "full")
        if state is not None:
            (present if state.sha256 == f.sha256 else other)[f.name] = state
    kept = frozenset(f.name for f in art.files if f.name not in present
                     and (state := host.get_fact(VerifiedSha256, path=kept_path(kept_dir(cfg), f.sha256, f.name)))
                     and state.sha256 == f.sha256)
    on_host = OnHost(present, other, kept)
    missing = [f for f in art.files if f.name not in present and f.name not in kept]
    if not missing:
        return on_host
    need = sum(f.size for f in missing)
    # host mode downloads into the cache dir first, then renames: count it once more there
    free = host.get_fact(DiskFree, path=cfg.model_dir)
    if free is not None and free < need + margin(need):
        raise DeployError(
            f"not enough disk on host {host.name}: {cfg.model_dir} has {free >> 20} MiB free, "
            f"needs {(need + margin(need)) >> 20} MiB (model files plus margin)"
        )
    return on_host


@dataclass(frozen=True)
class Placed:
    """What :func:`model_files` did: the operations whose change means the server is stale, and
    the files staged by content that the switch links into place (:func:`switched`)."""

    changed: list[OperationMeta]
    staged: tuple[ModelFile, ...]


def staged_files(art: ModelArtifact, on_host: OnHost) -> tuple[ModelFile, ...]:
    """Files whose name a release reads now with other content, or whose content the host kept:
    they go (or stay) under ``.kept/<sha256>/`` and reach their name only at the switch."""
    return tuple(f for f in art.files if f.name not in on_host.present
                 and (f.name in on_host.other or f.name in on_host.kept))


def load_path(cfg: HostConfig, f: ModelFile, staged: tuple[ModelFile, ...]) -> str:
    """Where ``f``'s content is on the host before the switch (what a deploy-time check reads)."""
    return kept_path(kept_dir(cfg), f.sha256, f.name) if f in staged else f"{cfg.model_dir}/{f.name}"


@role("Model")
def model_files(cfg: HostConfig, art: ModelArtifact, on_host: OnHost) -> Placed:
    """Put every model file on the host; none that a running or kept release reads changes here.

    ``on_host``: what :func:`prepare` found on the host this run. A file whose name is free is
    sent into place; one whose name holds other content is sent to ``.kept/<sha256>/`` (staged
    by content) and placed by :func:`switched`; content the host kept needs no transfer at all.
    """
    files.directory(name="Data directory", path=cfg.service.data_dir, mode="755")
    files.directory(name="Model directory", path=cfg.model_dir, mode="755")
    staged = staged_files(art, on_host)
    present = on_host.present
    to_send = [f for f in art.files if f.name not in on_host.kept]
    for f in to_send:
        if f in staged:
            files.directory(name=f"Staging directory for {f.name} (by content)",
                            path=posixpath.dirname(load_path(cfg, f, staged)), mode="755")
    if cfg.model.distribution == "host":
        sent = _host_download(cfg, art, present, to_send, staged)
    else:
        if cfg.transfer.mode == "fanout":  # host to host first; the direct push below sends what is left
            for f in art.files:
                transfer.fanned_out(cfg, transfer.Shipment(f"model:{f.sha256}", f.name, f.controller_path,
                                                           load_path(cfg, f, staged), f.sha256),
                                    holds=f.name in present or f.name in on_host.kept)
        sent = [atomic.verified_file(name=f"Model {f.name}" + (" (staged by content)" if f in staged else ""),
                                     src=f.controller_path, dest=load_path(cfg, f, staged),
                                     sha256=f.sha256, present=present.get(f.name))
                for f in to_send]
    return Placed(sent, staged)


def switched(cfg: HostConfig, staged: tuple[ModelFile, ...], stop: str) -> list[OperationMeta]:
    """At the switch: each staged file linked into place from ``.kept/<sha256>/`` (what the name
    held is kept aside by content first, for the releases that ran it). No byte is copied. The
    server is stopped first (``stop``), so the old release never runs with the new content under
    its name; the caller's start or restart, which a new model content needs anyway, follows."""
    return [restored(name=f"Model {f.name} switched to sha256 {f.sha256[:12]}… (a link from its staged content; "
                          "the server stopped first)",
                     dest=f"{cfg.model_dir}/{f.name}", sha256=f.sha256, kept_dir=kept_dir(cfg), stop=stop)
            for f in staged]


def _host_download(cfg: HostConfig, art: ModelArtifact, on_host: dict[str, HashState],
                   to_send: list[ModelFile], staged: tuple[ModelFile, ...]) -> list[OperationMeta]:
    svc = cfg.service
    assert art.repo_id and art.commit and art.endpoint, "host downloads are of resolved Hub models"
    repo_id, commit, endpoint = art.repo_id, art.commit, art.endpoint
    venv = f"{svc.prefix}/hf-venv"
    version = importlib.metadata.version("huggingface_hub")
    packages.installed(cfg, "model", name="Python venv for huggingface_hub", packages=["python3-venv"],
                       update=True, cache_time=24 * 3600, no_recommends=True)
    pip.venv(name="Isolated huggingface_hub environment", path=venv, python="python3")
    pip.packages(name=f"huggingface_hub {version}", packages=[f"huggingface_hub=={version}"],
                 pip=f"{venv}/bin/pip")
    token = token_for(cfg.model)
    token_file = f"{svc.cache_dir}/hf-token"
    files.directory(name="Cache directory", path=svc.cache_dir, mode="755")
    # the token is on the host only while a download needs it, never between runs
    missing = [f for f in to_send if (on_host.get(f.name) is None or on_host[f.name].sha256 != f.sha256)]
    if token and missing:
        atomic.put(name="Hub token file (0600), for this run's download", src=StringIO(token + "\n"),
                   dest=token_file, user="root", group="root", mode="600", secret=True)
    downloads = [
        hub_download(
            name=f"Download {repo_id}/{f.repo_path}@{commit[:12]} on the host",
            repo_id=repo_id, repo_path=f.repo_path, commit=commit, sha256=f.sha256,
            dest=load_path(cfg, f, staged), endpoint=endpoint, python=f"{venv}/bin/python",
            work_dir=f"{svc.data_dir}/.download", token_file=token_file if token else None,
            present=on_host.get(f.name),
        )
        for f in to_send
    ]
    files.file(name="No Hub token file left on the host", path=token_file, present=False)
    return downloads
