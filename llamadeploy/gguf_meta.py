"""GGUF metadata the tuning needs, read on the controller with the ``gguf`` package.

Only the header is parsed (``GGUFReader`` memory-maps the file); nothing is
loaded. The numbers decide how much KV cache a token costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamadeploy.chat_template import TEMPLATE_MARKERS


@dataclass(frozen=True)
class ModelMeta:
    """What sizes the KV cache: per layer, per KV head, per token."""

    architecture: str
    n_layers: int
    n_ctx_train: int
    n_head_kv: int
    key_length: int
    value_length: int
    file_size: int
    #: sliding-window size when the model interleaves local-attention layers (Gemma 2/3)
    sliding_window: int | None = None
    #: the GGUF carries ``tokenizer.chat_template`` (unknown counts as yes: never override it)
    has_chat_template: bool = True
    #: which of the built-in templates' marker tokens its vocabulary has (see chat_template);
    #: None = the vocabulary was not read (catalog values)
    marker_tokens: frozenset[str] | None = None
    #: the length of the vectors the model returns as embeddings: llama.cpp's ``n_embd_out``
    #: (``<arch>.embedding_length_out`` when a model projects its output, else
    #: ``<arch>.embedding_length``); None = unknown (catalog values, a header not read)
    embedding_dims: int | None = None


#: every marker token a built-in template writes: all we keep of the vocabulary
MARKERS = frozenset(m for marks in TEMPLATE_MARKERS.values() for m in marks)


def read_meta(path: str | Path) -> ModelMeta:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")

    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return field.contents() if field is not None else default

    arch = get("general.architecture")
    n_head = get(f"{arch}.attention.head_count")
    n_embd = get(f"{arch}.embedding_length")
    head_dim = n_embd // n_head if n_head else 0
    n_head_kv = get(f"{arch}.attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):  # per-layer counts (some architectures)
        n_head_kv = max(n_head_kv)
    return ModelMeta(
        architecture=arch,
        n_layers=int(get(f"{arch}.block_count")),
        n_ctx_train=int(get(f"{arch}.context_length")),
        n_head_kv=int(n_head_kv),
        key_length=int(get(f"{arch}.attention.key_length", head_dim)),
        value_length=int(get(f"{arch}.attention.value_length", head_dim)),
        file_size=Path(path).stat().st_size,
        sliding_window=get(f"{arch}.attention.sliding_window"),
        has_chat_template=reader.fields.get("tokenizer.chat_template") is not None,
        marker_tokens=frozenset(get("tokenizer.ggml.tokens", [])) & MARKERS,
        embedding_dims=int(get(f"{arch}.embedding_length_out") or n_embd) if n_embd else None,
    )
