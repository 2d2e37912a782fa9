"""Memory planning: slots and context from GGUF metadata, host memory and cores.

Model numbers are the GGUF header values of the user's recommended models at
Q4_K_M (block_count, context_length, head_count_kv, key/value_length) and their
file sizes as listed by their Hugging Face repos. Expected plans were worked
out by hand; the arithmetic is in the comments.
"""

from __future__ import annotations

import pytest

from llamadeploy.config import HostConfig
from llamadeploy.facts import CpuInfo
from llamadeploy.gguf_meta import ModelMeta
from llamadeploy.tuning import PreflightError, kv_bytes_per_token, overhead_bytes, plan_memory

GIB = 1 << 30
GEMMA2_2B = ModelMeta("gemma2", 26, 8192, 4, 256, 256, 1_708_582_752, 4096)
PHI3_MINI = ModelMeta("phi3", 32, 4096, 32, 96, 96, 2_393_231_072)
QWEN25_3B = ModelMeta("qwen2", 36, 32768, 2, 128, 128, 2_104_932_768)
GEMMA3_270M = ModelMeta("gemma3", 18, 32768, 1, 256, 256, 253_113_024, 512)


def cores(n: int) -> CpuInfo:
    return CpuInfo(logical=2 * n if n > 2 else n, physical=n, sockets=1, numa_nodes=1)


def cfg(**sections) -> HostConfig:
    sections["server"] = {"allow_unauthenticated": True, **sections.get("server", {})}  # tests of the open case
    return HostConfig.model_validate({"model": {"path": "/m.gguf"}, **sections})


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(GEMMA2_2B) == 26 * 4 * 512 * 2 == 106_496
    assert kv_bytes_per_token(PHI3_MINI) == 32 * 32 * 192 * 2 == 393_216
    assert kv_bytes_per_token(QWEN25_3B) == 36 * 2 * 256 * 2 == 36_864
    assert kv_bytes_per_token(GEMMA3_270M) == 18_432
    assert kv_bytes_per_token(QWEN25_3B, "q8_0") == 19_584


@pytest.mark.parametrize(
    ("meta", "mem_gib", "ncores", "expected"),
    [
        # Gemma-2-2B: budget(8G) = 8 GiB - 1.709e9 - (384 MiB + 1.709e8) = 6,307,840,381
        #   8 slots x 8192 = 65536 tok x 106,496 B = 6.98e9 > budget; x 4096 = 3.49e9 fits
        (GEMMA2_2B, 8, 2, (32768, 8)),
        (GEMMA2_2B, 64, 16, (65536, 8)),        # 6.98e9 fits in ~66e9
        (GEMMA2_2B, 512, 128, (524288, 64)),    # 64 slots x 8192: 55.8e9 fits
        (GEMMA2_2B, 8, 128, (32768, 64)),       # 64 slots must shrink to 512 tok each
        # Phi-3-mini (4k train ctx, full MHA: 384 KiB/token): budget(8G) = 5,554,727,229
        #   8 x 4096 = 12.9e9 no; 8 x 2048 = 6.44e9 no; 8 x 1024 = 3.22e9 fits
        (PHI3_MINI, 8, 2, (8192, 8)),
        (PHI3_MINI, 64, 16, (32768, 8)),
        (PHI3_MINI, 512, 128, (262144, 64)),    # 103e9 fits
        # Qwen2.5-3B (GQA, 36 KiB/token): 65536 tok = 2.42e9 fits even in 8 GiB
        (QWEN25_3B, 8, 2, (65536, 8)),
        (QWEN25_3B, 64, 16, (65536, 8)),
        (QWEN25_3B, 512, 128, (524288, 64)),
        # the tiny default on this 2-core / 24 GiB CI machine
        (GEMMA3_270M, 24, 2, (65536, 8)),
    ],
)
def test_plan_for_host_sizes(meta, mem_gib, ncores, expected):
    plan = plan_memory(cfg(), meta, mem_gib * GIB, cores(ncores))
    assert (plan.ctx_size, plan.parallel) == expected
    assert plan.total <= plan.limit


def test_memory_limit_shrinks_slots():
    # Phi-3 under MemoryMax=4G: budget = 4 GiB - 2,393,231,072 - 641,976,291 = 1,259,759,933
    # 8 slots x 512 = 4096 tok = 1.61e9 no -> 4 slots x 512 = 2048 tok = 8.05e8 fits
    plan = plan_memory(cfg(limits={"memory": "4G"}), PHI3_MINI, 64 * GIB, cores(16))
    assert (plan.ctx_size, plan.parallel, plan.limit) == (2048, 4, 4 * GIB)


