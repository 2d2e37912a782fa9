"""GPU hosts: fact parsing on recorded nvidia-smi/nvcc output, CUDA build flags, driver checks,
the llama-fit-params command line and its pinned result, preflight refusals, DeviceAllow=.

Recorded outputs and where each came from: tests/unit/data/nvidia-smi/README.md.
"""

from __future__ import annotations

import csv
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuInfo
from llamadeploy.gpu import (
    Gpu,
    GpuError,
    check_driver,
    compute_cap_from_name,
    cuda_architectures,
    cuda_cmake_args,
    cuda_release_kind,
    device_allow,
    fit_blockers,
    fit_params_command,
    min_driver_for_cuda,
    parse_fit_params,
    pinned_args,
    preflight_gpu,
)
from llamadeploy.roles.gpu.facts import CudaToolkit, NvidiaGpus, parse_gpus, parse_nvcc
from llamadeploy.tuning import MemoryPlan, server_args
from tests.conftest import LOCAL_TIMEOUT

DATA = Path(__file__).parent / "data" / "nvidia-smi"
MIB = 1 << 20
GIB = 1 << 30


def gpus(name: str) -> list[Gpu]:
    return parse_gpus((DATA / name).read_text().splitlines())


# --- facts: nvidia-smi ----------------------------------------------------------------------


@pytest.mark.parametrize(("file", "name", "total", "free", "cap", "driver"), [
    ("h100.csv", "NVIDIA H100 80GB HBM3", 81559, 8769, "9.0", "565.57.01"),
    ("a100.csv", "NVIDIA A100-SXM4-40GB", 40960, 40362, "8.0", "580.126.09"),
    ("l4.csv", "NVIDIA L4", 23034, 23034, "8.9", "525.85.12"),
    ("t4.csv", "Tesla T4", 15360, 15360, "7.5", "525.89.02"),
    ("rtx4090.csv", "NVIDIA GeForce RTX 4090", 24564, 24057, "8.9", "550.163.01"),
    ("h200-recorded.csv", "NVIDIA H200", 143771, 143156, "9.0", "580.159.04"),
])
def test_parse_single_gpu_hosts(file, name, total, free, cap, driver):
    (g,) = gpus(file)
    assert (g.index, g.name, g.memory_total_mib, g.memory_free_mib, g.compute_cap, g.driver) == (
        0, name, total, free, cap, driver)
    # the table agrees with what the driver reported
    assert compute_cap_from_name(g.name) == g.compute_cap


def test_parse_multi_gpu_host_keeps_every_gpu_in_index_order():
    found = gpus("multi-a10.csv")
    assert [g.index for g in found] == [0, 1, 2]
    assert [g.uuid for g in found] == ["GPU-749a4951-86af-0c5a-2a58-67aa5ebf9d4e",
                                       "GPU-b1ff00c5-3253-827e-131a-a988b71d5e7b",
                                       "GPU-a5904136-81da-63b3-1993-e9cfd33fd399"]
    assert [g.memory_free_mib for g in found] == [21829, 22511, 22511]
    assert parse_gpus(list(reversed((DATA / "multi-a10.csv").read_text().splitlines()))) == found


def test_parse_old_driver_fallback_has_no_compute_cap():
    found = gpus("old-driver-450-fallback.csv")
    assert [(g.name, g.memory_total_mib, g.memory_free_mib, g.compute_cap, g.driver) for g in found] == [
        ("A100-SXM-80GB", 81252, 47535, None, "450.191.01"),
        ("A100-SXM-80GB", 81252, 47557, None, "450.191.01"),
    ]
    # the name table still gives the build its architecture
    assert cuda_architectures(found) == "80"


def test_parse_skips_what_is_not_a_gpu_row():
    lines = [(DATA / "old-driver-470-refuses-compute-cap.txt").read_text().strip(),
             "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.", ""]
    assert parse_gpus(lines) == []
    assert NvidiaGpus.default() == []


def test_parse_unified_memory_gpu_reports_no_memory():
    # nvidia-smi prints [N/A] for every framebuffer field on GB10 (XuehaiPan/nvitop PR #208)
    (g,) = parse_gpus(["0, NVIDIA GB10, GPU-00000000-0000-0000-0000-000000000000, [N/A], [N/A], 12.1, 580.173.02"])
    assert (g.memory_total_mib, g.memory_free_mib, g.compute_cap) == (None, None, "12.1")


def _fake(tmp_path: Path, name: str, script: str) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bindir


