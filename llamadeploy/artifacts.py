"""Controller-side artifacts (model files, source tarballs): hashing with a cache.

Hashing a multi-GB model on every deploy of every host would dominate a no-op
run, so the hash is computed once per file per run.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of a controller file, cached on (path, size, mtime)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
