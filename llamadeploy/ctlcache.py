"""The controller's persistent cache: what is derived from a file, kept across runs.

A no-op deploy must be fast, and two things derived from a model dominated it:
its sha256 (seconds per GB) and its GGUF header (``gguf.GGUFReader`` built every
field, the whole vocabulary included: 36 of 40 s of a profiled no-op run on a 253 MB
model with a 262k-token vocabulary, to read a dozen keys; gguf_meta now walks the header
itself in well under a second). Both are stored here:

* ``hashes/``: a file's sha256 under its path, with the size, mtime, ctime and inode it
  had when hashed; any of them differing means hash again;
* ``gguf-meta/``: :class:`~llamadeploy.gguf_meta.ModelMeta` under the model's sha256
  (content-addressed, so a copy or a rename of the model still hits).

Location: ``$LLAMADEPLOY_CACHE``, else ``$XDG_CACHE_HOME/llamadeploy``, else
``~/.cache/llamadeploy``. Entries are written by rename, so a crashed run leaves
none half-written; an unreadable entry is recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llamadeploy.gguf_meta import ModelMeta

#: bump when ModelMeta's fields or their meaning change: older entries are then ignored
META_VERSION = 3  # 3: embedding_dims


def cache_dir() -> Path:
    if os.environ.get("LLAMADEPLOY_CACHE"):
        return Path(os.environ["LLAMADEPLOY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llamadeploy"


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    """Write by rename; a cache that cannot be written (read-only home) is only slower."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def file_sha256(path: str, compute: Callable[[str], str]) -> str:
    """sha256 of a controller file: from the cache while size, mtime, ctime and inode are unchanged."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}
    entry = cache_dir() / "hashes" / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.json"
    cached = _read(entry)
    if cached and cached.get("path") == real and all(cached.get(k) == v for k, v in stamp.items()):
        sha = cached.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return sha
    sha = compute(real)
    _write(entry, {"path": real, "sha256": sha, **stamp})
    return sha


def model_meta(sha256: str, read: Callable[[], ModelMeta]) -> ModelMeta:
    """The GGUF header values of the model with this sha256 (``file_size`` is the caller's)."""
    entry = cache_dir() / "gguf-meta" / f"{sha256}.json"
    cached = _read(entry)
    if cached and cached.get("version") == META_VERSION:
        try:
            fields = cached["meta"]
            markers = fields.pop("marker_tokens")
            return ModelMeta(**fields, marker_tokens=None if markers is None else frozenset(markers))
        except (KeyError, TypeError):
            pass
    meta = read()
    fields = dataclasses.asdict(meta)
    fields["marker_tokens"] = None if meta.marker_tokens is None else sorted(meta.marker_tokens)
    _write(entry, {"version": META_VERSION, "meta": fields})
    return meta