def _run_fact_command(command: str, bindir: Path | None) -> tuple[int, list[str]]:
    """Run a fact's shell command the way pyinfra does (``sh -c``) with a controlled PATH."""
    path = (f"{bindir}:" if bindir else "") + "/usr/bin:/bin"
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env={**os.environ, "PATH": path},
                          timeout=LOCAL_TIMEOUT)
    return proc.returncode, proc.stdout.splitlines()


def test_fact_command_falls_back_in_one_read_on_a_driver_without_compute_cap(tmp_path):
    refused = DATA / "old-driver-470-refuses-compute-cap.txt"
    fallback = DATA / "old-driver-450-fallback.csv"
    bindir = _fake(tmp_path, "nvidia-smi", (
        f'case "$*" in *compute_cap*) cat "{refused}"; exit 2;; esac\n'
        f'case "$*" in *index,name,uuid,memory.total,memory.free,driver_version*) cat "{fallback}";; esac\n'))
    rc, out = _run_fact_command(NvidiaGpus().command(), bindir)
    assert rc == 0
    assert NvidiaGpus().process(out) == gpus("old-driver-450-fallback.csv")


def test_fact_command_on_a_current_driver_and_on_a_host_without_nvidia_smi(tmp_path):
    h100 = DATA / "h100.csv"
    bindir = _fake(tmp_path, "nvidia-smi", (
        'case "$*" in *index,name,uuid,memory.total,memory.free,compute_cap,driver_version*) '
        f'cat "{h100}";; *) exit 9;; esac\n'))
    rc, out = _run_fact_command(NvidiaGpus().command(), bindir)
    assert rc == 0 and NvidiaGpus().process(out) == gpus("h100.csv")
    # a CPU host: nothing printed, pyinfra then returns default() == []
    assert _run_fact_command(NvidiaGpus().command(), None) == (0, [])


def test_fact_command_with_a_driver_that_is_not_loaded_is_no_gpu_not_a_failure(tmp_path):
    bindir = _fake(tmp_path, "nvidia-smi", (
        "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9\n"))
    rc, out = _run_fact_command(NvidiaGpus().command(), bindir)
    assert rc == 0 and out and NvidiaGpus().process(out) == []


# --- facts: nvcc ------------------------------------------------------------------------------


def test_parse_nvcc_release():
    assert parse_nvcc((DATA / "nvcc-12.5.txt").read_text().splitlines()) == "12.5"
    assert parse_nvcc((DATA / "nvcc-13.0-this-machine.txt").read_text().splitlines()) == "13.0"
    assert parse_nvcc(["sh: 1: nvcc: not found"]) is None
    assert CudaToolkit.default() is None


def test_cuda_toolkit_command_finds_nvcc_in_path(tmp_path):
    bindir = _fake(tmp_path, "nvcc", f'cat "{DATA / "nvcc-12.5.txt"}"\n')
    rc, out = _run_fact_command(CudaToolkit().command(), bindir)
    assert rc == 0 and CudaToolkit().process(out) == "12.5"


# --- compute capability and CUDA build ---------------------------------------------------------


@pytest.mark.parametrize(("name", "cap"), [
    ("NVIDIA H100 80GB HBM3", "9.0"), ("NVIDIA H100 NVL", "9.0"), ("NVIDIA H200", "9.0"),
    ("NVIDIA A100-SXM4-80GB", "8.0"), ("A100-SXM-80GB", "8.0"), ("NVIDIA A30", "8.0"),
    ("NVIDIA A10", "8.6"), ("NVIDIA A10G", "8.6"), ("NVIDIA L4", "8.9"), ("NVIDIA L40", "8.9"),
    ("NVIDIA L40S", "8.9"), ("Tesla T4", "7.5"), ("Tesla V100-PCIE-16GB", "7.0"),
    ("Tesla P100-PCIE-16GB", "6.0"), ("Tesla P40", "6.1"),
    ("NVIDIA GeForce RTX 4090", "8.9"), ("NVIDIA GeForce RTX 4090 D", "8.9"),
    ("NVIDIA GeForce RTX 4080 SUPER", "8.9"), ("NVIDIA GeForce RTX 4070 Ti", "8.9"),
    ("NVIDIA GeForce RTX 3090", "8.6"), ("NVIDIA GeForce RTX 3080 Ti", "8.6"),
    ("NVIDIA RTX A6000", "8.6"), ("NVIDIA RTX 6000 Ada Generation", "8.9"), ("Quadro RTX 6000", "7.5"),
    ("NVIDIA RTX 5880 Ada Generation", "8.9"), ("NVIDIA TITAN V", "7.0"),
    ("GeForce GTX 1080", "6.1"), ("NVIDIA GeForce GTX 1080 Ti", "6.1"), ("NVIDIA GeForce RTX 5090", "12.0"),
])
def test_compute_cap_from_name(name, cap):
    assert compute_cap_from_name(name) == cap


