"""The model role's controller side: resolve what to serve, and (controller mode) fetch it with huggingface_hub.

Everything here runs on the controller while pyinfra prepares the deploy, so a
missing repo, a gated repo without a token, a full disk or a corrupt download
stops the run before any host is touched.

huggingface_hub does not check the sha256 of what it downloaded; we do, against
the repo's LFS metadata (or a pinned ``sha256``), after every download.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llamadeploy.artifacts import file_sha256
from llamadeploy.config import FILE_NAME_RE, ModelConfig, relative_path

DEFAULT_ENDPOINT = "https://huggingface.co"
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<n>\d{5})-of-(?P<total>\d{5})\.gguf$")
MIB = 1 << 20


class ModelError(Exception):
    """A model problem the operator can fix; the message says what and how."""


@dataclass(frozen=True)
class ModelFile:
    name: str  #: file name on the host (basename)
    repo_path: str  #: path in the repo ("" for a controller file)
    size: int
    sha256: str
    local: str | None = None  #: controller path, once downloaded (controller mode)

    @property
    def controller_path(self) -> str:
        """The controller copy to push; only files fetched or given on the controller have one."""
        if self.local is None:
            raise ModelError(f"{self.name} has no controller copy (distribution 'host' downloads on the host)")
        return self.local


@dataclass(frozen=True)
class ModelArtifact:
    """What the host must end up with. ``files[0]`` is what ``--model`` gets."""

    files: tuple[ModelFile, ...]
    alias: str
    repo_id: str | None = None
    commit: str | None = None
    endpoint: str | None = None

    @property
    def first(self) -> ModelFile:
        return self.files[0]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def endpoint_for(spec: ModelConfig) -> str:
    return (spec.hf_endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token_for(spec: ModelConfig) -> str | None:
    """The Hub token, from the configured file or huggingface_hub's usual places (HF_TOKEN, login)."""
    if spec.hf_token_file:
        try:
            return Path(spec.hf_token_file).read_text().strip() or None
        except OSError as exc:
            raise ModelError(f"llama_model.hf_token_file {spec.hf_token_file!r}: {exc.strerror}") from None
    from huggingface_hub import get_token

    return get_token()


def default_alias(filename: str) -> str:
    name = Path(filename).name
    m = SPLIT_RE.match(name)
    return m.group("stem") if m else name.removesuffix(".gguf")


def pick_files(repo_id: str, names: list[str], filename: str | None, quant: str | None) -> list[str]:
    """The repo files to fetch: one file, or every part of a split GGUF, first part first."""
    ggufs = [n for n in names if n.endswith(".gguf")]
    if filename is not None:
        if filename not in names:
            raise ModelError(
                f"{repo_id} has no file {filename!r} (its .gguf files: {', '.join(sorted(ggufs)) or 'none'})"
            )
        first = filename
    else:
        if quant is None:
            raise ModelError(f"{repo_id}: give llama_model.filename or llama_model.quant")
        q = quant.lower()
        matches = sorted(n for n in ggufs if re.search(rf"(^|[-_.]){re.escape(q)}([-_.]|$)", Path(n).name.lower()))
        firsts = [n for n in matches if (m := SPLIT_RE.match(Path(n).name)) is None or m["n"] == "00001"]
        if not firsts:
            raise ModelError(f"{repo_id} has no .gguf file for quant {quant!r} (files: {', '.join(sorted(ggufs))})")
        if len(firsts) > 1:
            raise ModelError(
                f"{repo_id}: quant {quant!r} matches several files ({', '.join(firsts)}); set llama_model.filename"
            )
        first = firsts[0]
    m = SPLIT_RE.match(Path(first).name)
    if not m:
        return [first]
    if m["n"] != "00001":
        raise ModelError(f"{repo_id}: {first!r} is not the first part of a split GGUF; name the -00001- part")
    prefix = first[: -len("00001-of-00000.gguf")]
    parts = [f"{prefix}{i:05d}-of-{m['total']}.gguf" for i in range(1, int(m["total"]) + 1)]
    missing = [p for p in parts if p not in names]
    if missing:
        raise ModelError(f"{repo_id}: split GGUF is missing {', '.join(missing)}")
    return parts


def listed_name_problem(repo_id: str, name: str) -> str | None:
    """A file name from a Hub listing is third-party input that reaches the unit, the compose file
    and shell commands: it must pass the rules an inventory's ``llama_model.filename`` passes (pure)."""
    try:
        relative_path(name)
    except ValueError as exc:
        return f"{repo_id}: the listed file {name!r} {exc}"
    if not FILE_NAME_RE.fullmatch(Path(name).name):
        return f"{repo_id}: the listed file name {Path(name).name!r} must be letters, digits and ._+@- only"
    return None


