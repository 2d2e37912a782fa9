"""Router mode's pure rules: one llama-server, several models, each an instance of its own.

llama-server b11434 started without ``--model`` is a router (``tools/server/server-models.cpp``):
it reads a preset INI, spawns one child ``llama-server`` per loaded model on 127.0.0.1, and
routes each request by its ``model``. A child's options are its section's, overlaid with the
router's own command line (command line > section), so the command line carries only what every
model shares (address, threads, metrics, the key) and each section what is the model's own
(its file, context, slots, kind). The router drops ``--api-key-file`` for its children: they
answer only on loopback, and the router checks the key.

Memory: every instance has its own weights, KV cache and compute buffers, and a chat instance
its prompt cache (``--cache-ram``, a fixed size per model). Each model is planned as in
one-model mode (``tuning.plan_memory``); then every set of models that can be loaded at once
(the ``models_max`` largest) must fit the unit's limit together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from llamadeploy.tuning import MIB, MemoryPlan

if TYPE_CHECKING:
    from llamadeploy.config import HostConfig, RouterModel

#: the router process itself: an HTTP server and a process table, no model
ROUTER_OVERHEAD = 64 * MIB
#: each chat model's prompt cache in router mode (``--cache-ram``; one-model mode gives what the
#: limit leaves, up to 8 GiB): enough for a few long RAG prompts, counted in the memory check
ROUTER_CACHE_RAM_MIB = 512
#: flags of the router's command line that a child gets from the router itself or not at all
ROUTER_FLAGS = frozenset({"--host", "--port", "--alias", "--model", "--threads", "--threads-batch", "--metrics",
                          "--api-key-file"})
#: preset keys that are not command-line flags (``common_params_add_preset_options``)
PRESET_ONLY = frozenset({"load-on-startup", "stop-timeout"})
#: what a kind adds to its instance (``common/arg.cpp``: --rerank implies --embedding and rank pooling)
KIND_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "chat": (),
    "embedding": (("embedding", "true"),),
    "rerank": (("rerank", "true"),),
}


@dataclass(frozen=True)
class Instance:
    """One model as the router runs it: its preset section and the plan its options came from."""

    alias: str
    kind: str
    on_demand: bool
    plan: MemoryPlan
    #: (key, value) lines of its preset section, in order
    options: tuple[tuple[str, str], ...]

    @property
    def footprint(self) -> int:
        """What the instance can hold: weights, KV cache, overhead and its prompt cache."""
        return self.plan.total + (self.plan.cache_ram_mib or 0) * MIB


def model_cfg(cfg: HostConfig, m: RouterModel) -> HostConfig:
    """The host's settings as one model's instance sees them: that model, its context, slots and
    template; the router's own flags (extra_args, key) stay on the router's command line."""
    server = cfg.server.model_copy(update={"ctx_size": m.ctx_size, "parallel": m.parallel,
                                           "chat_template": m.chat_template, "extra_args": [], "api_key": None,
                                           "cache_ram": 0})  # sized for all models at once: with_cache_ram
    return cfg.model_copy(update={"model": m, "models": [], "server": server})


def pairs(args: Sequence[str]) -> list[tuple[str, str]]:
    """An argument vector as preset lines: ``--flag value`` -> ``flag = value``, a bare ``--flag``
    -> ``flag = true`` (pure). A value never starts with ``--``; the vector is the deploy's own."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise ValueError(f"not a long flag where one was expected: {flag!r} in {list(args)!r}")
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((flag[2:], args[i + 1]))
            i += 2
        else:
            out.append((flag[2:], "true"))
            i += 1
    return out


def instance(m: RouterModel, model_path: str, instance_args: Sequence[str], plan: MemoryPlan) -> Instance:
    """A model's preset section from its own argument vector (``tuning.server_args`` for
    :func:`model_cfg`), less what the router sets for every child (pure)."""
    own: list[str] = []
    i = 0
    while i < len(instance_args):
        flag = instance_args[i]
        takes_value = i + 1 < len(instance_args) and not instance_args[i + 1].startswith("--")
        if flag not in ROUTER_FLAGS:
            own += instance_args[i:i + (2 if takes_value else 1)]
        i += 2 if takes_value else 1
    options = [("model", model_path), *pairs(own), *KIND_KEYS[m.kind]]
    if m.pooling is not None:
        options.append(("pooling", m.pooling))
    if m.spec_type is not None:
        options.append(("spec-type", m.spec_type))
    options += [("load-on-startup", "true" if m.load == "startup" else "false"), ("stop-timeout", str(m.stop_timeout))]
    return Instance(m.alias, m.kind, m.load == "on_demand", plan, tuple(options))