@pytest.mark.parametrize("name", ["NVIDIA RTX 6000D", "Matrox G200eW", "NVIDIA Graphics Device", ""])
def test_compute_cap_from_unknown_name_is_none(name):
    assert compute_cap_from_name(name) is None


def test_cuda_architectures_from_recorded_hosts():
    assert cuda_architectures(gpus("h100.csv")) == "90"
    assert cuda_architectures(gpus("rtx4090.csv")) == "89"
    assert cuda_architectures(gpus("t4.csv")) == "75"
    assert cuda_architectures(gpus("multi-a10.csv")) == "86"  # several GPUs, one architecture
    assert cuda_architectures(gpus("a100.csv") + gpus("rtx4090.csv")) == "80;89"


def test_cuda_architectures_of_a_real_mixed_host():
    # a real --query-gpu paste with compute_cap (TITAN V + RTX 5880 Ada); other columns not needed
    with (DATA / "titanv-rtx5880-query-with-header.csv").open() as f:
        rows = list(csv.DictReader(f, skipinitialspace=True))
    mixed = [Gpu(int(r["index"]), r["name"], "", None, None, r["compute_cap"], r["driver_version"]) for r in rows]
    assert cuda_architectures(mixed) == "70;89"


def test_cuda_architectures_sort_numerically_and_refuse_unknown():
    blackwell = Gpu(1, "NVIDIA GeForce RTX 5090", "u", 32607, 32000, "12.0", "580.65.06")
    assert cuda_architectures(gpus("h100.csv") + [blackwell]) == "90;120"
    unknown = Gpu(0, "NVIDIA Graphics Device", "u", 1, 1, None, "470.82.01")
    with pytest.raises(GpuError, match=r"compute capability of GPU 0 \(NVIDIA Graphics Device, driver 470.82.01\)"):
        cuda_architectures([unknown])
    with pytest.raises(GpuError, match="no NVIDIA GPU"):
        cuda_architectures([])


def test_cuda_cmake_args():
    args = cuda_cmake_args(gpus("rtx4090.csv"), "12.8")
    assert args == {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "89"}
    assert "GGML_CUDA_F16" not in args and "GGML_NATIVE" not in args
    assert cuda_cmake_args(gpus("t4.csv"), "13.0")["CMAKE_CUDA_ARCHITECTURES"] == "75"
    with pytest.raises(GpuError, match=r"CUDA 11.7 cannot compile for sm_90: needs CUDA >= 11.8"):
        cuda_cmake_args(gpus("h100.csv"), "11.7")
    v100 = Gpu(0, "Tesla V100-PCIE-16GB", "u", 16384, 16000, "7.0", "535.86.10")
    with pytest.raises(GpuError, match="sm_70"):
        cuda_cmake_args([v100], "13.0")
    assert cuda_cmake_args([v100], "12.8")["CMAKE_CUDA_ARCHITECTURES"] == "70"


def test_cuda_release_kind_keys_cuda_version_and_architectures():
    archs = cuda_architectures(gpus("a100.csv") + gpus("rtx4090.csv"))
    assert cuda_release_kind("12.8", archs) == "cuda12.8-sm80_89"
    assert cuda_release_kind("12.8.1", ["89", "80", "89"]) == "cuda12.8-sm80_89"
    assert cuda_release_kind("13.0", "90") != cuda_release_kind("12.8", "90")
    with pytest.raises(GpuError):
        cuda_release_kind("12", "89")
    with pytest.raises(GpuError):
        cuda_release_kind("12.8", "89; rm -rf /")


# --- driver -----------------------------------------------------------------------------------


def test_min_driver_for_cuda():
    assert min_driver_for_cuda("12.4") == "525.60.13"
    assert min_driver_for_cuda("12.8") == "525.60.13"
    assert min_driver_for_cuda("11.8") == "450.80.02"
    assert min_driver_for_cuda("13.0") == "580"
    with pytest.raises(GpuError, match="CUDA 10.2"):
        min_driver_for_cuda("10.2")