def _hub_error(exc: Exception, repo_id: str, revision: str, endpoint: str, token: str | None) -> ModelError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        how = "the token given has no access to it" if token else "no token was given"
        return ModelError(
            f"{repo_id} at {endpoint} is gated (401) and {how}: accept its licence on the Hub, then put a "
            f"token in a file and set llama_model.hf_token_file (or export HF_TOKEN on the controller)"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelError(f"{repo_id} not found at {endpoint} (or it is private and the token has no access)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelError(f"{repo_id} has no revision {revision!r} at {endpoint}")
    if isinstance(exc, errors.EntryNotFoundError):
        return ModelError(f"{repo_id}@{revision}: file not found at {endpoint}: {exc}")
    return ModelError(f"{repo_id}@{revision} at {endpoint}: {type(exc).__name__}: {str(exc).splitlines()[0]}")


@lru_cache(maxsize=32)
def _resolve_hub(endpoint: str, repo_id: str, revision: str, filename: str | None, quant: str | None,
                 token: str | None) -> tuple[str, tuple[tuple[str, int, str], ...]]:
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - mapped to a clear message
        raise _hub_error(exc, repo_id, revision, endpoint, token) from None
    siblings = {s.rfilename: s for s in info.siblings or []}
    files = []
    for name in pick_files(repo_id, list(siblings), filename, quant):
        s = siblings[name]
        bad = listed_name_problem(repo_id, name)
        if bad:
            raise ModelError(bad)
        if s.lfs is None or not s.lfs.sha256:
            raise ModelError(f"{repo_id}@{info.sha}: {name} has no LFS sha256 in the repo metadata; pin llama_model.sha256")
        if not re.fullmatch(r"[0-9a-f]{64}", s.lfs.sha256):
            raise ModelError(f"{repo_id}@{info.sha}: {name} has LFS sha256 {s.lfs.sha256[:80]!r}, not 64 hex digits")
        files.append((name, s.lfs.size, s.lfs.sha256))
    if not info.sha or not re.fullmatch(r"[0-9a-f]{40}", info.sha):
        raise ModelError(f"{repo_id}@{revision} at {endpoint}: the Hub answered without a commit hash "
                         f"(got {str(info.sha)[:80]!r})")
    return info.sha, tuple(files)


def resolve(spec: ModelConfig) -> ModelArtifact:
    """Turn the model spec into files with sizes and hashes (asks the Hub for Hub models)."""
    if spec.path is not None:
        sha = spec.sha256 or file_sha256(spec.path)
        f = ModelFile(Path(spec.path).name, "", Path(spec.path).stat().st_size, sha, local=spec.path)
        return ModelArtifact((f,), spec.alias or default_alias(spec.path))
    repo_id, filename, quant = spec.hub_target()
    endpoint = endpoint_for(spec)
    token = token_for(spec)
    commit, files = _resolve_hub(endpoint, repo_id, spec.revision, filename, quant, token)
    if spec.sha256 is not None:
        if len(files) != 1:
            raise ModelError(f"{repo_id}: llama_model.sha256 pins one file, but the model has {len(files)} parts")
        if files[0][2] != spec.sha256:
            raise ModelError(
                f"{repo_id}@{commit}: {files[0][0]} has sha256 {files[0][2]} on the Hub, "
                f"but llama_model.sha256 pins {spec.sha256}"
            )
    mfiles = tuple(ModelFile(Path(n).name, n, size, sha) for n, size, sha in files)
    return ModelArtifact(mfiles, spec.alias or default_alias(files[0][0]), repo_id, commit, endpoint)


def check_free(path: Path, need: int, where: str) -> None:
    """Refuse before downloading when ``path``'s filesystem cannot take ``need`` bytes."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise ModelError(
            f"not enough disk on the {where}: {probe} has {free // MIB} MiB free, "
            f"needs {need // MIB} MiB (model files plus margin)"
        )


def margin(size: int) -> int:
    """Free space to keep beyond the file itself: 5 % plus 256 MiB."""
    return size // 20 + 256 * MIB


def download(art: ModelArtifact, spec: ModelConfig) -> ModelArtifact:
    """Controller mode: fetch into the controller's Hugging Face cache once; verify every file.

    A file already cached with the right hash is not fetched again. A wrong hash
    removes the bad copy from the cache and raises, naming file and both hashes.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if art.repo_id is None:
        return art
    token = token_for(spec)
    # read at call time (huggingface_hub's constant is frozen at import)
    cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    todo = []
    for f in art.files:
        cached = try_to_load_from_cache(art.repo_id, f.repo_path, cache_dir=cache, revision=art.commit)
        if isinstance(cached, str) and os.path.getsize(cached) == f.size and file_sha256(cached) == f.sha256:
            continue
        todo.append(f)
    if todo:
        need = sum(f.size for f in todo)
        check_free(cache, need + margin(need), "controller")
        _remove_orphans(cache, art.repo_id)
    out = []
    for f in art.files:
        try:
            local = hf_hub_download(art.repo_id, f.repo_path, revision=art.commit, token=token,
                                    endpoint=art.endpoint, cache_dir=cache)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(exc, art.repo_id, art.commit or "", art.endpoint or "", token) from None
        actual = file_sha256(local)
        if actual != f.sha256:
            _evict(local)
            raise ModelError(
                f"sha256 mismatch for {art.repo_id}/{f.repo_path}: expected {f.sha256}, got {actual}; "
                f"the download was removed from the controller cache"
            )
        out.append(ModelFile(f.name, f.repo_path, f.size, f.sha256, local=local))
    return ModelArtifact(tuple(out), art.alias, art.repo_id, art.commit, art.endpoint)


def _evict(snapshot_path: str) -> None:
    """Remove a cached file: the snapshot link and the blob it points to."""
    p = Path(snapshot_path)
    blob = p.resolve()
    p.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def _remove_orphans(cache: Path, repo_id: str) -> None:
    """A killed download leaves ``blobs/*.incomplete`` that huggingface_hub never reuses."""
    blobs = cache / f"models--{repo_id.replace('/', '--')}" / "blobs"
    for leftover in blobs.glob("*.incomplete"):
        leftover.unlink(missing_ok=True)
