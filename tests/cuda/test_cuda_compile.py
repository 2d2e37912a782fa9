"""CUDA compile check: llama-server built with the CMake options a GPU host would get. ~25 min.

Behind the ``cuda_compile`` marker (deselected by default; ``./scripts/test -m cuda_compile``):
this machine has nvcc (CUDA 13.0 at ``/usr/local/cuda``) but no GPU, no driver and no cuBLAS.
cuBLAS comes from PyPI's ``nvidia-cublas`` wheel; ``GGML_CUDA_NO_VMM=ON`` because there is no
``libcuda`` to link the virtual-memory API against. The options are the product's own:
``BuildConfig.cmake_options()`` with ``llamadeploy.gpu.cuda_cmake_args`` for a recorded H100
(compute capability 9.0 -> ``CMAKE_CUDA_ARCHITECTURES=90``). The binary cannot run here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from llamadeploy import gpu
from llamadeploy.config import BuildConfig
from llamadeploy.roles.gpu import GpuHost
from llamadeploy.roles.gpu.facts import parse_gpus
from llamadeploy.sandbox import assets
from llamadeploy.sandbox.host import CACHE

pytestmark = pytest.mark.cuda_compile

NVCC = Path("/usr/local/cuda/bin/nvcc")
DATA = Path(__file__).resolve().parents[1] / "unit" / "data" / "nvidia-smi"
CUBLAS = "nvidia-cublas>=13,<14"
#: seconds for downloading the cuBLAS wheel (some hundred MB)
DOWNLOAD_TIMEOUT = 900
#: seconds for CMake's configure step
CONFIGURE_TIMEOUT = 300
#: seconds for the build (about 25 minutes on 2 cores): just below the per-test timeout (pyproject's
#: ``timeout``), so a hung build is killed and fails its test with its own output
BUILD_TIMEOUT = 1700
#: seconds for a quick command (readelf)
LOCAL_TIMEOUT = 60


def cublas_dir() -> Path:
    """The wheel, downloaded once and unpacked into the test cache, with the unversioned links CMake wants."""
    wheels = CACHE / "pypi" / "cublas"
    if not list(wheels.glob("nvidia_cublas-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), CUBLAS], check=True,
                       timeout=DOWNLOAD_TIMEOUT)
    wheel = sorted(wheels.glob("nvidia_cublas-*.whl"))[-1]
    out = CACHE / wheel.stem
    root = out / "nvidia" / "cu13"
    if not (root / "lib" / "libcublas.so").exists():
        with zipfile.ZipFile(wheel) as z:
            z.extractall(out)
        for lib in ("libcublas", "libcublasLt"):
            (root / "lib" / f"{lib}.so").symlink_to(f"{lib}.so.13")
    return root


def test_cuda_build_for_one_architecture(tmp_path):
    if not NVCC.exists():
        pytest.skip("no nvcc at /usr/local/cuda")
    gpus = parse_gpus((DATA / "h100.csv").read_text().splitlines())
    assert gpu.cuda_cmake_args(gpus, "13.0") == {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "90"}
    # what build_release passes on such a host: the release's options (backend cuda) + the GPU role's
    host_defines = GpuHost(tuple(gpus), "13.0", gpu.cuda_architectures(gpus)).cmake_defines()
    options = BuildConfig.model_validate(
        {"native": False, "source": "tarball", "tarball": str(assets.llama_cpp_tarball()), "backend": "cuda"},
        strict=False).cmake_options() | host_defines
    assert options["GGML_CUDA"] == "ON" and options["CMAKE_CUDA_ARCHITECTURES"] == "90"
    lib = cublas_dir()
    with tarfile.open(assets.llama_cpp_tarball()) as t:
        t.extractall(tmp_path / "src", filter="data")
    src = next((tmp_path / "src").glob("*/llama.cpp"))
    here = {  # what this machine needs on top: where nvcc and the wheel's cuBLAS are, no libcuda
        "CMAKE_CUDA_COMPILER": str(NVCC), "CUDAToolkit_ROOT": "/usr/local/cuda", "GGML_CUDA_NO_VMM": "ON",
        "CUDA_cublas_LIBRARY": f"{lib}/lib/libcublas.so", "CUDA_cublasLt_LIBRARY": f"{lib}/lib/libcublasLt.so",
        "CMAKE_CUDA_FLAGS": f"-I{lib}/include", "CMAKE_CXX_FLAGS": f"-I{lib}/include",
    }
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(src), "-B", str(build), *(f"-D{k}={v}" for k, v in {**options, **here}.items())]
    subprocess.run(configure, check=True, capture_output=True, text=True, timeout=CONFIGURE_TIMEOUT)
    t0 = time.monotonic()
    proc = subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "llama-fit-params",
                           "-j", str(os.cpu_count() or 2)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    binary = build / "bin" / "llama-server"
    needed = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True,
                            timeout=LOCAL_TIMEOUT).stdout
    assert "libcublas.so" in needed, needed
    print(f"CUDA build (sm_90, {os.cpu_count()} cores): {took / 60:.1f} min")