def test_check_driver_refuses_with_the_numbers():
    with pytest.raises(GpuError) as e:
        check_driver("470.82", "12.4")
    assert str(e.value) == "driver 470.82 is older than CUDA 12.4 needs (>= 525.60.13)"
    with pytest.raises(GpuError, match=r"driver 525.60.12 is older than CUDA 12.8 needs \(>= 525.60.13\)"):
        check_driver("525.60.12", "12.8")
    with pytest.raises(GpuError, match=r">= 580"):
        check_driver("575.57.08", "13.0")
    (old,) = gpus("old-driver-450-fallback.csv")[:1]
    with pytest.raises(GpuError, match="driver 450.191.01"):
        check_driver(old.driver, "12.8")
    check_driver(old.driver, "11.8")
    check_driver("525.60.13", "12.8")
    for f in ("h100.csv", "a100.csv", "l4.csv", "t4.csv", "rtx4090.csv", "multi-a10.csv"):
        check_driver(gpus(f)[0].driver, "12.8")
    check_driver(gpus("a100.csv")[0].driver, "13.0")


# --- llama-fit-params -------------------------------------------------------------------------


def planned(**server) -> list[str]:
    c = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"api_key": "x" * 16, **server}})
    plan = MemoryPlan(8192, 4, 1 << 33, 1, 1, 1, swa_full=True, load_mode="mmap", cache_ram_mib=2048)
    return server_args(c, CpuInfo(8, 4, 1, 1), plan, "/srv/m.gguf", "m")


def test_fit_params_command_passes_only_what_the_tool_accepts():
    cmd = fit_params_command("/opt/llama/bin/llama-fit-params", "/srv/m.gguf", planned(), 1024)
    assert cmd == ["/opt/llama/bin/llama-fit-params", "--model", "/srv/m.gguf", "--ctx-size", "8192",
                   "--parallel", "4", "--swa-full", "--load-mode", "mmap", "--fit-target", "1024"]
    # server-only flags would make it exit 1 with "error: invalid argument"; a set -ngl makes the fit abort
    for dropped in ("--host", "--port", "--alias", "--kv-unified", "--cache-ram", "--metrics", "--api-key-file",
                    "--n-gpu-layers"):
        assert dropped not in cmd
    assert "--fit-target" not in fit_params_command("llama-fit-params", "/m.gguf", planned(), None)


def test_fit_params_command_keeps_split_options_and_refuses_what_aborts_the_fit():
    multi = planned() + ["--split-mode", "layer", "--main-gpu", "1", "-dev", "CUDA0,CUDA1", "-ctk", "q8_0"]
    cmd = fit_params_command("llama-fit-params", "/m.gguf", multi, 512)
    assert cmd[-10:] == ["--split-mode", "layer", "--main-gpu", "1", "-dev", "CUDA0,CUDA1", "-ctk", "q8_0",
                         "--fit-target", "512"]
    assert fit_blockers(multi) == []
    for extra, blocker in ((["-ts", "3,1"], "--tensor-split"), (["--override-tensor", "exps=CPU"], "--override-tensor"),
                           (["-cmoe"], "--cpu-moe"), (["-sm", "row"], "--split-mode row")):
        assert fit_blockers(planned() + extra) == [blocker]
        with pytest.raises(GpuError, match=f"aborts when {blocker}"):
            fit_params_command("llama-fit-params", "/m.gguf", planned() + extra, 1024)


#: Real output of llama-fit-params (an RTX 4090, a 30B MoE model in F16), from
#: tools/fit-params/README.md of the b11434 tree: stderr and stdout as the terminal showed them.
#: This older build printed the -ot list unquoted.
README_RUN = r"""ggml_cuda_init: found 1 CUDA devices:
  Device 0: NVIDIA GeForce RTX 4090, compute capability 8.9, VMM: yes
llama_params_fit_impl: projected to use 61807 MiB of device memory vs. 24077 MiB of free device memory
llama_params_fit_impl: cannot fulfill margin of 1024 MiB, need to reduce device memory by 42444 MiB
llama_params_fit_impl: context size reduced from 40960 to 4096 -> need 3456 MiB less memory in total
llama_params_fit: successfully fit params to free device memory
Printing fitted CLI arguments to stdout...
-c 4096 -ngl 48 -ot """ + ",".join(rf"blk\.{i}\.ffn_(up|down|gate)_(ch|)exps=CPU" for i in range(14, 48)) + "\n"


def test_parse_fit_params_of_the_recorded_run():
    fitted = parse_fit_params(README_RUN)
    assert fitted["-c"] == "4096" and fitted["-ngl"] == "48" and "-ts" not in fitted
    overrides = fitted["-ot"].split(",")
    assert len(overrides) == 34
    assert overrides[0] == r"blk\.14\.ffn_(up|down|gate)_(ch|)exps=CPU"