def test_user_settings_win_when_they_fit():
    plan = plan_memory(cfg(server={"ctx_size": 4096, "parallel": 2}), QWEN25_3B, 8 * GIB, cores(2))
    assert (plan.ctx_size, plan.parallel) == (4096, 2)
    plan = plan_memory(cfg(server={"parallel": 3}), QWEN25_3B, 8 * GIB, cores(2))
    assert (plan.ctx_size, plan.parallel) == (3 * 8192, 3)


def test_refused_with_numbers_and_what_would_fit():
    # budget = 3 GiB - 2,393,231,072 - 641,976,291 = 186,018,109 < 512 x 393,216 = 201,326,592
    with pytest.raises(PreflightError) as exc:
        plan_memory(cfg(limits={"memory": "3G"}), PHI3_MINI, 64 * GIB, cores(16))
    msg = str(exc.value)
    assert "model 2282 MiB" in msg and "393216 bytes/token x ctx 512, 1 slot(s)" in msg
    assert "memory limit of 3072 MiB" in msg
    assert "llama_server.ctx_size <= 473" not in msg  # 473 < 512 minimum: not offered
    assert f"llama_limits.memory >= {-(-(2_393_231_072 + overhead_bytes(PHI3_MINI) + 512 * 393_216) // (1 << 20))}M" in msg


def test_user_context_too_big_refused_with_fitting_context():
    with pytest.raises(PreflightError, match=r"llama_server.ctx_size <= 59230, or"):
        # budget(8G, Gemma-2) = 6,307,840,381 // 106,496 = 59,230 tokens
        plan_memory(cfg(server={"ctx_size": 131072}), GEMMA2_2B, 8 * GIB, cores(2))


def test_mlock_needs_memlock_room():
    with pytest.raises(PreflightError, match="memlock"):
        plan_memory(cfg(server={"load_mode": "mlock"}, limits={"memlock": "64M"}), QWEN25_3B, 8 * GIB, cores(2))
    plan_memory(cfg(server={"load_mode": "mlock"}), QWEN25_3B, 8 * GIB, cores(2))


@pytest.mark.parametrize(
    ("meta", "expected"),
    [(GEMMA3_270M, True), (GEMMA2_2B, True), (PHI3_MINI, False), (QWEN25_3B, False)],
)
def test_swa_full_for_sliding_window_models(meta, expected):
    """Gemma 2/3 carry attention.sliding_window: their cache must be full-size for prefix reuse."""
    plan = plan_memory(cfg(), meta, 64 * GIB, cores(16))
    assert plan.swa_full is expected
    # and it costs nothing the plan did not already reserve: same context, same slots either way
    off = plan_memory(cfg(server={"swa_full": False}), meta, 64 * GIB, cores(16))
    assert (off.ctx_size, off.parallel, off.swa_full) == (plan.ctx_size, plan.parallel, False)


def test_swa_full_user_setting_wins():
    assert plan_memory(cfg(server={"swa_full": True}), PHI3_MINI, 64 * GIB, cores(16)).swa_full is True
    assert plan_memory(cfg(server={"swa_full": False}), GEMMA3_270M, 64 * GIB, cores(16)).swa_full is False


@pytest.mark.parametrize(
    ("meta", "mem_gib", "sections", "expected"),
    [
        # Gemma 3 270M on the 24 GiB test VM: 241 MiB + 408 MiB + 65536 x 18,432 B = 1.85e9 <= 12 GiB
        (GEMMA3_270M, 24, {}, "mmap+mlock"),
        # Qwen2.5-3B on 64 GiB: 8 x 8192 tok x 36,864 B = 2.4e9 + 2.1e9 + 0.6e9 = 5.1e9 <= 32 GiB
        (QWEN25_3B, 64, {}, "mmap+mlock"),
        # Gemma-2-2B on 8 GiB: plan (32768 tok) = 3.49e9 + 1.71e9 + 0.57e9 = 5.77e9 > 4 GiB: no lock
        (GEMMA2_2B, 8, {}, None),
        # memlock below the weights: locking would fail, so it is not asked for
        (QWEN25_3B, 64, {"limits": {"memlock": "64M"}}, None),
        (QWEN25_3B, 64, {"mode": "docker"}, None),
        (QWEN25_3B, 64, {"server": {"gpu_layers": 99}, "build": {"backend": "cuda"}}, None),
        (QWEN25_3B, 64, {"build": {"backend": "cuda"}}, None),  # fitted layers live on the GPU too
        # the user's choice wins either way
        (GEMMA2_2B, 8, {"server": {"load_mode": "mlock"}}, "mlock"),
        (GEMMA3_270M, 24, {"server": {"load_mode": "none"}}, "none"),
    ],
)
def test_load_mode(meta, mem_gib, sections, expected):
    assert plan_memory(cfg(**sections), meta, mem_gib * GIB, cores(16)).load_mode == expected


