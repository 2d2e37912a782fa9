"""Pure functions from config + host facts to llama-server's command line.

No I/O here: everything is a function of its arguments so that the choices can
be unit-tested for hosts we do not have (see ``tests/unit/test_tuning.py``).
Every explicit user setting wins over a computed value.
"""

from __future__ import annotations

from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuInfo


def threads(cfg: HostConfig, cpu: CpuInfo) -> int:
    """Generation threads: one per physical core.

    Token generation is memory-bandwidth bound; SMT siblings share a core's load
    units and only add contention, so physical cores is the right default.
    A CPU limit (``limits.cpus``) caps it: more threads than granted CPU time
    makes threads wait on each other at every barrier.
    """
    if cfg.server.threads:
        return cfg.server.threads
    n = cpu.physical
    if cfg.limits.cpus:
        n = min(n, max(1, int(cfg.limits.cpus)))
    return max(1, n)


def threads_batch(cfg: HostConfig, cpu: CpuInfo) -> int:
    """Prompt-processing threads: all logical CPUs (compute bound, SMT helps a little)."""
    if cfg.server.threads_batch:
        return cfg.server.threads_batch
    n = cpu.logical
    if cfg.limits.cpus:
        n = min(n, max(1, int(cfg.limits.cpus)))
    return max(1, n)


def server_args(cfg: HostConfig, cpu: CpuInfo) -> list[str]:
    """The full argument vector of llama-server (without the binary).

    The API key never appears here: it is passed as a path to a 0600 file.
    """
    s = cfg.server
    args = [
        "--host", s.host,
        "--port", str(s.port),
        "--model", cfg.model_path,
        "--alias", cfg.model.served_alias,
        "--threads", str(threads(cfg, cpu)),
        "--threads-batch", str(threads_batch(cfg, cpu)),
        "--ctx-size", str(s.ctx_size),
        "--parallel", str(s.parallel),
        "--n-gpu-layers", str(s.gpu_layers),
    ]
    # explicit either way: llama-server enables it only when -np is "auto"
    args.append("--kv-unified" if s.kv_unified else "--no-kv-unified")
    if not s.cont_batching:
        args.append("--no-cont-batching")
    if s.load_mode != "auto":
        args += ["--load-mode", s.load_mode]
    if s.metrics:
        args.append("--metrics")
    if s.api_key is not None:
        args += ["--api-key-file", cfg.api_key_path]
    return args + list(s.extra_args)


def unknown_flags(args: list[str], accepted: frozenset[str]) -> list[str]:
    """Flags in ``args`` that the installed binary's ``--help`` does not list."""
    return [a for a in args if a.startswith("-") and not a.lstrip("-").isdigit() and a.split("=")[0] not in accepted]


def systemd_quote(arg: str) -> str:
    """Quote one argument for an ExecStart= line (systemd.service(5), "Command lines")."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    if escaped and all(c.isalnum() or c in "-_./:=,+@" for c in escaped):
        return escaped
    return f'"{escaped}"'


def unit_limits(cfg: HostConfig) -> dict[str, str]:
    """systemd resource directives from ``limits``; empty values are left out."""
    lim = cfg.limits
    out: dict[str, str] = {"TasksMax": str(lim.tasks), "LimitMEMLOCK": lim.memlock}
    if lim.cpus:
        out["CPUQuota"] = f"{round(lim.cpus * 100)}%"
    if lim.memory:
        out["MemoryMax"] = lim.memory
        out["MemorySwapMax"] = "0"
    if lim.memory_reserved:
        out["MemoryLow"] = lim.memory_reserved
    return out
