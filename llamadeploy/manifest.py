"""The deploy manifest: what a host was given, in one typed record.

The deploy writes it to ``<llama_service.config_dir>/deploy.json`` (native and
docker mode alike); everything that later asks "what runs on this host?" reads
it through :meth:`Manifest.parse`: the shipped testinfra suite, ``llamadeploy
status`` and ``bench --inventory``, the benchmark and the e2e tests. One writer,
one reader, so a field cannot be spelled two ways.

It holds no secret: only the path of the key file, never the key.
"""

from __future__ import annotations

import json
import posixpath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from llamadeploy.config import HostConfig
    from llamadeploy.roles.model.source import ModelArtifact
    from llamadeploy.tuning import MemoryPlan

#: file name inside ``llama_service.config_dir``
FILE_NAME = "deploy.json"
#: where it is with the default ``config_dir`` (readers that have no inventory, e.g. testinfra)
DEFAULT_PATH = "/etc/llama-server/deploy.json"


def manifest_path(config_dir: str) -> str:
    """The manifest's path on a host whose ``llama_service.config_dir`` is ``config_dir``."""
    return posixpath.join(config_dir, FILE_NAME)


class PlanRecord(BaseModel):
    """The memory plan the flags came from (see ``tuning.MemoryPlan``)."""

    model_config = ConfigDict(frozen=True)

    limit: int
    model_bytes: int
    kv_bytes_per_token: int
    ctx_size: int
    parallel: int
    swa_full: bool = False
    load_mode: str | None = None


class ServedModel(BaseModel):
    """One model of a router-mode release: what the gate asks it, and its files."""

    model_config = ConfigDict(frozen=True)

    alias: str
    kind: Literal["chat", "embedding", "rerank"]
    on_demand: bool = False
    #: file name -> sha256
    files: dict[str, str]
    #: an embedding model's vector length, read from its GGUF header (the gate asks for exactly
    #: that many); None = unknown (not read by the controller, or a release from before it was kept)
    dimensions: int | None = None


class Manifest(BaseModel):
    """One host's deployed state. Unknown keys from newer writers are ignored on read."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    mode: Literal["native", "docker"]
    #: systemd unit name (native mode; None in docker mode)
    unit: str | None = None
    #: address and port the API is bound to on the host
    host: str
    port: int
    alias: str
    #: ``--model`` as seen from the host (docker mode: the bind-mounted host path)
    model_path: str
    #: file name -> sha256 of every model file
    model_files: dict[str, str]
    model_repo: str | None = None
    model_commit: str | None = None
    #: native: release key and the binary the unit runs
    release: str | None = None
    #: the deployed release as a whole (build + model + unit): ``<version>-<digest>``, the name of
    #: its record under ``<config_dir>/releases/``; None before releases were recorded
    release_id: str | None = None
    binary: str | None = None
    #: docker: compose project directory, its service (container) name and image reference
    compose_project: str | None = None
    compose_service: str | None = None
    image: str | None = None
    #: host path of the API key file, None when no key is set
    api_key_file: str | None = None
    #: ``--chat-template`` chosen because the GGUF has none (None: the model's own template)
    chat_template: str | None = None
    #: the server's argument vector (without the binary)
    args: list[str]
    #: NVIDIA GPUs the server was planned for (``name uuid`` each); empty on a CPU host
    gpus: list[str] = []
    #: ``--n-gpu-layers`` on a GPU host: a number (set explicitly), "fit" (llama-fit-params' result,
    #: pinned in ``gpu_pin_file``), or "auto" (docker: llama-server's own fit at start); None on a CPU host
    gpu_layers: str | None = None
    #: the unit's environment file holding the pinned fit (native mode, ``gpu_layers`` "fit")
    gpu_pin_file: str | None = None
    memory_plan: PlanRecord
    #: router mode: every model it serves (``model_files`` holds all their files); empty: one model
    models: list[ServedModel] = []
    #: router mode: the preset INI the unit names, and its sha256 (the release's model set)
    preset_file: str | None = None
    preset_sha256: str | None = None

    def render(self) -> str:
        """The file's content: stable, indented JSON (a re-deploy with the same input is byte-equal)."""
        data = self.model_dump(mode="json")
        # a CPU host's and a one-model host's manifest stay as they were (and so their release ids)
        for key in ("gpus", "gpu_layers", "gpu_pin_file", "models", "preset_file", "preset_sha256"):
            if not data.get(key):
                data.pop(key, None)
        for served in data.get("models", []):  # a chat or rerank model's entry stays as it was
            if served.get("dimensions") is None:
                served.pop("dimensions", None)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def parse(cls, text: str) -> Manifest:
        return cls.model_validate_json(text)

    @property
    def model_sha256(self) -> str:
        """sha256 of the file ``--model`` names."""
        return self.model_files[posixpath.basename(self.model_path)]

    def flags_digest(self) -> str:
        """Short digest of the argument vector: equal digests, equal command lines."""
        return self.digest(self.args)

    @staticmethod
    def digest(args: list[str]) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(args).encode()).hexdigest()[:12]


def release_id(version: str, manifest_text: str, unit_text: str) -> str:
    """A release's name, ``<version>-<digest of manifest and unit>``: equal ids, equal releases (pure).

    ``manifest_text`` is the manifest rendered without its ``release_id``.
    """
    import hashlib

    digest = hashlib.sha256((manifest_text + "\0" + unit_text).encode()).hexdigest()[:12]
    return f"{version}-{digest}"


def build_manifest(cfg: HostConfig, plan: MemoryPlan, args: list[str], art: ModelArtifact, **mode_fields: Any) -> Manifest:
    """The manifest both modes write; ``mode_fields`` are what differs (unit, release, image, ...;
    router mode: its models, all their files and the preset)."""
    fields: dict[str, Any] = dict(
        mode=cfg.mode,
        host=cfg.server.host,
        port=cfg.server.port,
        alias=art.alias,
        model_path=f"{cfg.model_dir}/{art.first.name}",
        model_files={f.name: f.sha256 for f in art.files},
        model_repo=art.repo_id,
        model_commit=art.commit,
        chat_template=plan.chat_template,
        args=args,
        memory_plan=PlanRecord(limit=plan.limit, model_bytes=plan.model_bytes,
                               kv_bytes_per_token=plan.kv_bytes_per_token, ctx_size=plan.ctx_size,
                               parallel=plan.parallel, swa_full=plan.swa_full, load_mode=plan.load_mode),
    )
    return Manifest(**(fields | mode_fields))
