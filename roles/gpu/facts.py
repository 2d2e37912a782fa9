"""What the GPU role reads from a host: its NVIDIA GPUs (``nvidia-smi``) and CUDA toolkit (``nvcc``).

Each fact is one shell command and a pure parser (:func:`parse_gpus`, :func:`parse_nvcc`), so
parsing is tested on recorded output of real GPUs (``tests/unit/data/nvidia-smi/``).
"""

from __future__ import annotations

import re

from pyinfra.api import FactBase

from llamadeploy.gpu import Gpu, compute_cap_from_name

__all__ = ["CudaToolkit", "Gpu", "NvidiaGpus", "compute_cap_from_name", "parse_gpus", "parse_nvcc"]

#: Fields read for each GPU, in this order. ``compute_cap`` comes last but one so that the
#: fallback (without it) keeps every other column in place.
GPU_FIELDS = ("index", "name", "uuid", "memory.total", "memory.free", "compute_cap", "driver_version")
_FALLBACK_FIELDS = tuple(f for f in GPU_FIELDS if f != "compute_cap")

#: What nvidia-smi prints (exit status 2) when a driver predates a query field; seen with
#: driver 470.182.03 for compute_cap (huggingface/candle#733).
NOT_A_FIELD = "is not a valid field to query"


def _number(text: str) -> int | None:
    """An integer column; ``[N/A]`` (unified-memory GPUs such as GB10) and the like give None."""
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_gpus(lines: list[str]) -> list[Gpu]:
    """GPUs from ``--format=csv,noheader,nounits`` lines of :data:`GPU_FIELDS` (7 columns) or of
    the old-driver fallback without ``compute_cap`` (6 columns, ``compute_cap`` None).

    Anything else (nvidia-smi's "couldn't communicate with the NVIDIA driver" message, a
    blank line) is skipped, so a host whose driver is not loaded reports no GPU rather than
    failing the deploy. GPU names contain no commas, so a plain split is exact.
    """
    gpus: list[Gpu] = []
    for line in lines:
        cols = [c.strip() for c in line.split(",")]
        if len(cols) not in (len(GPU_FIELDS), len(_FALLBACK_FIELDS)) or not cols[0].isdigit():
            continue
        cap = cols[5] if len(cols) == len(GPU_FIELDS) else None
        if cap is not None and not re.fullmatch(r"\d+\.\d+", cap):
            cap = None
        gpus.append(Gpu(index=int(cols[0]), name=cols[1], uuid=cols[2], memory_total_mib=_number(cols[3]),
                        memory_free_mib=_number(cols[4]), compute_cap=cap, driver=cols[-1]))
    return sorted(gpus, key=lambda g: g.index)


class NvidiaGpus(FactBase[list[Gpu]]):
    """The host's NVIDIA GPUs: name, memory total/free (MiB), compute capability, driver; [] without any.

    One shell command does the whole read, so one fact read suffices: the full query first and,
    when the driver refuses ``compute_cap`` (drivers before R510), the same query without it.
    ``command -v nvidia-smi`` absent (a CPU host) prints nothing, which pyinfra turns into
    ``default()``; the command always exits 0 so that a broken driver is "no GPU", not a failed deploy.
    """

    def command(self) -> str:
        full = ",".join(GPU_FIELDS)
        fallback = ",".join(_FALLBACK_FIELDS)
        fmt = "--format=csv,noheader,nounits"
        return (
            "command -v nvidia-smi >/dev/null 2>&1 || exit 0; "
            f'out="$(nvidia-smi --query-gpu={full} {fmt} 2>&1)"; '
            f'case "$out" in *"{NOT_A_FIELD}"*) nvidia-smi --query-gpu={fallback} {fmt} 2>&1 ;; '
            '*) printf "%s\\n" "$out" ;; esac; exit 0'
        )

    @staticmethod
    def default() -> list[Gpu]:
        return []

    def process(self, output: list[str]) -> list[Gpu]:
        return parse_gpus(output)


def parse_nvcc(lines: list[str]) -> str | None:
    """The CUDA release from ``nvcc --version`` ("Cuda compilation tools, release 12.8, V12.8.93"
    gives "12.8"), None when there is no such line."""
    for line in lines:
        m = re.search(r"\brelease (\d+\.\d+)\b", line)
        if m:
            return m.group(1)
    return None


class CudaToolkit(FactBase[str | None]):
    """The CUDA toolkit release ``nvcc`` reports ("12.8"), None when no toolkit is installed.

    NVIDIA's packages install nvcc in ``/usr/local/cuda/bin``, which is not in a login PATH;
    Debian's ``nvidia-cuda-toolkit`` puts it in ``/usr/bin``. Both are looked at, PATH first.
    """

    def command(self) -> str:
        return (
            "n=$(command -v nvcc 2>/dev/null || true); "
            '[ -n "$n" ] || { [ -x /usr/local/cuda/bin/nvcc ] && n=/usr/local/cuda/bin/nvcc; }; '
            '[ -z "$n" ] || "$n" --version 2>&1; exit 0'
        )

    @staticmethod
    def default() -> str | None:
        return None

    def process(self, output: list[str]) -> str | None:
        return parse_nvcc(output)
