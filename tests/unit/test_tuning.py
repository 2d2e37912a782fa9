"""Tuning: pure functions from config and CPU facts to flags and unit directives."""

from __future__ import annotations

from dataclasses import replace

from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuInfo
from llamadeploy.tuning import (
    MemoryPlan,
    server_args,
    systemd_quote,
    threads,
    threads_batch,
    unit_limits,
    unknown_flags,
)

SMT_16 = CpuInfo(logical=32, physical=16, sockets=1, numa_nodes=1)
SMALL = CpuInfo(logical=2, physical=2, sockets=1, numa_nodes=1)
PLAN = MemoryPlan(ctx_size=65536, parallel=8, limit=1 << 34, model_bytes=1, kv_bytes_per_token=1, overhead=1)


def cfg(**sections) -> HostConfig:
    sections["server"] = {"allow_unauthenticated": True, **sections.get("server", {})}  # tests of the open case
    return HostConfig.model_validate({"model": {"path": "/m/gemma.gguf", "alias": "g"}, **sections})


def test_threads_default_to_physical_cores_batch_to_logical():
    assert threads(cfg(), SMT_16) == 16
    assert threads_batch(cfg(), SMT_16) == 32


def test_cpu_limit_caps_threads():
    c = cfg(limits={"cpus": 4.0})
    assert threads(c, SMT_16) == 4 and threads_batch(c, SMT_16) == 4


def test_user_setting_wins():
    c = cfg(server={"threads": 3, "threads_batch": 5}, limits={"cpus": 2.0})
    assert threads(c, SMT_16) == 3 and threads_batch(c, SMT_16) == 5


def test_args_default():
    args = server_args(cfg(), SMALL, PLAN, "/var/lib/llama-server/models/gemma.gguf", "g")
    assert args == [
        "--host", "0.0.0.0", "--port", "8080",
        "--model", "/var/lib/llama-server/models/gemma.gguf", "--alias", "g",
        "--threads", "2", "--threads-batch", "2", "--ctx-size", "65536", "--parallel", "8",
        "--n-gpu-layers", "0", "--kv-unified", "--metrics",
    ]


def test_args_options_and_key_as_file_only():
    c = cfg(server={"api_key": "k" * 20, "cont_batching": False, "load_mode": "mlock", "metrics": False,
                    "kv_unified": False, "extra_args": ["--no-webui"]})
    # the plan carries the load mode (the user's, when set: see test_memory_plan.test_load_mode)
    args = server_args(c, SMALL, replace(PLAN, load_mode="mlock"), "/m.gguf", "g")
    assert "k" * 20 not in " ".join(args)
    assert args[args.index("--api-key-file") + 1] == "/etc/llama-server/api-key"
    assert args[args.index("--load-mode") + 1] == "mlock"
    assert "--no-cont-batching" in args and "--no-kv-unified" in args and "--metrics" not in args
    assert args[-1] == "--no-webui"


def test_swa_full_flag_follows_the_plan():
    assert "--swa-full" not in server_args(cfg(), SMALL, PLAN, "/m.gguf", "g")
    assert "--swa-full" in server_args(cfg(), SMALL, replace(PLAN, swa_full=True), "/m.gguf", "g")


def test_unknown_flags():
    known = frozenset({"--port", "--threads"})
    assert unknown_flags(["--port", "8080", "--mlock", "--threads", "-1"], known) == ["--mlock"]


def test_systemd_quote():
    assert systemd_quote("/opt/x/bin/llama-server") == "/opt/x/bin/llama-server"
    assert systemd_quote("a b") == '"a b"'
    assert systemd_quote("100%") == '"100%%"'
    assert systemd_quote("$HOME") == '"$$HOME"'
    assert systemd_quote('say "hi"') == '"say \\"hi\\""'


def test_unit_limits_user_example():
    c = cfg(limits={"cpus": 4.0, "memory": "8G", "memory_reserved": "4G"})
    assert unit_limits(c) == {
        "TasksMax": "4096", "LimitMEMLOCK": "infinity", "CPUQuota": "400%",
        "MemoryMax": "8G", "MemorySwapMax": "0", "MemoryLow": "4G",
    }
    assert unit_limits(cfg()) == {"TasksMax": "4096", "LimitMEMLOCK": "infinity"}


def test_threads_of_one_node_when_pinned():
    """2 sockets x 16 cores x 2 SMT: distribute uses all 32 cores, isolate one node's 16."""
    two_nodes = CpuInfo(logical=64, physical=32, sockets=2, numa_nodes=2)
    assert (threads(cfg(), two_nodes), threads_batch(cfg(), two_nodes)) == (32, 64)
    pinned = cfg(server={"numa": "isolate"})
    assert (threads(pinned, two_nodes), threads_batch(pinned, two_nodes)) == (16, 32)
    assert threads(cfg(server={"numa": "numactl"}), two_nodes) == 16
    assert threads(cfg(server={"numa": "isolate", "threads": 24}), two_nodes) == 24


def test_numa_policy():
    from llamadeploy.tuning import numa_policy

    two_nodes = CpuInfo(logical=64, physical=32, sockets=2, numa_nodes=2)
    assert numa_policy(cfg(), two_nodes) == "distribute"
    assert numa_policy(cfg(), SMALL) is None
    assert numa_policy(cfg(server={"numa": "off"}), two_nodes) is None
    assert numa_policy(cfg(server={"numa": "isolate"}), SMALL) == "isolate"
    args = server_args(cfg(), two_nodes, PLAN, "/m.gguf", "g")
    assert args[args.index("--numa") + 1] == "distribute"


def test_no_repack_on_amx_cpus_unless_asked():
    """AMX CPUs get --no-repack (b11434's AMX kernels crashed the server); others keep the default."""
    from llamadeploy.tuning import MemoryPlan, server_args

    plan = MemoryPlan(4096, 4, 1 << 30, 1, 1, 1)
    amx = CpuInfo(8, 4, 1, 1, frozenset({"avx512f", "amx_int8", "amx_tile"}))
    plain = CpuInfo(8, 4, 1, 1, frozenset({"avx2"}))
    cfg = HostConfig.model_validate({"model": {"path": "/m.gguf"}, "server": {"allow_unauthenticated": True}})
    assert "--no-repack" in server_args(cfg, amx, plan, "/m.gguf", "m")
    assert "--no-repack" not in server_args(cfg, plain, plan, "/m.gguf", "m")
    forced = HostConfig.model_validate({"model": {"path": "/m.gguf"},
                                        "server": {"repack": True, "allow_unauthenticated": True}})
    assert "--no-repack" not in server_args(forced, amx, plan, "/m.gguf", "m")