def test_parse_fit_params_b11434_format():
    # b11434 prints the -ot list in double quotes and -ts for several devices
    # (tools/fit-params/fit-params.cpp:45-69); this line follows those printf formats.
    line = r'-c 8192 -ngl 49 -ts 20,29 -ot "blk\.30\.ffn_(gate|gate_up|down).*=CUDA1,blk\.31\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU"'
    assert parse_fit_params("llama_params_fit: successfully fit params to free device memory\n" + line + "\n") == {
        "-c": "8192", "-ngl": "49", "-ts": "20,29",
        "-ot": r"blk\.30\.ffn_(gate|gate_up|down).*=CUDA1,blk\.31\.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU"}
    # nothing to change: -ngl stays at its default -1
    assert parse_fit_params("-c 8192 -ngl -1\n") == {"-c": "8192", "-ngl": "-1"}


def test_parse_fit_params_without_a_result_is_an_error():
    failed = ("llama_params_fit: failed to fit params to free device memory: n_gpu_layers already set by user to 0, abort\n"
              "llama_fit_params: failed to fit CLI arguments to free memory, exiting...\n")
    with pytest.raises(GpuError, match="no fitted arguments"):
        parse_fit_params(failed)
    with pytest.raises(GpuError):
        parse_fit_params("")


def _value(args: list[str], opt: str) -> str:
    assert args.count(opt) == 1, (opt, args)
    return args[args.index(opt) + 1]


def test_pinned_args_pin_the_fit():
    args = pinned_args(planned(), parse_fit_params(README_RUN), None)
    assert _value(args, "--ctx-size") == "4096"
    assert _value(args, "--n-gpu-layers") == "48"
    assert _value(args, "--override-tensor").startswith(r"blk\.14\.")
    assert args[-2:] == ["--fit", "off"]
    # the rest of the plan is untouched
    assert _value(args, "--host") == "0.0.0.0" and _value(args, "--api-key-file") == "/etc/llama-server/api-key"
    assert "--kv-unified" in args


def test_pinned_args_nothing_to_change_means_all_layers():
    args = pinned_args(planned(), {"-c": "8192", "-ngl": "-1"}, None)
    assert _value(args, "--n-gpu-layers") == "all" and "--override-tensor" not in args


def test_pinned_args_explicit_gpu_layers_win():
    args = pinned_args(planned(), parse_fit_params(README_RUN), 20)
    assert _value(args, "--n-gpu-layers") == "20"
    assert _value(args, "--ctx-size") == "8192"  # the plan's, not the fit's
    assert "--override-tensor" not in args
    assert _value(pinned_args(planned(), None, "all"), "--n-gpu-layers") == "all"
    with pytest.raises(GpuError):
        pinned_args(planned(), None, None)


def test_pinned_args_multi_gpu_split_passes_through():
    multi = planned() + ["--split-mode", "layer", "--main-gpu", "1", "--device", "CUDA0,CUDA1"]
    args = pinned_args(multi, {"-c": "8192", "-ngl": "49", "-ts": "20,29"}, None)
    assert _value(args, "--tensor-split") == "20,29"
    assert (_value(args, "--split-mode"), _value(args, "--main-gpu"), _value(args, "--device")) == (
        "layer", "1", "CUDA0,CUDA1")
    # a user's fixed split with explicit layers stays as given
    fixed = pinned_args(planned() + ["-ts", "3,1"], None, 99)
    assert _value(fixed, "-ts") == "3,1" and _value(fixed, "--n-gpu-layers") == "99"
    # a user's own --fit choice is kept
    assert "off" not in pinned_args(planned() + ["--fit", "on"], {"-c": "1", "-ngl": "2"}, None)[-2:]


# --- preflight --------------------------------------------------------------------------------


def test_preflight_refuses_all_layers_that_cannot_fit_with_numbers():
    a10s = gpus("multi-a10.csv")  # 21829 + 22511 + 22511 = 66851 MiB free
    preflight_gpu(60 * GIB, 2 * GIB, a10s, 1024)  # 63488 MiB <= 66851 - 3 * 1024 = 63779
    with pytest.raises(GpuError) as e:
        preflight_gpu(62 * GIB, 2 * GIB, a10s, 1024)
    msg = str(e.value)
    for number in ("65536 MiB", "63488 MiB", "2048 MiB", "66851 MiB free", "63779 MiB", "1024 MiB"):
        assert number in msg, (number, msg)


