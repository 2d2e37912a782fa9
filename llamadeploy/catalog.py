"""Recommended models, selectable by a short name (``llama_model = {"catalog": "qwen2.5-3b"}``).

Sizes and GGUF header values (layers, KV heads, head size, training context) are
those of the listed Q4_K_M files; tuning uses them to size the KV cache before
the file is on the controller (``distribution: host``). ``ram`` is the user's
guidance for the host, not a limit we enforce (preflight computes that).
"""

from __future__ import annotations

from dataclasses import dataclass

from llamadeploy.gguf_meta import ModelMeta


@dataclass(frozen=True)
class CatalogEntry:
    repo_id: str
    filename: str
    ram: str
    note: str
    meta: ModelMeta


CATALOG: dict[str, CatalogEntry] = {
    "gemma-3-270m": CatalogEntry(
        "unsloth/gemma-3-270m-it-GGUF", "gemma-3-270m-it-Q4_K_M.gguf", "0.5–1 GB",
        "tiny default: smoke tests, CI, API plumbing",
        ModelMeta("gemma3", 18, 32768, 1, 256, 256, 253_113_024, 512),
    ),
    "gemma-2-2b-it": CatalogEntry(
        "bartowski/gemma-2-2b-it-GGUF", "gemma-2-2b-it-Q4_K_M.gguf", "2–4 GB",
        "general tasks, high speed",
        ModelMeta("gemma2", 26, 8192, 4, 256, 256, 1_708_582_752, 4096),
    ),
    "phi-3-mini": CatalogEntry(
        "microsoft/Phi-3-mini-4k-instruct-gguf", "Phi-3-mini-4k-instruct-q4.gguf", "3–5 GB",
        "balanced quality/performance (3.8B)",
        ModelMeta("phi3", 32, 4096, 32, 96, 96, 2_393_231_072),
    ),
    "qwen2.5-3b": CatalogEntry(
        "Qwen/Qwen2.5-3B-Instruct-GGUF", "qwen2.5-3b-instruct-q4_k_m.gguf", "3–5 GB",
        "multilingual, good quality",
        ModelMeta("qwen2", 36, 32768, 2, 128, 128, 2_104_932_768),
    ),
}

DEFAULT_MODEL = "gemma-3-270m"
