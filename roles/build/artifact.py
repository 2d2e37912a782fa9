"""Build once, ship many: which hosts share a build, and the controller's cache of built releases.

A release built on one host runs on another of the same *kind*: same distribution and
major version (libc, libstdc++, libgomp), same CPU architecture, and, for ``GGML_NATIVE``
builds, the same CPU feature flags. The first host of a kind compiles; its release comes
back as ``<cache>/releases/<release key>/<kind>.tar.gz`` with ``.sha256`` next to it
(:mod:`llamadeploy.ctlcache` decides where the cache is), and the others receive it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamadeploy import ctlcache


def host_kind(distro: Mapping[str, Any], arch: str, cpu_flags: str, native: bool) -> str:
    """``debian12-x86_64-cpu<digest>`` (native) or ``debian12-x86_64-portable`` (pure)."""
    name = str(distro.get("name") or "unknown").lower().replace(" ", "")
    major = distro.get("major") or ""
    cpu = f"cpu{cpu_flags}" if native else "portable"
    return f"{name}{major}-{arch}-{cpu}"


def artifact_path(release_key: str, kind: str) -> Path:
    return ctlcache.cache_dir() / "releases" / release_key / f"{kind}.tar.gz"


def artifact_sha256(path: Path) -> str | None:
    """The recorded sha256 of a cached artifact, None when the artifact is not (completely) there."""
    try:
        sha = Path(f"{path}.sha256").read_text().split()[0]
    except (OSError, IndexError):
        return None
    return sha if path.is_file() and len(sha) == 64 else None


def publish(downloaded: str, host_sha_file: str, dest: str) -> None:
    """Controller side, at execution: check the downloaded tarball against the builder's own
    sha256, then name it in the cache (tarball first, ``.sha256`` last: a reader that finds the
    hash finds a complete tarball)."""
    h = hashlib.sha256()
    with open(downloaded, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    actual = h.hexdigest()
    expected = Path(host_sha_file).read_text().split()[0]
    if actual != expected:
        os.unlink(downloaded)
        raise RuntimeError(f"release tarball {dest}: sha256 {actual} on the controller, {expected} on the builder")
    target = Path(dest)
    os.replace(downloaded, target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".sha256-")
    with os.fdopen(fd, "w") as f:
        f.write(f"{actual}  {target.name}\n")
    os.replace(tmp, f"{target}.sha256")
    os.unlink(host_sha_file)