def test_preflight_leaves_partial_offload_to_the_fit():
    (t4,) = gpus("t4.csv")
    preflight_gpu(70 * GIB, 8 * GIB, [t4], 1024, gpu_layers="auto")
    preflight_gpu(70 * GIB, 8 * GIB, [t4], 1024, gpu_layers=20)
    with pytest.raises(GpuError, match="15360 MiB free"):
        preflight_gpu(70 * GIB, 8 * GIB, [t4], 1024, gpu_layers="all")


def test_preflight_gpu_offload_without_a_gpu_and_unknown_memory():
    with pytest.raises(GpuError, match="no NVIDIA GPU"):
        preflight_gpu(1 * GIB, 0, [], 1024, gpu_layers=10)
    preflight_gpu(1 * GIB, 0, [], 1024, gpu_layers=0)
    preflight_gpu(1 * GIB, 0, [], 1024, gpu_layers="auto")
    gb10 = Gpu(0, "NVIDIA GB10", "u", None, None, "12.1", "580.173.02")
    preflight_gpu(500 * GIB, 0, [gb10], 1024)  # [N/A] memory: nothing to check against


# --- systemd ----------------------------------------------------------------------------------


def test_device_allow_lists_only_nvidia_devices():
    lines = device_allow(gpus("multi-a10.csv"))
    assert lines == [
        "DeviceAllow=/dev/nvidiactl rw", "DeviceAllow=/dev/nvidia-uvm rw", "DeviceAllow=/dev/nvidia-uvm-tools rw",
        "DeviceAllow=/dev/nvidia-modeset rw",
        "DeviceAllow=/dev/nvidia0 rw", "DeviceAllow=/dev/nvidia1 rw", "DeviceAllow=/dev/nvidia2 rw",
    ]
    assert [line for line in device_allow(gpus("h100.csv")) if line.startswith("DeviceAllow=/dev/nvidia0")] == [
        "DeviceAllow=/dev/nvidia0 rw"]
    assert "DeviceAllow=/dev/nvidia1 rw" not in device_allow(gpus("h100.csv"))
    assert device_allow([]) == []


def test_fit_of_a_real_h200_run_pins_every_layer():
    """llama-fit-params on a real H200 (benchmarks/GPU.md), recorded with its command line: the
    model fits, the tool prints ``-ngl -1`` ("nothing to change"), which is pinned as ``all`` with
    the fit turned off, and the planned context is kept."""
    log = (DATA.parent / "fit-params" / "h200-gemma3-270m.log").read_text()
    command, _, rest = log.partition("\n--- stdout\n")
    stdout = rest.partition("--- stderr\n")[0]
    planned = ["--ctx-size", "32768", "--parallel", "8", "--swa-full", "--metrics", "--n-gpu-layers", "0"]
    assert command.split()[1:] == fit_params_command("llama-fit-params", command.split()[2], planned, 1024)[1:]
    fitted = parse_fit_params(stdout)
    assert fitted == {"-c": "32768", "-ngl": "-1"}
    assert pinned_args(planned, fitted, None) == ["--parallel", "8", "--swa-full", "--metrics", "--ctx-size", "32768",
                                                  "--n-gpu-layers", "all", "--fit", "off"]


# --- pinning at deploy time, installing -------------------------------------------------------


def test_fit_digest_follows_what_the_fit_depends_on_and_not_free_memory():
    from dataclasses import replace

    from llamadeploy.gpu import fit_inputs_digest

    (h200,) = gpus("h200-recorded.csv")
    cmd = ["llama-fit-params", "--model", "/m.gguf", "--ctx-size", "8192", "--fit-target", "1024"]
    base = fit_inputs_digest("b1-abc", "a" * 64, cmd, [h200])
    assert base == fit_inputs_digest("b1-abc", "a" * 64, cmd, [replace(h200, memory_free_mib=10)])
    assert base == fit_inputs_digest("b1-abc", "a" * 64, ["/other/path/llama-fit-params", *cmd[1:]], [h200])
    for changed in (fit_inputs_digest("b2-abc", "a" * 64, cmd, [h200]),
                    fit_inputs_digest("b1-abc", "b" * 64, cmd, [h200]),
                    fit_inputs_digest("b1-abc", "a" * 64, [*cmd[:4], "4096", *cmd[5:]], [h200]),
                    fit_inputs_digest("b1-abc", "a" * 64, cmd, [replace(h200, uuid="GPU-other")]),
                    fit_inputs_digest("b1-abc", "a" * 64, cmd, [h200, replace(h200, index=1, uuid="GPU-2")])):
        assert changed != base


