"""Model role: the GGUF file on the host, verified by sha256 before it is used.

First cut: the file comes from the controller. Fetching from Hugging Face (or a
mirror) plugs in here as another source that yields a controller path or a
host-side download; the verify-then-rename step stays the same.
"""

from __future__ import annotations

from pyinfra.api import deploy
from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from llamadeploy.artifacts import file_sha256
from llamadeploy.config import HostConfig
from llamadeploy.operations import verified_file


def expected_sha256(cfg: HostConfig) -> str:
    """The pinned hash, or the controller file's (already checked equal at validation)."""
    return cfg.model.sha256 or file_sha256(cfg.model.path)


@deploy("Model")
def model_file(cfg: HostConfig) -> OperationMeta:
    """Put the model in place; returns the operation that changes when the model does."""
    files.directory(name="Data directory", path=cfg.service.data_dir, mode="755")
    files.directory(name="Model directory", path=cfg.model_dir, mode="755")
    return verified_file(
        name=f"Model {cfg.model.filename}",
        src=cfg.model.path,
        dest=cfg.model_path,
        sha256=expected_sha256(cfg),
    )