def test_no_lock_where_systemd_cannot_grant_it():
    """Inside systemd-nspawn PID 1 has no CAP_SYS_RESOURCE: services get at most 8 MiB locked."""
    plan = plan_memory(cfg(), GEMMA3_270M, 24 * GIB, cores(2), memlock_ceiling=8 << 20)
    assert plan.load_mode is None
    assert plan_memory(cfg(), GEMMA3_270M, 24 * GIB, cores(2), memlock_ceiling=1 << 30).load_mode == "mmap+mlock"
    with pytest.raises(PreflightError, match=r"can grant a service at most 8 MiB of locked memory"):
        plan_memory(cfg(server={"load_mode": "mlock"}), GEMMA3_270M, 24 * GIB, cores(2), memlock_ceiling=8 << 20)


def test_limits_above_the_host_and_login_accounts_are_refused():
    from llamadeploy.roles.preflight import account_problem, host_limit_problem

    assert host_limit_problem(cfg(limits={"cpus": 1000.0}), 2, 8 << 30) == (
        "llama_limits.cpus = 1000 but this host has 2 CPUs; allowed: at most 2")
    assert host_limit_problem(cfg(limits={"memory": "64G"}), 2, 8 << 30) == (
        "llama_limits.memory = '64G' but this host has 8192 MiB of RAM; allowed: at most 8192M")
    assert host_limit_problem(cfg(limits={"cpus": 2.0, "memory": "8G"}), 2, 8 << 30) is None
    ops = cfg(service={"user": "ops"})
    assert "existing login account (uid 1000)" in account_problem(ops, {"ops": {"uid": 1000}})
    # a system account is the ownership role's to judge, by the host's record (tests/unit/test_ownership.py)
    assert account_problem(ops, {"ops": {"uid": 114, "home": "/var/lib/postgresql"}}) is None
    assert account_problem(ops, {}) is None


def test_prompt_cache_gets_what_the_limit_leaves_at_most_8_gib():
    """--cache-ram is RAM on top of the plan: sized to the limit's remainder, capped at the default."""
    small = plan_memory(cfg(limits={"memory": "4G"}), PHI3_MINI, 64 * GIB, cores(16))
    left = (small.limit - small.total) // (1 << 20)
    assert 64 <= small.cache_ram_mib == left < 8192
    assert small.total + small.cache_ram_mib * (1 << 20) <= small.limit
    assert plan_memory(cfg(), PHI3_MINI, 512 * GIB, cores(16)).cache_ram_mib == 8192


def test_prompt_cache_off_when_nothing_is_left_and_user_value_must_fit():
    # 2-slot plan that leaves under 64 MiB: the cache is off rather than squeezed
    tight = plan_memory(cfg(server={"ctx_size": 4096}), GEMMA3_270M, 64 * GIB, cores(2))
    limit = tight.total + 32 * (1 << 20)
    assert plan_memory(cfg(server={"ctx_size": 4096}, limits={"memory": str(limit)}), GEMMA3_270M,
                       64 * GIB, cores(2)).cache_ram_mib == 0
    assert plan_memory(cfg(server={"cache_ram": 0}), GEMMA3_270M, 64 * GIB, cores(2)).cache_ram_mib == 0
    assert plan_memory(cfg(server={"cache_ram": 100}, limits={"memory": "8G"}), GEMMA3_270M,
                       64 * GIB, cores(2)).cache_ram_mib == 100
    with pytest.raises(PreflightError, match=r"llama_server.cache_ram = 9000 MiB but the memory limit of 4096 MiB leaves \d+ MiB"):
        plan_memory(cfg(server={"cache_ram": 9000}, limits={"memory": "4G"}), GEMMA3_270M, 64 * GIB, cores(2))