def check_args(instances: Sequence[Instance]) -> list[str]:
    """Every preset line as a command-line flag, for the binary's ``--help`` check (pure): a key the
    release does not know would make the router refuse the whole preset at start."""
    args: list[str] = []
    for inst in instances:
        for key, value in inst.options:
            if key in PRESET_ONLY or key == "model":
                continue
            args += [f"--{key}"] if value == "true" else [f"--{key}", value]
    return args


def resident(instances: Sequence[Instance], models_max: int) -> list[Instance]:
    """The largest set of models that can be loaded at once: the ``models_max`` biggest (pure)."""
    by_size = sorted(instances, key=lambda i: (-i.footprint, i.alias))
    return by_size[:models_max] if models_max else by_size


def resident_bytes(instances: Sequence[Instance], models_max: int) -> int:
    return ROUTER_OVERHEAD + sum(i.footprint for i in resident(instances, models_max))


def resident_problem(instances: Sequence[Instance], models_max: int, limit: int) -> str | None:
    """Why these models cannot be loaded together within ``limit``, with the numbers; None if they can."""
    worst = resident(instances, models_max)
    need = resident_bytes(instances, models_max)
    if need <= limit:
        return None
    parts = ", ".join(f"{i.alias} {_mib(i.footprint)} (weights {_mib(i.plan.model_bytes)} + KV "
                      f"{_mib(i.plan.kv_bytes)} for ctx {i.plan.ctx_size} + overhead {_mib(i.plan.overhead)}"
                      + (f" + prompt cache {i.plan.cache_ram_mib} MiB" if i.plan.cache_ram_mib else "") + ")"
                      for i in worst)
    fits = 0
    while fits < len(instances) and resident_bytes(instances, fits + 1) <= limit:
        fits += 1
    return (f"{len(worst)} model(s) can be loaded at once (llama_router.models_max = {models_max}): {parts}, "
            f"plus the router {_mib(ROUTER_OVERHEAD)} = {_mib(need)}, which does not fit the memory limit of "
            f"{_mib(limit)}; would fit: "
            + (f"llama_router.models_max = {fits}, or " if fits else "")
            + f"a smaller ctx_size per model, or llama_limits.memory >= {math.ceil(need / MIB)}M")


def with_cache_ram(instances: Sequence[Instance], given: int | None = None) -> list[Instance]:
    """Chat models' prompt cache (``--cache-ram``): ``given`` (``llama_server.cache_ram``) or
    :data:`ROUTER_CACHE_RAM_MIB` each, counted in their footprint; embedding and rerank instances
    keep none (pure).

    A fixed size per model, not a share of what is left: a share would change every chat model's
    section whenever a model is added or removed, and the router reloads a model whose section
    changed (``GET /models?reload=1``), dropping its KV cache for nothing.
    """
    out = []
    for inst in instances:
        mib = (ROUTER_CACHE_RAM_MIB if given is None else given) if inst.kind == "chat" else 0
        options = tuple((k, v) for k, v in inst.options if k != "cache-ram")
        pos = next((n for n, (k, _) in enumerate(options) if k in PRESET_ONLY), len(options))
        out.append(replace(inst, options=(*options[:pos], ("cache-ram", str(mib)), *options[pos:]),
                           plan=replace(inst.plan, cache_ram_mib=mib)))
    return out


def router_args(cfg: HostConfig, preset_path: str, threads: int, threads_batch: int,
                bind: tuple[str, int] | None = None, key_path: str | None = None) -> list[str]:
    """The router's own argument vector (pure): where it listens, its presets, how many models it
    holds, and what every child shares (threads, metrics, the user's extra flags). ``bind`` and
    ``key_path``: where it listens and reads the key when that differs from the host's (in a
    container), as for :func:`llamadeploy.tuning.server_args`."""
    s, r = cfg.server, cfg.router
    host, port = bind or (s.host, s.port)
    args = ["--host", host, "--port", str(port), "--models-preset", preset_path,
            "--models-max", str(r.models_max)]
    if r.sleep_idle_seconds is not None:
        args += ["--sleep-idle-seconds", str(r.sleep_idle_seconds)]
    args += ["--threads", str(threads), "--threads-batch", str(threads_batch)]
    if s.metrics:
        args.append("--metrics")
    if s.api_key is not None:
        args += ["--api-key-file", key_path or cfg.api_key_path]
    return args + list(s.extra_args)


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"
