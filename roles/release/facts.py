"""What the release role reads from a host: its recorded releases, and what lies in a directory."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from pyinfra.api import FactBase

from llamadeploy.config import HostConfig
from llamadeploy.manifest import Manifest


def records_dir(cfg: HostConfig) -> str:
    """Where a host keeps its release records (one directory per release that passed a gate)."""
    return f"{cfg.service.config_dir}/releases"


@dataclass(frozen=True)
class ReleaseRecord:
    """One recorded release: its id, when it was last activated (a counter), its manifest, and in
    docker mode the image it ran (``sha256:…``, read from the host when it was recorded)."""

    id: str
    activated: int
    manifest: Manifest
    image_id: str | None = None


class ReleaseRecords(FactBase[list[ReleaseRecord]]):
    """Every ``<dir>/<id>/`` with a manifest, oldest activation first (unreadable ones skipped).

    One line per record: ``<activated> <id> <image id or -> <manifest JSON on one line>``.
    """

    def command(self, path: str) -> str:
        d = shlex.quote(path)
        return (
            f"[ -d {d} ] || exit 0; for e in {d}/*/; do case \"$e\" in *.partial/) continue;; esac; "
            "[ -f \"$e/deploy.json\" ] || continue; "
            "printf '%s %s %s ' \"$(cat \"$e/activated\" 2>/dev/null || echo 0)\" \"$(basename \"$e\")\" "
            "\"$(cat \"$e/image.id\" 2>/dev/null || echo -)\"; "
            "tr -d '\\n' < \"$e/deploy.json\"; echo; done"
        )

    @staticmethod
    def default() -> list[ReleaseRecord]:
        return []

    def process(self, output: list[str]) -> list[ReleaseRecord]:
        out = []
        for line in output:
            parts = line.split(" ", 3)
            if len(parts) != 4 or not parts[0].isdigit():
                continue
            image = parts[2] if parts[2].startswith("sha256:") else None
            try:
                out.append(ReleaseRecord(parts[1], int(parts[0]), Manifest.parse(parts[3]), image))
            except ValueError:
                continue
        return sorted(out, key=lambda r: (r.activated, r.id))


class Entries(FactBase[list[str]]):
    """Names in a directory (hidden ones included), [] when it does not exist."""

    def command(self, path: str) -> str:
        return f"ls -1A -- {shlex.quote(path)} 2>/dev/null || true"

    @staticmethod
    def default() -> list[str]:
        return []

    def process(self, output: list[str]) -> list[str]:
        return sorted(line for line in output if line)
