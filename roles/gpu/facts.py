"""What the GPU role reads from a host: its NVIDIA GPUs (``nvidia-smi``) and CUDA toolkit (``nvcc``).

Each fact is one shell command and a pure parser (:func:`parse_gpus`, :func:`parse_nvcc`), so
parsing is tested on recorded output of real GPUs (``tests/unit/data/nvidia-smi/``).
"""

from __future__ import annotations

from pyinfra.api import FactBase

from llamadeploy.gpu import (
    GPU_FIELDS,
    Gpu,
    compute_cap_from_name,
    cuda_toolkit_command,
    nvidia_smi_command,
    parse_gpus,
    parse_nvcc,
)

__all__ = ["GPU_FIELDS", "CudaToolkit", "Gpu", "NvidiaGpus", "compute_cap_from_name", "parse_gpus", "parse_nvcc"]


class NvidiaGpus(FactBase[list[Gpu]]):
    """The host's NVIDIA GPUs: name, memory total/free (MiB), compute capability, driver; [] without any.

    One shell command does the whole read, so one fact read suffices: the full query first and,
    when the driver refuses ``compute_cap`` (drivers before R510), the same query without it.
    ``command -v nvidia-smi`` absent (a CPU host) prints nothing, which pyinfra turns into
    ``default()``; the command always exits 0 so that a broken driver is "no GPU", not a failed deploy.
    """

    def command(self) -> str:
        return nvidia_smi_command()

    @staticmethod
    def default() -> list[Gpu]:
        return []

    def process(self, output: list[str]) -> list[Gpu]:
        return parse_gpus(output)


class CudaToolkit(FactBase[str | None]):
    """The CUDA toolkit release ``nvcc`` reports ("12.8"), None when no toolkit is installed.

    NVIDIA's packages install nvcc in ``/usr/local/cuda/bin``, which is not in a login PATH;
    Debian's ``nvidia-cuda-toolkit`` puts it in ``/usr/bin``. Both are looked at, PATH first.
    """

    def command(self) -> str:
        return cuda_toolkit_command()

    @staticmethod
    def default() -> str | None:
        return None

    def process(self, output: list[str]) -> str | None:
        return parse_nvcc(output)