def test_margin_is_lowered_by_what_the_running_server_holds():
    from llamadeploy.gpu import fit_margin, held_mib

    apps = "4980, 1480\n5001, 300\n"  # nvidia-smi --query-compute-apps=pid,used_memory (csv, noheader, nounits)
    assert held_mib(apps, 4980) == 1480 and held_mib(apps, 77) == 0 and held_mib(apps, None) == 0
    assert fit_margin(1024, 300) == 724 and fit_margin(1024, 1480) == 0 and fit_margin(1024, 0) == 1024


def _pin(tmp_path, fit_output: str, rc: int = 0, margin: int = 1024) -> tuple[int, str, str]:
    """Run gpu.fit_script with llama-fit-params replaced by a script printing ``fit_output``
    (recorded or made up) and exiting ``rc``; returns (exit status, env file text, stderr)."""
    import subprocess

    from llamadeploy.gpu import fit_script

    fake = tmp_path / "fit.sh"
    fake.write_text(f"#!/bin/sh\necho \"target=$2\" > {tmp_path}/target\ncat {tmp_path}/out\nexit {rc}\n")
    fake.chmod(0o755)
    (tmp_path / "out").write_text(fit_output)
    env = tmp_path / "gpu-fit" / "abc.env"
    script = fit_script([str(fake), "--fit-target", str(margin)], margin, "no-such-unit.service", str(env), "abc")
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=LOCAL_TIMEOUT)
    return proc.returncode, env.read_text() if env.exists() else "", proc.stderr


def test_pin_script_writes_the_fit_of_a_real_h200_run(tmp_path):
    log = (DATA.parent / "fit-params" / "h200-gemma3-270m.log").read_text()
    rc, text, err = _pin(tmp_path, log.partition("--- stdout\n")[2].replace("--- stderr\n", ""))
    assert rc == 0, err
    assert text.splitlines() == ["# inputs abc: llama-fit-params for this release, model, flags and GPUs (llamadeploy)",
                                 "LLAMA_GPU_FIT='-c 32768 -ngl all --fit off'"]
    assert (tmp_path / "target").read_text().strip() == "target=1024"  # nothing held: the whole margin
    assert not list((tmp_path / "gpu-fit").glob("*.partial"))


def test_pin_script_keeps_split_and_overrides_as_words(tmp_path):
    """systemd splits an unbraced ``$LLAMA_GPU_FIT`` like a command line (quotes and backslash
    escapes: src/core/execute.c replace_env_argv -> extract_first_word), which POSIX shlex does
    too: the words llama-server gets are the fitted ones, backslashes of ``-ot`` patterns kept."""
    import shlex

    ot = r"blk\.14\.ffn_(up|down|gate)_(ch|)exps=CPU,blk\.15\.ffn_up_exps=CPU"
    rc, text, err = _pin(tmp_path, f'some log line on stderr\n-c 4096 -ngl 48 -ts 20,28 -ot "{ot}"\n')
    assert rc == 0, err
    value = text.splitlines()[1].removeprefix("LLAMA_GPU_FIT=")
    assert value.startswith("'") and value.endswith("'")  # the env file keeps it literal
    assert shlex.split(value[1:-1]) == ["-c", "4096", "-ngl", "48", "-ts", "20,28", "-ot", ot, "--fit", "off"]


def test_pin_script_fails_the_host_and_writes_nothing_when_the_fit_fails(tmp_path):
    rc, text, err = _pin(tmp_path, "llama_fit_params: failed to fit params\n", rc=1)
    assert rc == 1 and text == "" and "the model cannot be fitted" in err and "failed to fit params" in err
    rc, text, err = _pin(tmp_path, "no fitted line at all\n", rc=0)
    assert rc == 1 and text == ""


@pytest.mark.parametrize(("source", "docker", "missing", "expected"), [
    ("distro", False, ("driver", "toolkit"),
     ["linux-headers-amd64", "nvidia-driver", "firmware-misc-nonfree", "nvidia-smi", "nvidia-modprobe",
      "nvidia-cuda-toolkit"]),
    ("distro", False, ("toolkit",), ["nvidia-cuda-toolkit"]),
    ("nvidia", False, ("driver", "toolkit"), ["cuda-drivers", "cuda-toolkit"]),
    ("nvidia", True, ("driver", "container_toolkit"), ["cuda-drivers", "nvidia-container-toolkit"]),
])
def test_install_brings_what_is_missing(source, docker, missing, expected):
    from llamadeploy.gpu import install_packages

    assert install_packages(source, docker, "driver" in missing, "toolkit" in missing,
                            "container_toolkit" in missing) == expected


def test_debian_has_no_container_toolkit():
    from llamadeploy.gpu import install_packages

    with pytest.raises(GpuError, match="Debian has no NVIDIA container toolkit"):
        install_packages("distro", True, False, False, True)


