"""GPU hosts: CUDA build flags, driver checks, and the offload pinned from llama.cpp's own fit.

Pure functions (no pyinfra, no I/O): the GPU role reads facts (``roles/gpu/facts.py``) and
feeds them here, so every rule is unit-tested on recorded ``nvidia-smi`` output
(``tests/unit/test_gpu.py``). Facts about llama.cpp are read from the b11434 source tree
(file:line given where a rule depends on them), not from memory.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class GpuError(ValueError):
    """A GPU host that cannot be served as planned; the message carries the numbers."""


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as ``nvidia-smi --query-gpu`` reports it.

    Memory is ``None`` where the driver prints ``[N/A]`` (unified-memory parts such as
    GB10 report no framebuffer); ``compute_cap`` is ``None`` on drivers that predate the
    ``compute_cap`` query field (see :func:`compute_cap_from_name`).
    """

    index: int  #: nvidia-smi's index (PCI bus order by default)
    name: str
    uuid: str
    memory_total_mib: int | None
    memory_free_mib: int | None
    compute_cap: str | None  #: "8.9"; None when the driver cannot say
    driver: str  #: "570.133.07"


# --- nvidia-smi and nvcc ---------------------------------------------------------------------

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

def nvidia_smi_command() -> str:
    """The shell command of the ``NvidiaGpus`` fact (also run as is by ``benchmarks/gpu_device.py``).

    The full query first and, when the driver refuses ``compute_cap`` (drivers before R510),
    the same query without it. No ``nvidia-smi`` (a CPU host) prints nothing; it always exits 0
    so that a broken driver reads as "no GPU", not as a failed deploy.
    """
    full = ",".join(GPU_FIELDS)
    fallback = ",".join(_FALLBACK_FIELDS)
    fmt = "--format=csv,noheader,nounits"
    return (
        "command -v nvidia-smi >/dev/null 2>&1 || exit 0; "
        f'out="$(nvidia-smi --query-gpu={full} {fmt} 2>&1)"; '
        f'case "$out" in *"{NOT_A_FIELD}"*) nvidia-smi --query-gpu={fallback} {fmt} 2>&1 ;; '
        '*) printf "%s\\n" "$out" ;; esac; exit 0'
    )


def cuda_toolkit_command() -> str:
    """The shell command of the ``CudaToolkit`` fact: ``nvcc --version``, PATH first, then
    ``/usr/local/cuda/bin`` (NVIDIA's packages; not in a login PATH). Debian's
    ``nvidia-cuda-toolkit`` puts nvcc in ``/usr/bin``."""
    return (
        "n=$(command -v nvcc 2>/dev/null || true); "
        '[ -n "$n" ] || { [ -x /usr/local/cuda/bin/nvcc ] && n=/usr/local/cuda/bin/nvcc; }; '
        '[ -z "$n" ] || "$n" --version 2>&1; exit 0'
    )


def parse_nvcc(lines: list[str]) -> str | None:
    """The CUDA release from ``nvcc --version`` ("Cuda compilation tools, release 12.8, V12.8.93"
    gives "12.8"), None when there is no such line."""
    for line in lines:
        m = re.search(r"\brelease (\d+\.\d+)\b", line)
        if m:
            return m.group(1)
    return None


# --- compute capability ---------------------------------------------------------------------

#: GPU name patterns -> compute capability, first match wins (more specific ones first).
#: Source: NVIDIA's "CUDA GPU Compute Capability" table, https://developer.nvidia.com/cuda-gpus
#: (cross-checked with huggingface.js PR #2010's table). Only used when the driver is too old
#: to report ``compute_cap`` itself (it became a query field in the R510 drivers; 470 refuses
#: it: huggingface/candle#733). Names are matched on whole words of the upper-cased name, so
#: "A10" does not match "A100" and "L4" does not match "L40S".
_NAME_TABLE: tuple[tuple[str, str], ...] = (
    # Blackwell
    (r"\bGB10\b", "12.1"),
    (r"\bRTX PRO [0-9]000\b.*\bBLACKWELL\b", "12.0"),
    (r"\bRTX 50[5-9]0\b", "12.0"),
    (r"\bG?B(100|200)\b", "10.0"),
    # Hopper
    (r"\bG?H(100|200|800|20)\b", "9.0"),
    # Ada Lovelace
    (r"\bL(4|40|40S|20)\b", "8.9"),
    (r"\bRTX [0-9]{4} ADA\b", "8.9"),
    (r"\bRTX 40[5-9]0\b", "8.9"),
    # Ampere
    (r"\bA(100|800|30)\b", "8.0"),
    (r"\bA(10|10G|40|16|2)\b", "8.6"),
    (r"\bRTX A[2-6]000\b", "8.6"),
    (r"\bRTX 30[5-9]0\b", "8.6"),
    # Turing
    (r"\bT4\b", "7.5"),
    (r"\bRTX [4-8]000\b", "7.5"),  # Quadro RTX 4000..8000 (the Ada ones matched above)
    (r"\bRTX 20[6-8]0\b", "7.5"),
    (r"\bGTX 16[5-6]0\b", "7.5"),
    # Volta, Pascal
    (r"\bV100\b", "7.0"),
    (r"\bTITAN V\b", "7.0"),
    (r"\bP100\b", "6.0"),
    (r"\bP(40|4)\b", "6.1"),
    (r"\bGTX 10[5-8]0\b", "6.1"),
)


