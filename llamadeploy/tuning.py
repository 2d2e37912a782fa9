"""Pure functions from config + host facts to llama-server's command line.

No I/O here: everything is a function of its arguments so that the choices can
be unit-tested for hosts we do not have (see ``tests/unit/test_tuning.py``).
Every explicit user setting wins over a computed value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from llamadeploy.chat_template import builtin_template_for
from llamadeploy.chat_template import server_args as template_args
from llamadeploy.config import HostConfig, parse_size
from llamadeploy.facts import CpuInfo
from llamadeploy.gguf_meta import ModelMeta

if TYPE_CHECKING:
    from llamadeploy.roles.rpc.plan import RpcSplit


def threads(cfg: HostConfig, cpu: CpuInfo) -> int:
    """Generation threads: one per physical core (of one NUMA node when pinned to it).

    Token generation is memory-bandwidth bound; SMT siblings share a core's load
    units and only add contention, so physical cores is the right default.
    With ``numa: isolate``/``numactl`` the process runs on one node, and threads
    beyond that node's cores would only time-share them.
    A CPU limit (``limits.cpus``) caps it: more threads than granted CPU time
    makes threads wait on each other at every barrier.
    """
    return cfg.server.threads or _capped(_per_node(cpu.physical, cfg, cpu), cfg)


def threads_batch(cfg: HostConfig, cpu: CpuInfo) -> int:
    """Prompt-processing threads: all logical CPUs (compute bound, SMT helps a little),
    of one NUMA node when pinned to it."""
    return cfg.server.threads_batch or _capped(_per_node(cpu.logical, cfg, cpu), cfg)


def _per_node(n: int, cfg: HostConfig, cpu: CpuInfo) -> int:
    """``n`` CPUs of the whole host, or of one node when the NUMA policy pins to one."""
    pinned = numa_policy(cfg, cpu) in ("isolate", "numactl")
    return n // max(1, cpu.numa_nodes) if pinned else n


def _capped(n: int, cfg: HostConfig) -> int:
    """At most the CPUs the limit grants (at least one)."""
    if cfg.limits.cpus:
        n = min(n, int(cfg.limits.cpus))
    return max(1, n)


def server_args(
    cfg: HostConfig, cpu: CpuInfo, plan: MemoryPlan, model_path: str, alias: str,
    bind: tuple[str, int] | None = None, key_path: str | None = None,
) -> list[str]:
    """The full argument vector of llama-server (without the binary).

    ``plan`` carries context size and slots (see :func:`plan_memory`). The API key
    never appears here: it is passed as a path to a 0600 file.
    """
    s = cfg.server
    host, port = bind or (s.host, s.port)
    args = [
        "--host", host,
        "--port", str(port),
        "--model", model_path,
        "--alias", alias,
        "--threads", str(threads(cfg, cpu)),
        "--threads-batch", str(threads_batch(cfg, cpu)),
        "--ctx-size", str(plan.ctx_size),
        "--parallel", str(plan.parallel),
    ]
    if plan.rpc:
        args += plan.rpc.args()
    elif not (cfg.cuda and s.gpu_layers == 0):
        args += ["--n-gpu-layers", str(s.gpu_layers)]
    # (a CUDA host with gpu_layers 0: native pins llama-fit-params' result from the unit's environment
    # file, roles/gpu; docker leaves it to llama-server's own fit at every start, -ngl auto -fit on)
    # explicit either way: llama-server enables it only when -np is "auto"
    args.append("--kv-unified" if s.kv_unified else "--no-kv-unified")
    if plan.swa_full:
        args.append("--swa-full")
    if not s.cont_batching:
        args.append("--no-cont-batching")
    if plan.load_mode:
        args += ["--load-mode", plan.load_mode]
    if not repack(cfg, cpu):
        args.append("--no-repack")
    policy = numa_policy(cfg, cpu)
    if policy:
        args += ["--numa", policy]
    args += template_args(plan.chat_template)
    if plan.cache_ram_mib is not None:
        args += ["--cache-ram", str(plan.cache_ram_mib)]
    if s.metrics:
        args.append("--metrics")
    if s.api_key is not None:
        args += ["--api-key-file", key_path or cfg.api_key_path]
    return args + list(s.extra_args)


#: /proc/cpuinfo flag of the AMX int8 unit that ggml's AMX backend (an extra buffer type) uses
AMX_FLAG = "amx_int8"


def repack(cfg: HostConfig, cpu: CpuInfo) -> bool:
    """Let llama-server repack weights into CPU-specific layouts, unless the CPU has AMX.

    A ``GGML_NATIVE`` build on an AMX CPU (Sapphire Rapids and later) compiles ggml's AMX
    kernels in, and with repacking on (llama-server's default) the weights go to the AMX
    buffer type. On b11434 that crashed the server with SIGSEGV in
    ``ggml_backend_amx_mul_mat`` at the first batch on this project's CI machines
    (Xeon with amx_int8/amx_tile, under a VM); ``--no-repack`` turns off every extra
    buffer type, AMX included, and the same binary serves. The user's ``repack`` wins.
    """
    if cfg.server.repack is not None:
        return cfg.server.repack
    return AMX_FLAG not in cpu.flags


def numa_policy(cfg: HostConfig, cpu: CpuInfo) -> str | None:
    """Spread threads and memory over all nodes on multi-socket/NUMA hosts (llama.cpp's advice);
    single-node hosts get no flag."""
    mode = cfg.server.numa
    if mode == "auto":
        return "distribute" if cpu.numa_nodes > 1 else None
    return None if mode == "off" else mode


def flag_names(args: list[str]) -> list[str]:
    """The options in an argument vector (``-1`` is a value, ``--x=1`` is ``--x``)."""
    return [a.split("=")[0] for a in args if a.startswith("-") and not a.lstrip("-").isdigit()]


def unknown_flags(args: list[str], accepted: frozenset[str]) -> list[str]:
    """Flags in ``args`` that the installed binary's ``--help`` does not list."""
    return [f for f in flag_names(args) if f not in accepted]


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


# --- memory: slots and context that fit -------------------------------------

MIB = 1 << 20
#: bytes per element of the KV cache types we size for (llama.cpp default: f16)
KV_TYPE_BYTES = {"f16": 2.0, "bf16": 2.0, "f32": 4.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
DEFAULT_PARALLEL = 8
MIN_SLOT_CTX = 512
MAX_SLOT_CTX = 8192


class PreflightError(Exception):
    """The host cannot hold the model plus a minimal KV cache; the message has the numbers."""


@dataclass(frozen=True)
class MemoryPlan:
    ctx_size: int
    parallel: int
    limit: int
    model_bytes: int
    kv_bytes_per_token: int
    overhead: int
    #: ``--swa-full``: the model has sliding-window layers and prefix reuse needs them full-size
    swa_full: bool = False
    #: ``--load-mode`` value, None = leave it to llama-server (see :func:`load_mode`)
    load_mode: str | None = None
    #: built-in ``--chat-template`` (with ``--no-jinja``), None = the model's own (see :func:`chat_template`)
    chat_template: str | None = None
    #: ``--cache-ram`` in MiB (see :func:`cache_ram_mib`); None = leave llama-server's default
    cache_ram_mib: int | None = None
    #: an RPC head's split over its workers (``roles/rpc/plan.py``); None = all on this host
    rpc: RpcSplit | None = None

    @property
    def kv_bytes(self) -> int:
        return self.ctx_size * self.kv_bytes_per_token

    @property
    def total(self) -> int:
        return self.model_bytes + self.kv_bytes + self.overhead


def kv_bytes_per_token(meta: ModelMeta, cache_type: str = "f16") -> int:
    """K and V for every layer and KV head, one token (sliding-window savings ignored: a safe upper bound)."""
    return math.ceil(meta.n_layers * meta.n_head_kv * (meta.key_length + meta.value_length) * KV_TYPE_BYTES[cache_type])


def overhead_bytes(meta: ModelMeta) -> int:
    """Compute buffers, the HTTP server and allocator slack: 384 MiB plus 10% of the weights."""
    return 384 * MIB + meta.file_size // 10


def memory_limit(cfg: HostConfig, host_memory_bytes: int) -> int:
    """What the service may use: the unit's MemoryMax when set, never more than the host has."""
    if cfg.limits.memory:
        return min(parse_size(cfg.limits.memory), host_memory_bytes)
    return host_memory_bytes


def default_parallel(cpu: CpuInfo) -> int:
    """Slots: 8 (llama-server's "auto" gives 4 and 8 concurrent clients then queue),
    more on big hosts: one per two physical cores, at most 64."""
    return max(DEFAULT_PARALLEL, min(64, cpu.physical // 2))


def plan_memory(cfg: HostConfig, meta: ModelMeta, host_memory_bytes: int, cpu: CpuInfo,
                memlock_ceiling: int | None = None, workers_memory: int = 0) -> MemoryPlan:
    """Slots and total context so that weights + KV cache + overhead fit the memory limit.

    Start from :func:`default_parallel` slots of min(training context, 8192)
    tokens each in one unified KV cache; while that does not fit, halve the
    per-slot context (down to 512), then halve the slots. A user's ``ctx_size``
    and ``parallel`` are kept as given but must fit. Raises
    :class:`PreflightError` with the numbers and a setting that would fit.
    ``memlock_ceiling`` is the most the host's systemd can let a service lock
    (see ``facts.HostMemory``); None = no ceiling. ``workers_memory``: what an RPC head's
    workers add for weights and KV cache (``roles/rpc/plan.group_budget``).
    """
    limit = memory_limit(cfg, host_memory_bytes) + workers_memory
    per_token = kv_bytes_per_token(meta)
    overhead = overhead_bytes(meta)
    budget = limit - meta.file_size - overhead
    s = cfg.server

    if s.load_mode and "mlock" in s.load_mode:
        why = _cannot_lock(cfg, meta, memlock_ceiling)
        if why:
            raise PreflightError(f"load_mode {s.load_mode!r} locks {_mib(meta.file_size)} of weights but {why}")

    parallels = [s.parallel] if s.parallel else []
    if not parallels:
        p = default_parallel(cpu)
        while p >= 1:
            parallels.append(p)
            p //= 2
    candidates: list[tuple[int, int]] = []
    for parallel in parallels:
        if s.ctx_size is not None:
            candidates.append((s.ctx_size, parallel))
            continue
        slot = min(meta.n_ctx_train, MAX_SLOT_CTX)
        while slot >= MIN_SLOT_CTX:
            candidates.append((slot * parallel, parallel))
            slot //= 2
    for ctx, parallel in candidates:
        if ctx * per_token <= budget:
            plan = MemoryPlan(ctx, parallel, limit, meta.file_size, per_token, overhead, swa_full(cfg, meta),
                              chat_template=chat_template(cfg, meta))
            return replace(plan, load_mode=load_mode(cfg, meta, plan.total, host_memory_bytes, memlock_ceiling),
                           cache_ram_mib=cache_ram_mib(cfg, plan))

    ctx, parallel = candidates[-1]
    need = meta.file_size + overhead + ctx * per_token
    fits = max(0, budget) // per_token
    raise PreflightError(
        f"model {_mib(meta.file_size)} + overhead {_mib(overhead)} + KV cache "
        f"{_mib(ctx * per_token)} ({per_token} bytes/token x ctx {ctx}, {parallel} slot(s)) "
        f"= {_mib(need)} does not fit the memory limit of {_mib(limit)}"
        + (f" (this host's and its RPC workers' {_mib(workers_memory)})" if workers_memory else "")
        + "; would fit: "
        + (f"llama_server.ctx_size <= {fits}, or " if fits >= MIN_SLOT_CTX else "")
        + f"llama_limits.memory >= {math.ceil(need / MIB)}M"
    )


#: llama-server's own ``--cache-ram`` default (b11434), the most the tuning gives the prompt cache
DEFAULT_CACHE_RAM_MIB = 8192
#: below this a prompt cache holds too few prompts to be worth its copies: turned off
MIN_CACHE_RAM_MIB = 64


def cache_ram_mib(cfg: HostConfig, plan: MemoryPlan) -> int:
    """Size of the host-RAM prompt cache: what the limit leaves after the plan, at most 8 GiB.

    llama-server saves finished prompts' KV state in host RAM (``--cache-ram``, default
    8192 MiB) to reuse them later; that RAM is on top of weights and KV cache, so an
    unsized cache lets RSS grow until it hits a memory limit the plan said was enough
    (benchmarks/SOAK.md: +29 % RSS in 10 minutes of 8 clients, flat with ``--cache-ram 0``).
    A user's value wins but must fit the same limit.
    """
    left = max(0, plan.limit - plan.total) // MIB
    if cfg.server.cache_ram is not None:
        if cfg.server.cache_ram > left:
            raise PreflightError(
                f"llama_server.cache_ram = {cfg.server.cache_ram} MiB but the memory limit of {_mib(plan.limit)} "
                f"leaves {left} MiB after model {_mib(plan.model_bytes)} + KV cache {_mib(plan.kv_bytes)} "
                f"+ overhead {_mib(plan.overhead)}; allowed: 0-{left}"
            )
        return cfg.server.cache_ram
    size = min(DEFAULT_CACHE_RAM_MIB, left)
    return size if size >= MIN_CACHE_RAM_MIB else 0


def chat_template(cfg: HostConfig, meta: ModelMeta) -> str | None:
    """The built-in chat template to force, or None to keep the model's own.

    A GGUF without ``tokenizer.chat_template`` (base models, like the 270M test model)
    makes llama-server fall back to ChatML; on a Gemma vocabulary the ChatML markers are
    plain text, so replies run on into ``<|im_end|>\n<|im_start|>user ...``. The name is
    checked against the installed binary's ``--help`` list before the unit changes
    (``chat_template.template_problem``). The user's ``chat_template`` wins.
    """
    if cfg.server.chat_template is not None:
        return cfg.server.chat_template
    return builtin_template_for(meta.architecture, meta.has_chat_template, None, meta.marker_tokens)


def swa_full(cfg: HostConfig, meta: ModelMeta) -> bool:
    """Full-size sliding-window cache for models that have one, unless the user said otherwise.

    llama-server keeps only the last window of a sliding-window layer's cache, so it
    cannot reuse a cached prompt prefix: measured on Gemma 3 270M (b11434), a repeated
    75-token prompt reused 1 token without it and all but the changed tail with it.
    :func:`kv_bytes_per_token` already counts every layer at full length, so this
    costs no memory the plan did not reserve.
    """
    if cfg.server.swa_full is not None:
        return cfg.server.swa_full
    return bool(meta.sliding_window)


#: locked pages cannot be reclaimed: lock only when the whole plan needs at most this share of RAM
MLOCK_MAX_SHARE = 0.5


def load_mode(cfg: HostConfig, meta: ModelMeta, plan_total: int, host_memory_bytes: int,
              memlock_ceiling: int | None = None) -> str | None:
    """``mmap+mlock`` where locking is safe, else None (llama-server's auto: mmap).

    mmap'd weights are page cache: under memory pressure the kernel drops them even
    without swap, and every token then reads the model from disk again. Locking them
    avoids that, but locked memory is taken from everything else on the host, so it is
    chosen only when the unit's ``LimitMEMLOCK`` (and what the host's systemd can
    grant, ``memlock_ceiling``) admits the weights and the plan
    (weights + KV cache + overhead) needs at most half of the host's RAM. Not in docker
    mode (the container has no CAP_IPC_LOCK and Docker's memlock rlimit is tiny) and not
    when layers live on a GPU. A user's ``load_mode`` always wins.
    """
    if cfg.server.load_mode is not None:
        return cfg.server.load_mode
    if cfg.mode == "docker" or cfg.cuda:
        return None
    if _cannot_lock(cfg, meta, memlock_ceiling):
        return None
    return "mmap+mlock" if plan_total <= host_memory_bytes * MLOCK_MAX_SHARE else None


def _cannot_lock(cfg: HostConfig, meta: ModelMeta, memlock_ceiling: int | None) -> str | None:
    """Why the service could not lock the weights on this host (with a setting that works), or None."""
    if cfg.limits.memlock != "infinity" and parse_size(cfg.limits.memlock) < meta.file_size:
        return (f"llama_limits.memlock is {cfg.limits.memlock}; would fit: memlock 'infinity' "
                f"or >= {math.ceil(meta.file_size / MIB)}M")
    if cfg.mode == "native" and memlock_ceiling is not None and memlock_ceiling < meta.file_size:
        return (f"this host's systemd can grant a service at most {_mib(memlock_ceiling)} of locked memory "
                f"(PID 1 lacks CAP_SYS_RESOURCE, e.g. inside a container); would fit: llama_server.load_mode 'mmap'")
    return None


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def compose_resources(cfg: HostConfig) -> dict[str, dict]:
    """``deploy.resources`` for the compose file, from the same ``llama_limits`` as the unit.

    GPU layers reserve the host's NVIDIA GPUs (needs the NVIDIA container toolkit).
    """
    lim = cfg.limits
    limits: dict[str, str] = {}
    reservations: dict[str, object] = {}
    if lim.cpus:
        limits["cpus"] = f"{lim.cpus:g}"
    if lim.memory:
        limits["memory"] = lim.memory
    if lim.cpus_reserved:
        reservations["cpus"] = f"{lim.cpus_reserved:g}"
    if lim.memory_reserved:
        reservations["memory"] = lim.memory_reserved
    if cfg.cuda:
        reservations["devices"] = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    return {k: v for k, v in (("limits", limits), ("reservations", reservations)) if v}