@pytest.mark.parametrize("major, arch, path", [
    (12, "x86_64", "debian12/x86_64"),
    (13, "x86_64", "debian13/x86_64"),
    (13, "aarch64", "debian13/sbsa"),
])
def test_nvidia_repository_follows_the_host_release(major, arch, path):
    """A trixie host gets NVIDIA's debian13 repository, never bookworm's (its packages link
    against bookworm's libraries)."""
    from llamadeploy.gpu import nvidia_repo

    assert nvidia_repo(major, arch) == f"https://developer.download.nvidia.com/compute/cuda/repos/{path}"


@pytest.mark.parametrize("release, codename, repo", [
    ("debian-12", "bookworm", "debian12/x86_64"),
    ("debian-13", "trixie", "debian13/x86_64"),
])
def test_the_package_source_follows_the_os_release_the_host_reports(release, codename, repo):
    """roles/gpu's choice, from the LinuxDistribution fact pyinfra makes of the sandbox trees'
    recorded os-release (tests/unit/data/os-release): "distro" adds Debian's contrib and
    non-free of the host's own codename, "nvidia" NVIDIA's repository of its major release,
    unless llama_gpu.nvidia_repo names another."""
    from llamadeploy.gpu import package_source
    from tests.unit.test_platforms import fact

    distro = fact(release)
    assert package_source("distro", distro, "x86_64") == \
        f"deb http://deb.debian.org/debian {codename} contrib non-free non-free-firmware\n"
    assert package_source("nvidia", distro, "x86_64") == f"https://developer.download.nvidia.com/compute/cuda/repos/{repo}"
    assert package_source("nvidia", distro, "x86_64", "https://mirror.example/cuda") == "https://mirror.example/cuda"


def _candidates(policy: str) -> dict[str, str]:
    """package -> candidate version, from recorded ``apt-cache policy`` output (packages apt does
    not know are missing from it)."""
    out, name = {}, None
    for line in policy.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            name = line[:-1]
        elif name and line.strip().startswith("Candidate:"):
            out[name] = line.split(":", 1)[1].strip()
    return out


@pytest.mark.parametrize("release, driver", [("bookworm", "535."), ("trixie", "550.")])
def test_distro_install_names_packages_each_release_has(release, driver):
    """``apt-cache policy`` recorded on each release with contrib, non-free and non-free-firmware
    on (tests/unit/data/apt-policy): every package "distro" installs has a candidate there, and
    Debian has no NVIDIA container toolkit on either (why docker mode needs "nvidia")."""
    from pathlib import Path

    from llamadeploy.gpu import install_packages

    policy = (Path(__file__).parent / "data" / "apt-policy" / f"{release}-nvidia.txt").read_text()
    candidates = _candidates(policy)
    for pkg in install_packages("distro", False, True, True, False):
        assert candidates.get(pkg, "(none)") != "(none)", (release, pkg)
    assert candidates["nvidia-driver"].startswith(driver)
    # asked for (the recorded command's names) and unknown to apt: not merely left out of the query
    queried = policy.splitlines()[0].removeprefix("# apt-cache policy ").split()
    for pkg in ("nvidia-container-toolkit", "libnvidia-container1", "libnvidia-container-tools"):
        assert pkg in queried and pkg not in candidates, (release, pkg)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb builds the test's .deb files (Debian)")
def test_packages_dir_debs_are_recorded_by_their_package_names(tmp_path, monkeypatch):
    """llama_gpu.packages_dir: the names come from the files' control data (not their file
    names), so the package record names what apt installs and uninstall purges it."""
    from pyinfra.api import DeployError

    import llamadeploy.roles.gpu as role
    from tests.conftest import stub_deb

    monkeypatch.setattr(role, "host", type("H", (), {"name": "g1"})())
    debs = [stub_deb(tmp_path, "nvidia-driver-stub"), stub_deb(tmp_path, "cuda-toolkit-stub")]
    renamed = debs[0].rename(tmp_path / "driver.deb")  # the file name is not the package's
    assert role.deb_names([renamed, debs[1]], "llama_gpu.packages_dir") == ["cuda-toolkit-stub", "nvidia-driver-stub"]
    junk = tmp_path / "notes.deb"
    junk.write_text("not an archive\n")
    with pytest.raises(DeployError, match=r"preflight refused host g1: llama_gpu.packages_dir: notes.deb is not a "
                                          r"Debian package with a name"):
        role.deb_names([debs[1], junk], "llama_gpu.packages_dir")
