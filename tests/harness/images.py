"""A llama-server Docker image for air-gapped tests, made without a registry or a daemon.

No registry is reachable and the CI machine runs no Docker engine, so the test
image is written directly in the ``docker save`` archive format that
``docker load`` reads (manifest.json, an image config, one layer tar):

* layer = the cached Debian bookworm tree of the test hosts (curl for the health
  check) + ``/app/llama-server`` built by the native deploy from the PyPI llama.cpp
  source (one build per run, reused) + the OpenMP runtime it links
* entrypoint ``/app/llama-server``, like upstream's ``server`` image
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from llamadeploy.artifacts import file_sha256
from llamadeploy.sandbox.host import CACHE, rootfs

IMAGE_REF = "llamactl/llama-server:b11434-test"
#: seconds for copying the cached Debian tree or packing it into the layer tar (a few hundred MB)
TREE_TIMEOUT = 600




def build_image_tarball(host_root: Path, out: Path | None = None, rebuild: str | None = None) -> Path:
    """``docker save``-format tarball of IMAGE_REF from a built host tree (``host_root``).

    ``rebuild``: a label that makes another image (another ID) under the same tag, as a rebuilt
    image pushed with an unchanged tag would be.
    """
    out = out or CACHE / "images" / "llama-server-b11434-test.tar"
    work = out.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = work / "tree"
    subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs()), str(tree)], check=True, timeout=TREE_TIMEOUT)
    (tree / ".llamactl-complete").unlink(missing_ok=True)
    (tree / "app").mkdir()
    binary = host_root / "opt/llama.cpp/current"
    binary = host_root / Path(str(binary.readlink())).relative_to("/") / "bin/llama-server"
    shutil.copy2(binary, tree / "app/llama-server")
    for lib in (host_root / "usr/lib/x86_64-linux-gnu").glob("libgomp.so.1*"):
        shutil.copy2(lib, tree / "usr/lib/x86_64-linux-gnu" / lib.name, follow_symlinks=True)

    layer = work / "layer.tar"
    subprocess.run(["tar", "-C", str(tree), "-cf", str(layer), "."], check=True, timeout=TREE_TIMEOUT)
    diff_id = file_sha256(str(layer))
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": ["/app/llama-server"], "WorkingDir": "/app",
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   **({"Labels": {"rebuild": rebuild}} if rebuild else {})},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created_by": "tests/harness/images.py"}],
    }).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [IMAGE_REF], "Layers": [f"{diff_id}/layer.tar"]}]).encode()

    tmp = out.with_suffix(".partial")
    with tarfile.open(tmp, "w") as tar:
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        tar.add(layer, arcname=f"{diff_id}/layer.tar")
    tmp.rename(out)
    shutil.rmtree(work)
    return out
