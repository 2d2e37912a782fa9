"""What the model role reads from a host."""

from __future__ import annotations

import shlex

from pyinfra.api import FactBase


class DiskFree(FactBase[int | None]):
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""

    def command(self, path: str) -> str:
        return (
            f"d={shlex.quote(path)}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; "
            "df -PB1 \"$d\" | tail -n 1"
        )

    def process(self, output: list[str]) -> int | None:
        fields = output[-1].split() if output else []
        return int(fields[3]) if len(fields) >= 4 and fields[3].isdigit() else None
