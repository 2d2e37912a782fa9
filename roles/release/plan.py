"""Which releases, builds and model files to prune (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamadeploy.atomic import STAGE_SUFFIX
from llamadeploy.roles.release.facts import ReleaseRecord


@dataclass(frozen=True)
class PrunePlan:
    records: list[str]
    builds: list[str]
    models: list[str]
    #: docker images (``sha256:…``) only pruned releases ran, each with the tags those releases
    #: ran it under and no kept release uses (untagged first, so the ID can go)
    images: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    #: directories of kept model content (``<model_dir>/.kept/<sha256>``) no kept release runs
    kept: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.records or self.builds or self.models or self.images or self.kept)


def kept_records(records: list[ReleaseRecord], current_id: str, keep: int) -> list[ReleaseRecord]:
    """The current release and the ``keep`` most recently activated others."""
    current = [r for r in records if r.id == current_id]
    others = sorted((r for r in records if r.id != current_id), key=lambda r: (r.activated, r.id), reverse=True)
    return current + others[:keep]


def image_refs(records: list[ReleaseRecord]) -> dict[str, set[str]]:
    """Docker records' image IDs, each with the tags the releases ran it under (a digest reference
    is no tag: it cannot be removed while the image stays)."""
    out: dict[str, set[str]] = {}
    for r in records:
        if r.image_id:
            ref = r.manifest.image
            out.setdefault(r.image_id, set()).update([ref] if ref and "@" not in ref else [])
    return out


def prune_plan(records: list[ReleaseRecord], current_id: str, keep: int, builds: list[str], models: list[str],
               protected_build: str = "", kept_models: list[str] | None = None,
               placed: list[str] | None = None) -> PrunePlan:
    """What to remove so that the current release and ``keep`` previous ones stay complete.

    Builds and model files are removed only when no kept release uses them; the build
    ``current`` points to (``protected_build``) always stays, and so does anything that
    is not ours to judge: build directories still being written (``*.partial``) and
    model-directory files that no recorded release brought (an operator's own files). A docker image goes
    when only pruned releases ran it (images the host has for other reasons are never named), and
    kept model content (``kept_models``: the sha256 directory names under ``.kept``) when no kept
    release runs it. ``placed``: model files the host's ownership record names (roles/ownership),
    ours as well: a release that failed its gate brought them and is in no record.
    """
    kept = kept_records(records, current_id, keep)
    if not any(r.id == current_id for r in kept):
        return PrunePlan([], [], [])  # the current release is not recorded yet: judge nothing
    kept_ids = {r.id for r in kept}
    used_builds = {r.manifest.release for r in kept if r.manifest.release} | {protected_build}
    used_models = {name for r in kept for name in r.manifest.model_files}
    # only what a recorded release brought: a file an operator put beside ours is not ours to prune
    brought = {name for r in records for name in r.manifest.model_files} | set(placed or ())
    drop_builds = [b for b in builds if b not in used_builds and not b.endswith(".partial")]
    drop_models = []
    for name in models:
        model = name[1:-len(".sha256")] if name.startswith(".") and name.endswith(".sha256") else name
        if model in brought and model not in used_models:
            drop_models.append(name)
    used_images = {r.image_id for r in kept}
    used_refs = {r.manifest.image for r in kept}
    drop_images = {i: refs - used_refs for i, refs in image_refs([r for r in records if r.id not in kept_ids]).items()
                   if i not in used_images}
    used_shas = {sha for r in kept for sha in r.manifest.model_files.values()}
    drop_kept = [k for k in kept_models or [] if k not in used_shas]
    return PrunePlan(sorted(r.id for r in records if r.id not in kept_ids), sorted(drop_builds), sorted(drop_models),
                     [(i, tuple(sorted(refs))) for i, refs in sorted(drop_images.items())], sorted(drop_kept))


def foreign_model_entries(entries: list[str], brought: set[str]) -> list[str]:
    """Names in the model directory that no release of ours brought: an operator's own files.

    Ours are the model files releases named (``brought``), their hash records
    (``.<name>.sha256``), their transfer leftovers (``<name>.partial``, ``.aria2``, the hidden
    staging name) and the content kept by sha256 (``.kept``). Uninstall leaves the rest, with
    the directory that holds them, as a package leaves a directory it finds files in.
    """
    ours = {".kept"}
    for name in brought:
        ours |= {name, f".{name}.sha256", f"{name}.partial", f"{name}.partial.aria2", f".{name}{STAGE_SUFFIX}"}
    return [e for e in entries if e not in ours]
