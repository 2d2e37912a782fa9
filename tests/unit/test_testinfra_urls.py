"""The shipped testinfra suite's URL rules (tests/testinfra/conftest.py): IPv6 in brackets, and a
server that binds every address reached at the host's own address (pure)."""

from __future__ import annotations

import pytest

from tests.testinfra.conftest import server_url, url_host


@pytest.mark.parametrize(("address", "expected"), [
    ("10.0.0.5", "10.0.0.5"), ("::1", "[::1]"), ("fd00::5", "[fd00::5]"), ("llm-01.example.com", "llm-01.example.com"),
])
def test_ipv6_addresses_are_bracketed(address, expected):
    assert url_host(address) == expected


@pytest.mark.parametrize(("bind", "ssh", "expected"), [
    ("10.0.0.5", "llm-01", "http://10.0.0.5:8080"),
    ("0.0.0.0", "llm-01", "http://llm-01:8080"),
    ("::", "fd00::5", "http://[fd00::5]:8080"),  # every address, the host known by its IPv6 address
    ("::1", "fd00::5", "http://[::1]:8080"),  # loopback: the checks go through the host (through_host)
    ("fd00::7", "llm-01", "http://[fd00::7]:8080"),
])
def test_the_server_is_reached_at_its_bind_address_or_the_hosts(bind, ssh, expected):
    assert server_url(bind, ssh, 8080) == expected


def _manifest(args: list[str], swa_full: bool = True):
    from llamadeploy.manifest import Manifest, PlanRecord

    mib = 1 << 20
    return Manifest(mode="native", unit="llama-server", host="0.0.0.0", port=8080, alias="g",
                    model_path="/m/m.gguf", model_files={"m.gguf": "a" * 64}, release="b11434-0", args=args,
                    memory_plan=PlanRecord(limit=8 << 30, model_bytes=240 * mib, kv_bytes_per_token=18 * 1024,
                                           ctx_size=32768, parallel=8, swa_full=swa_full))


def test_the_gpu_check_asks_for_the_weights_and_kv_cache_of_a_full_pin():
    """The shipped GPU check's bound (tests/testinfra/test_llama_server.gpu_need_mib): every layer
    pinned holds 0.9 x (weights + KV cache); the cache as the plan sized it, at the cache types'
    width; none counted where it may stay off the GPU."""
    from tests.testinfra.test_llama_server import gpu_need_mib

    full = _manifest(["--swa-full", "-ngl", "all"])
    need, how = gpu_need_mib(full, "all", 32768)
    assert need == pytest.approx(0.9 * (240 + 32768 * 18 / 1024)) and "KV cache 576 MiB" in how, how
    q8 = _manifest(["--swa-full", "-ctk", "q8_0", "-ctv", "q8_0"])
    assert gpu_need_mib(q8, "-1", 32768)[0] < need  # a q8_0 cache is narrower than f16
    for kept_off in (_manifest(["--swa-full", "--no-kv-offload"]), _manifest([], swa_full=False)):
        assert gpu_need_mib(kept_off, "all", 32768)[0] == pytest.approx(0.9 * 240)
    # a share of layers, or layers on RPC workers: only "some", which per-layer sizes would improve
    assert gpu_need_mib(full, "12", 32768)[0] == 1
    assert gpu_need_mib(_manifest(["--rpc", "10.0.0.9:50052"]), "all", 32768)[0] == 1