def compute_cap_from_name(name: str) -> str | None:
    """The compute capability of a GPU known by its product name, None when unknown.

    Old drivers (470 and earlier) refuse the ``compute_cap`` query field, yet the build needs
    the capability to pick ``CMAKE_CUDA_ARCHITECTURES``. The product name is stable and the
    capability is a property of the chip, so a table is exact for the GPUs it lists; an
    unknown name gives None rather than a guess (a wrong architecture builds a binary that
    cannot run its kernels on the host).
    """
    words = " ".join(re.findall(r"[A-Za-z0-9]+", name.upper()))
    for pattern, cap in _NAME_TABLE:
        if re.search(pattern, words):
            return cap
    return None


def _cap(gpu: Gpu) -> str:
    cap = gpu.compute_cap or compute_cap_from_name(gpu.name)
    if not cap or not re.fullmatch(r"\d+\.\d+", cap):
        raise GpuError(
            f"compute capability of GPU {gpu.index} ({gpu.name}, driver {gpu.driver}) is unknown: "
            "the driver does not report compute_cap and the name is not in the table; "
            "set the CUDA architectures explicitly"
        )
    return cap


def cuda_architectures(gpus: Sequence[Gpu]) -> str:
    """``CMAKE_CUDA_ARCHITECTURES`` for exactly the GPUs of a host: "8.9" -> "89", several -> "80;89".

    ``native`` only works when the build runs on the GPU host itself, and llama.cpp's default
    list (75-virtual 80-virtual 86-real 89-real 90-virtual ..., ggml/src/ggml-cuda/CMakeLists.txt:21-68)
    leaves some GPUs on PTX that an older driver cannot JIT (llama.cpp #1648, #5845). A
    plain "89" builds both the device code and the PTX of that architecture, so the binary runs
    on its GPU without JIT. An unknown capability is an error, never a guess.
    """
    if not gpus:
        raise GpuError("no NVIDIA GPU on this host: nothing to build CUDA for")
    archs = {_cap(g).replace(".", "") for g in gpus}
    return ";".join(sorted(archs, key=int))


#: CUDA toolkit needed to compile for an architecture (nvcc release notes); llama.cpp's own
#: default list adds 89/90 from 11.8 and 120a from 12.8 (ggml/src/ggml-cuda/CMakeLists.txt:49-65).
_ARCH_MIN_CUDA = {"86": (11, 1), "87": (11, 4), "89": (11, 8), "90": (11, 8), "100": (12, 8),
                  "101": (12, 8), "103": (12, 9), "120": (12, 8), "121": (12, 9)}
#: CUDA 13 dropped compilation for Maxwell, Pascal and Volta: llama.cpp adds 50/61/70-virtual
#: only when CUDAToolkit_VERSION < 13 (ggml/src/ggml-cuda/CMakeLists.txt:43-45).
_CUDA13_MIN_ARCH = 75


def _version(text: str) -> tuple[int, ...]:
    parts = text.strip().split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise GpuError(f"not a version number: {text!r}")
    return tuple(int(p) for p in parts)


def _arch_list(archs: str | Iterable[str]) -> list[str]:
    items = archs.split(";") if isinstance(archs, str) else list(archs)
    out = [a.strip() for a in items if a.strip()]
    if not out or not all(re.fullmatch(r"\d{2,3}", a) for a in out):
        raise GpuError(f"not a CUDA architecture list: {archs!r} (expected e.g. '80;89')")
    return out


def cuda_cmake_args(gpus: Sequence[Gpu], cuda_version: str) -> dict[str, str]:
    """The CMake cache entries of a CUDA build for these GPUs with this toolkit.

    ``GGML_CUDA=ON`` and the architectures derived from the GPUs. ``GGML_NATIVE`` is left to
    the CPU side of the build (it also means ``-march=native``); b11434 has no
    ``GGML_CUDA_F16``. Refuses an architecture the toolkit cannot compile (too new for it,
    or dropped by CUDA 13), because CMake would otherwise fail half-way through a 25-minute build.
    """
    archs = cuda_architectures(gpus)
    cuda = _version(cuda_version)
    for arch in _arch_list(archs):
        need = _ARCH_MIN_CUDA.get(arch)
        if need and cuda[:2] < need:
            raise GpuError(f"CUDA {cuda_version} cannot compile for sm_{arch}: needs CUDA >= {need[0]}.{need[1]}")
        if cuda[0] >= 13 and int(arch) < _CUDA13_MIN_ARCH:
            raise GpuError(f"CUDA {cuda_version} no longer compiles for sm_{arch} (CUDA 13 dropped < sm_75): "
                           "use a CUDA 12 toolkit for this GPU")
    return {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": archs}


def cuda_release_kind(cuda_version: str, archs: str | Iterable[str]) -> str:
    """The build-kind suffix of a CUDA release, e.g. ``cuda12.8-sm80_89``.

    A CUDA build only runs where its toolkit's driver minimum and its architectures fit, so CPU
    and CUDA builds never share a release, and CUDA builds are keyed by (CUDA major.minor,
    architecture list); build-once rollouts then reuse one artifact per such key.
    """
    ver = _version(cuda_version)
    if len(ver) < 2:
        raise GpuError(f"CUDA version needs major.minor: {cuda_version!r}")
    return f"cuda{ver[0]}.{ver[1]}-sm{'_'.join(sorted(set(_arch_list(archs)), key=int))}"


# --- driver ---------------------------------------------------------------------------------

#: Minimum Linux driver for a CUDA major release under minor version compatibility: an
#: application built with any 12.x toolkit runs on a driver >= 525.60.13, etc.
#: Source: NVIDIA CUDA Toolkit Release Notes, table "CUDA Toolkit and Minimum Required Driver
#: Version for CUDA Minor Version Compatibility"
#: (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html), and
#: https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html
#: ("CUDA 13.x >= 580, 12.x >= 525, 11.x >= 450"; 11.x needs 450.80.02).
_MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580"}


def min_driver_for_cuda(cuda_version: str) -> str:
    """The oldest Linux driver that runs binaries built with this CUDA toolkit.

    Minor version compatibility (CUDA 11 and later) lets a 12.8 build run on any driver of the
    12.x family minimum. It covers device code (SASS) only: PTX JIT needs the toolkit's own
    driver, which is why :func:`cuda_architectures` builds real code for the host's GPUs.
    """
    major = _version(cuda_version)[0]
    if major not in _MIN_DRIVER:
        known = ", ".join(f"{m}.x" for m in sorted(_MIN_DRIVER))
        raise GpuError(f"no known minimum driver for CUDA {cuda_version} (known: {known})")
    return _MIN_DRIVER[major]


def check_driver(driver: str, cuda_version: str) -> None:
    """Refuse, with the numbers, a driver older than the CUDA build needs.

    Such a driver loads llama-server but every CUDA call fails with "CUDA driver version is
    insufficient for CUDA runtime version", and the server silently falls back to the CPU.
    """
    need = min_driver_for_cuda(cuda_version)
    if _version(driver) < _version(need):
        raise GpuError(f"driver {driver} is older than CUDA {cuda_version} needs (>= {need})")


# --- llama-fit-params -----------------------------------------------------------------------
# llama.cpp b11434: tools/fit-params/fit-params.cpp, common/fit.cpp, common/arg.cpp.

#: Options of llama-server that change what must fit in device memory and that
#: llama-fit-params also accepts (all are LLAMA_EXAMPLE_COMMON options in common/arg.cpp),
#: with whether they take a value. Everything else in the planned arguments is either
#: irrelevant to memory or server-only (--host, --port, --alias, --api-key-file, --metrics,
#: --cache-ram, --kv-unified, --no-cont-batching, ...), which llama-fit-params rejects with
#: "error: invalid argument: X" and exit status 1 (common/arg.cpp:829-831).
_FIT_PASSTHROUGH: dict[str, bool] = {
    "-c": True, "--ctx-size": True,
    "-np": True, "--parallel": True,
    "-b": True, "--batch-size": True,
    "-ub": True, "--ubatch-size": True,
    "-ctk": True, "--cache-type-k": True,
    "-ctv": True, "--cache-type-v": True,
    "-fa": True, "--flash-attn": True,
    "--swa-full": False,
    "-sm": True, "--split-mode": True,
    "-mg": True, "--main-gpu": True,
    "-dev": True, "--device": True,
    "-kvo": False, "--kv-offload": False, "-nkvo": False, "--no-kv-offload": False,
    "--repack": False, "-nr": False, "--no-repack": False,
    "--no-host": False,
    "-lm": True, "--load-mode": True,
}

#: What llama-fit-params computes (so the planned value is dropped from its command line).
_NGL = ("-ngl", "--gpu-layers", "--n-gpu-layers")
_FIT_OWN = ("-fit", "--fit", "-fitt", "--fit-target", "-fitc", "--fit-ctx", "-fitp", "--fit-print", "-m", "--model")

#: Options that fix the placement of weights: with any of them set, common/fit.cpp aborts
#: ("model_params::tensor_split already set by user, abort" fit.cpp:473,
#: "tensor_buft_overrides already set by user, abort" fit.cpp:485), and the tool exits 1.
_PLACEMENT = {
    "-ts": "--tensor-split", "--tensor-split": "--tensor-split",
    "-ot": "--override-tensor", "--override-tensor": "--override-tensor",
    "-cmoe": "--cpu-moe", "--cpu-moe": "--cpu-moe",
    "-ncmoe": "--n-cpu-moe", "--n-cpu-moe": "--n-cpu-moe",
    "-ncffn": "--n-cpu-ffn", "--n-cpu-ffn": "--n-cpu-ffn",
}
_PLACEMENT_TAKES_VALUE = {"--tensor-split", "--override-tensor", "--n-cpu-moe", "--n-cpu-ffn"}


def _options(args: Sequence[str], takes_value: dict[str, bool]) -> list[tuple[str, str | None]]:
    """(option, value) pairs of an argument vector; values are consumed only for known options."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if takes_value.get(arg) and i + 1 < len(args):
            out.append((arg, args[i + 1]))
            i += 2
        else:
            out.append((arg, None))
            i += 1
    return out


def _all_value_options() -> dict[str, bool]:
    """Every option whose value must travel with it: the ones passed to the fit, the ones it
    computes or blocks on, and the value-taking ones :func:`llamadeploy.tuning.server_args`
    renders (so that an alias or path is never read as an option)."""
    known = dict(_FIT_PASSTHROUGH)
    known.update({o: True for o in _NGL})
    known.update({o: _PLACEMENT[o] in _PLACEMENT_TAKES_VALUE for o in _PLACEMENT})
    known.update({o: True for o in _FIT_OWN})
    known.update({"--host": True, "--port": True, "--alias": True, "--threads": True, "--threads-batch": True,
                  "--numa": True, "--chat-template": True, "--chat-template-file": True, "--cache-ram": True,
                  "--api-key-file": True})
    return known


def fit_blockers(args: Sequence[str]) -> list[str]:
    """The options in ``args`` that make upstream's fit abort (so no fit can be pinned).

    A fixed tensor split or tensor overrides, and the split modes the fit does not implement
    (``tensor``: fit.cpp:183-185; ``row`` across devices: fit.cpp:477-479).
    """
    blockers: list[str] = []
    for opt, value in _options(args, _all_value_options()):
        if opt in _PLACEMENT:
            blockers.append(_PLACEMENT[opt])
        elif opt in ("-sm", "--split-mode") and value in ("row", "tensor"):
            blockers.append(f"--split-mode {value}")
    return blockers


def fit_params_command(binary: str, model_path: str, args: Sequence[str], margin_mib: int | None) -> list[str]:
    """The ``llama-fit-params`` command line for the model and the planned server flags.

    It runs llama.cpp's own fit (the one ``-fit on`` runs at every start) once, at deploy
    time, so the result can be pinned. Only the memory-relevant options it accepts are passed
    (see ``_FIT_PASSTHROUGH``); the planned ``--n-gpu-layers`` is dropped because a set
    ``-ngl`` makes the fit abort ("n_gpu_layers already set by user", fit.cpp:463-465), and
    ``margin_mib`` becomes ``--fit-target`` (free MiB to leave per device; upstream default 1024).
    Placement options that make the fit abort are refused here (see :func:`fit_blockers`):
    with them set, the user's ``gpu_layers`` must be explicit instead.
    """
    blockers = fit_blockers(args)
    if blockers:
        raise GpuError(f"llama-fit-params aborts when {', '.join(blockers)} is set: set gpu_layers explicitly "
                       "instead of fitting")
    if margin_mib is not None and margin_mib < 0:
        raise GpuError(f"fit margin must be >= 0 MiB, got {margin_mib}")
    cmd = [binary, "--model", model_path]
    for opt, value in _options(args, _all_value_options()):
        if opt in _FIT_PASSTHROUGH:
            cmd += [opt] if value is None or not _FIT_PASSTHROUGH[opt] else [opt, value]
    if margin_mib is not None:
        cmd += ["--fit-target", str(margin_mib)]
    return cmd


#: The one line llama-fit-params prints to stdout on success (its log goes to stderr through
#: common/log, common/log.cpp:100-104). tools/fit-params/fit-params.cpp (b11434):
#:   :45     printf("-c %" PRIu32 " -ngl %" PRIi32, cparams.n_ctx, mparams.n_gpu_layers);
#:   :54-56  if more than one device: printf(" -ts ") then "%s%" PRIu32 per device, comma-separated
#:   :64-66  if overrides: printf(" -ot \"") then "%s%s=%s" (pattern=buffer type), comma-separated
#:   :69     printf("%s\n", any_tbo ? "\"" : "");
#: i.e. ``-c 4096 -ngl 48 -ts 20,28 -ot "blk\.14\.ffn_(up|down|gate)_(ch|)exps=CPU,..."``.
#: The -ot list is double-quoted in this release; the build shown in tools/fit-params/README.md
#: printed it bare, so both forms are accepted. Exit status: 1 on a bad argument (:24) or a
#: failed fit (:40), 0 otherwise.
_FIT_LINE = re.compile(r'^-c (\d+) -ngl (-?\d+)(?: -ts (\d+(?:,\d+)*))?(?: -ot (?:"([^"]*)"|(\S+)))?$')


def parse_fit_params(output: str) -> dict[str, str]:
    """The fitted arguments from llama-fit-params' output: ``{"-c", "-ngl"[, "-ts"][, "-ot"]}``.

    ``-ngl -1`` means the fit found nothing to change (common/fit.cpp returns early, "no changes
    needed", leaving ``n_gpu_layers`` at its default -1): every layer fits, which the loader
    reads as all layers (src/llama-model.cpp:2010). It is kept as printed; :func:`pinned_args` turns
    it into ``all``. ``-ts`` values are layer counts per device (fit.cpp:556). The last
    matching line wins, so stderr mixed into ``output`` does no harm.
    """
    found: dict[str, str] | None = None
    for line in output.splitlines():
        m = _FIT_LINE.match(line.strip())
        if m:
            found = {"-c": m.group(1), "-ngl": m.group(2)}
            if m.group(3):
                found["-ts"] = m.group(3)
            ot = m.group(4) if m.group(4) is not None else m.group(5)
            if ot:
                found["-ot"] = ot
    if found is None:
        raise GpuError("llama-fit-params printed no fitted arguments (expected a line '-c N -ngl N ...'); "
                       "it exits 1 when the model cannot be loaded or fitted")
    return found


_PINNED = {"-c": ("-c", "--ctx-size"), "-ngl": _NGL, "-ts": ("-ts", "--tensor-split"),
           "-ot": ("-ot", "--override-tensor")}
_LONG = {"-c": "--ctx-size", "-ngl": "--n-gpu-layers", "-ts": "--tensor-split", "-ot": "--override-tensor"}


def pinned_args(planned_args: Sequence[str], fitted: dict[str, str] | None,
                explicit_gpu_layers: int | str | None) -> list[str]:
    """The server arguments with the offload pinned, so that every restart behaves the same.

    * An explicit ``gpu_layers`` wins: it replaces ``--n-gpu-layers`` and nothing fitted is used.
    * Otherwise the fitted ``-c``, ``-ngl`` and (multi-GPU) ``-ts`` / ``-ot`` replace the planned
      ones; ``-ngl -1`` ("nothing to change") is pinned as ``all``.
    * Split options the user set (``--split-mode``, ``--main-gpu``, ``--device``, a fixed
      ``--tensor-split``) pass through untouched.
    * ``--fit off`` is appended (unless the user set ``--fit``): the pinned values are the fit,
      and llama-server would otherwise run its fit again at every start (common/common.cpp:1235).
    """
    if explicit_gpu_layers is None and fitted is None:
        raise GpuError("nothing to pin: neither an explicit gpu_layers nor a llama-fit-params result")
    known = _all_value_options()
    pairs = _options(planned_args, known)
    if explicit_gpu_layers is not None:
        pins = {"-ngl": str(explicit_gpu_layers)}
    else:
        assert fitted is not None
        pins = {k: v for k, v in fitted.items() if k in _PINNED}
        if pins.get("-ngl") == "-1":
            pins["-ngl"] = "all"
    drop = {alias for key in pins for alias in _PINNED[key]}
    out: list[str] = []
    for opt, value in pairs:
        if opt in drop:
            continue
        out += [opt] if value is None else [opt, value]
    for key in ("-c", "-ngl", "-ts", "-ot"):
        if key in pins:
            out += [_LONG[key], pins[key]]
    if not any(opt in ("-fit", "--fit") for opt, _ in pairs):
        out += ["--fit", "off"]
    return out


# --- preflight ------------------------------------------------------------------------------

MIB = 1 << 20


def preflight_gpu(model_bytes: int, kv_bytes: int, gpus: Sequence[Gpu], margin_mib: int,
                  gpu_layers: int | str | None = "all") -> None:
    """Refuse, with numbers, a GPU plan that cannot fit at all.

    The rule, kept simple so that it never refuses what could work:

    * ``gpu_layers`` "all" (every layer on the GPUs): model weights + KV cache must fit in the
      GPUs' free memory minus ``margin_mib`` per GPU (llama.cpp's ``-fitt`` margin, which also
      absorbs the compute buffers). Token embeddings stay in host memory, so this errs on
      the safe side by their size.
    * Any GPU offload asked for on a host without an NVIDIA GPU is refused.
    * A number of layers, or "auto"/None (llama.cpp's fit), is not checked here: what does not
      fit on the GPUs stays in host memory, which the host memory preflight already checks.
    * A GPU that reports no free memory (``[N/A]``, unified memory) cannot be checked: skipped.
    """
    wants_gpu = gpu_layers not in (None, 0, "0", "auto")
    if wants_gpu and not gpus:
        raise GpuError(f"gpu_layers={gpu_layers} but this host has no NVIDIA GPU")
    if gpu_layers != "all" or not gpus:
        return
    free = [g.memory_free_mib for g in gpus]
    if any(f is None for f in free):
        return
    usable_mib = sum(f for f in free if f is not None) - margin_mib * len(gpus)
    need_mib = -(-(model_bytes + kv_bytes) // MIB)
    if need_mib > usable_mib:
        raise GpuError(
            f"gpu_layers=all needs {need_mib} MiB on the GPUs (model {model_bytes // MIB} MiB + KV cache "
            f"{kv_bytes // MIB} MiB) but {len(gpus)} GPU(s) have {sum(f for f in free if f is not None)} MiB free, "
            f"{usable_mib} MiB after a {margin_mib} MiB margin each: lower gpu_layers or the context size"
        )


# --- systemd --------------------------------------------------------------------------------


def device_allow(gpus: Sequence[Gpu]) -> list[str]:
    """systemd ``DeviceAllow=`` lines giving a hardened unit access to the NVIDIA devices only.

    CUDA opens ``/dev/nvidiactl``, ``/dev/nvidia-uvm`` (+ ``-tools``), ``/dev/nvidia-modeset``
    and one ``/dev/nvidiaN`` per GPU. N is the device minor number, which equals
    nvidia-smi's index on a host that sees all its GPUs (both follow PCI order) but not where
    only some GPUs are visible (a container given GPU 4 sees it as index 0). Path rules are
    resolved when the unit starts, so the nodes must exist then (``nvidia-uvm`` is created on
    first CUDA use by nvidia-modprobe). No GPU, no lines: the unit keeps its closed policy.
    """
    if not gpus:
        return []
    nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
    nodes += [f"/dev/nvidia{i}" for i in sorted({g.index for g in gpus})]
    return [f"DeviceAllow={n} rw" for n in nodes]


def device_node_commands(indexes: Iterable[int]) -> list[str]:
    """The commands that create a host's NVIDIA device nodes as root (pure): ``/dev/nvidia-uvm``
    exists only once the nvidia-uvm module is loaded, which CUDA would do itself through the setuid
    ``nvidia-modprobe`` that the hardened unit, and the fit's sandbox, forbid. The devices unit
    runs them before the server (templates/service), the fit script before the fit."""
    return [f"/usr/bin/nvidia-modprobe -u -c={int(i)}" for i in sorted(set(indexes))]


# --- pinning at deploy time -----------------------------------------------------------------


def fit_inputs_digest(release_key: str, model_sha256: str, fit_command: Sequence[str], gpus: Sequence[Gpu]) -> str:
    """What a pinned fit depends on: the build, the model, the fit's own command line (the planned
    context, slots, cache types and margin) and the GPUs (which cards, how much memory each has).
    Free memory is left out on purpose: it moves with every process, and a re-fit on every run
    would make a deploy never report zero changes. Equal digests: the pinned result still holds."""
    import hashlib
    import json

    cards = sorted((g.uuid, g.name, g.memory_total_mib) for g in gpus)
    text = json.dumps([release_key, model_sha256, list(fit_command[1:]), cards])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def held_mib(compute_apps: str, pid: int | None) -> int:
    """MiB that process ``pid`` holds on its busiest GPU, from ``nvidia-smi
    --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` (0 when not listed).

    The running server still holds its memory while the next release is fitted; the fit then
    counts it as taken, so :func:`fit_margin` lowers the margin by it."""
    held = 0
    for line in compute_apps.splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) >= 2 and pid is not None and cols[0] == str(pid) and cols[-1].isdigit():
            held = max(held, int(cols[-1]))
    return held


def fit_margin(margin_mib: int, held: int) -> int:
    """``--fit-target`` for a fit run while the current server holds ``held`` MiB that its restart
    frees: the margin minus that, never below 0 (then the fit is conservative by the rest)."""
    return max(0, margin_mib - held)


#: the environment variable the unit appends to llama-server's command line (``$LLAMA_GPU_FIT``:
#: systemd splits it at whitespace; the fitted values hold none)
FIT_VAR = "LLAMA_GPU_FIT"


def fit_script(fit_cmd: Sequence[str], margin_mib: int, unit: str, env_path: str, digest: str,
               run_as: Sequence[str] = (), device_nodes: Sequence[str] = ()) -> str:
    """The shell script that pins llama.cpp's fit on a host (run as root, ``_sudo`` included).

    The fit itself runs behind ``run_as`` (``hardening.sandboxed_run``: the service's user, its
    unit's sandbox and limits): it parses the model, third-party input, as the server does. Only
    this script, as root, creates the device nodes first (``device_nodes``:
    :func:`device_node_commands`, which the sandbox could not), reads the GPUs, stops and starts
    the server and writes the result.

    ``fit_cmd`` ends in ``--fit-target N``; N is replaced by the margin left after the memory
    the running server holds (the least it holds on any GPU: one value serves every GPU), since
    its restart frees it. When it holds more
    than the margin, the fit would count its weights as taken: the server is stopped for the
    fit and started again right after (with its old arguments; the deploy's restart follows),
    whatever the fit's outcome, so a failed fit never leaves it stopped. The fitted line
    (``-c N -ngl N [-ts ..] [-ot "..."]``, see :data:`_FIT_LINE`) becomes ``$LLAMA_GPU_FIT`` with
    ``-ngl -1`` ("nothing to change": all layers fit) written as ``all``, the ``-ot`` quotes
    dropped and its backslashes doubled (systemd splits an unbraced ``$VAR`` like a command line,
    quotes and backslash escapes included, so a single backslash would be lost), and
    ``--fit off`` appended; the file is
    written beside and renamed into place. A fit that fails or prints no line fails the host.
    """
    if len(fit_cmd) < 2 or fit_cmd[-2] != "--fit-target":
        raise GpuError("the fit command must end in --fit-target N")
    q = shlex.quote
    run = " ".join(q(a) for a in [*run_as, *fit_cmd[:-1]]) + ' "$target"'
    tmp = f"{env_path}.partial"
    return "\n".join([
        "set -u",
        *(f"{cmd} >/dev/null 2>&1 || true" for cmd in device_nodes),
        f"pid=$(systemctl show -p MainPID --value {q(unit)} 2>/dev/null || echo 0)",
        "held=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null"
        " | awk -F', *' -v p=\"$pid\" '$1 == p {print $2}' | sort -n | head -n 1)",
        'held=${held:-0}; case "$held" in *[!0-9]*) held=0 ;; esac',
        f"target=$(( {int(margin_mib)} - held )); stopped=",
        f'if [ "$target" -lt 0 ]; then systemctl stop {q(unit)}; stopped=1; target={int(margin_mib)}; fi',
        f"out=$({run} 2>&1); rc=$?",
        f'[ -z "$stopped" ] || systemctl start {q(unit)} || true',
        "line=$(printf '%s\\n' \"$out\" | grep -E '^-c [0-9]+ -ngl -?[0-9]+' | tail -n 1)",
        'if [ "$rc" -ne 0 ] || [ -z "$line" ]; then',
        "  printf '%s\\n' \"$out\" | tail -n 15 >&2",
        '  echo "llama-fit-params (exit $rc) printed no fitted arguments: the model cannot be fitted" >&2; exit 1',
        "fi",
        "line=$(printf '%s' \"$line\" | sed -E -e 's/ -ngl -1( |$)/ -ngl all\\1/' -e 's/ -ot \"([^\"]*)\"/ -ot \\1/'"
        " -e 's/\\\\/\\\\\\\\/g')",
        'case "$line" in *"\'"*) echo "unexpected quote in the fitted arguments: $line" >&2; exit 1 ;; esac',
        "set -e",
        f"mkdir -p {q(posixpath.dirname(env_path))}",
        f"printf '# inputs %s: llama-fit-params for this release, model, flags and GPUs (llamadeploy)\\n"
        f"{FIT_VAR}=\\047%s --fit off\\047\\n' {q(digest)} \"$line\" > {q(tmp)}",
        f"sync -f {q(tmp)} && mv -f {q(tmp)} {q(env_path)}",
    ])


# --- installing what is missing -------------------------------------------------------------

#: NVIDIA's CUDA apt repository ships its signing key as a package
CUDA_KEYRING = "cuda-keyring_1.1-1_all.deb"
#: NVIDIA's CUDA repositories, one per distribution release and architecture
NVIDIA_REPOS = "https://developer.download.nvidia.com/compute/cuda/repos"


def nvidia_repo(debian_major: int, arch: str) -> str:
    """NVIDIA's CUDA repository for a Debian release (12, 13) on ``arch`` (uname -m): each
    release has its own (``debian13`` is there since CUDA 13.0), Arm servers are ``sbsa``."""
    return f"{NVIDIA_REPOS}/debian{debian_major}/{'sbsa' if arch == 'aarch64' else arch}"


def package_source(install: str, distro: Mapping[str, Any], arch: str, override: str | None = None) -> str:
    """Where a host's NVIDIA packages come from, from pyinfra's ``LinuxDistribution`` fact of the
    host and its ``uname -m`` (pure): for "distro", the apt line that adds Debian's contrib,
    non-free and non-free-firmware for the host's own codename (trixie's driver is 550,
    bookworm's 535: the wrong codename would mix releases); for "nvidia", NVIDIA's repository
    for its major release (``override``: ``llama_gpu.nvidia_repo``). Only Debian 12 and 13 get
    this far (preflight refuses others), so the bookworm fallbacks are never taken on a host
    whose os-release names its release."""
    if install == "distro":
        codename = (distro.get("release_meta") or {}).get("VERSION_CODENAME") or "bookworm"
        return f"deb http://deb.debian.org/debian {codename} contrib non-free non-free-firmware\n"
    return override or nvidia_repo(distro.get("major") or 12, arch)


def install_packages(source: str, docker: bool, driver: bool, toolkit: bool, container_toolkit: bool,
                     deb_arch: str = "amd64") -> list[str]:
    """The packages that bring a host what it lacks (``driver``, ``toolkit``, ``container_toolkit``:
    whether each is missing), from ``source`` "distro" (Debian's contrib/non-free) or "nvidia"
    (NVIDIA's CUDA repository, which also carries the container toolkit); ``deb_arch`` is the
    host's Debian architecture (the DKMS module is built against its kernel headers).

    Debian has no NVIDIA container toolkit, so docker mode with "distro" is refused rather than
    half-installed; a native host needs nvcc (the build) and the CUDA runtime libraries (every
    host of a CUDA release), so the toolkit comes with it.
    """
    pkgs: list[str] = []
    if source == "distro":
        if driver:
            pkgs += [f"linux-headers-{deb_arch}", "nvidia-driver", "firmware-misc-nonfree", "nvidia-smi",
                     "nvidia-modprobe"]
        if toolkit and not docker:
            pkgs += ["nvidia-cuda-toolkit"]
        if container_toolkit and docker:
            raise GpuError("Debian has no NVIDIA container toolkit: use llama_gpu.install 'nvidia' "
                           "or llama_gpu.packages_dir for docker mode")
    elif source == "nvidia":
        if driver:
            pkgs += ["cuda-drivers"]
        if toolkit and not docker:
            pkgs += ["cuda-toolkit"]
        if container_toolkit and docker:
            pkgs += ["nvidia-container-toolkit"]
    else:
        raise GpuError(f"unknown install source {source!r}")
    return pkgs
