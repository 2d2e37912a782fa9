"""GGUF metadata the tuning needs, read on the controller from the file's header.

Only the key/value section at the start of the file is read (memory-mapped); no tensor
is touched. The numbers decide how much KV cache a token costs.

Why not ``gguf.GGUFReader``: it builds a field object for every array element, the whole
vocabulary included, which took 8.4 s for Gemma 3 270M's 262k tokens (an operator's first
``status``, and every first deploy of a model, waited on it). :func:`header_fields` walks the
same format (GGUF v2/v3, little-endian, as llama.cpp on x86 and ARM reads it) in 0.07 s,
keeping only the strings it is asked for; ``tests/unit/test_gguf_meta.py`` checks it against
``GGUFReader`` on the real model and on headers gguf-py's own writer wrote.
"""

from __future__ import annotations

import mmap
import struct
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


#: GGUF value types (gguf.h's ``enum gguf_type``) with their struct formats; 8 and 9 are
#: STRING and ARRAY
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def header_fields(path: str | Path, keep: frozenset[str] = frozenset(), max_array: int = 65536) -> dict[str, Any]:
    """Every metadata key of a GGUF file with its value: scalars and strings as they are, arrays
    of numbers as lists (None past ``max_array`` elements: the scores of a vocabulary), arrays
    of strings as the list of those of their members that are in ``keep`` (the vocabulary is
    walked, not kept). Raises ValueError for a file that is not a GGUF v2/v3 little-endian one."""
    wanted = frozenset(k.encode() for k in keep)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        (version,) = struct.unpack_from("<I", m, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (byte-swapped: a big-endian file?); "
                             "allowed: little-endian GGUF v2 or v3")
        (n_kv,) = struct.unpack_from("<Q", m, 16)
        off = 24

        def text(at: int) -> tuple[bytes, int]:
            (n,) = struct.unpack_from("<Q", m, at)
            return m[at + 8:at + 8 + n], at + 8 + n

        out: dict[str, Any] = {}
        for _ in range(n_kv):
            raw_key, off = text(off)
            key = raw_key.decode()
            (kind,) = struct.unpack_from("<I", m, off)
            off += 4
            if kind == _STRING:
                value, off = text(off)
                out[key] = value.decode("utf-8", "replace")
            elif kind == _ARRAY:
                item, n = struct.unpack_from("<IQ", m, off)
                off += 12
                if item == _STRING:
                    kept = []
                    for _ in range(n):
                        value, off = text(off)
                        if value in wanted:
                            kept.append(value.decode())
                    out[key] = kept
                elif item in _SCALARS:
                    code = _SCALARS[item]
                    out[key] = list(struct.unpack_from(f"<{n}{code}", m, off)) if n <= max_array else None
                    off += n * struct.calcsize(code)
                else:
                    raise ValueError(f"{path}: {key} is an array of GGUF type {item}, which this reader does not know")
            elif kind in _SCALARS:
                fmt = "<" + _SCALARS[kind]
                (out[key],) = struct.unpack_from(fmt, m, off)
                off += struct.calcsize(fmt)
            else:
                raise ValueError(f"{path}: {key} has GGUF type {kind}, which this reader does not know")
        return out


def read_meta(path: str | Path) -> ModelMeta:
    fields = header_fields(path, keep=MARKERS)

    def get(key: str, default: Any = None) -> Any:
        return fields.get(key, default)

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
        has_chat_template="tokenizer.chat_template" in fields,
        marker_tokens=frozenset(get("tokenizer.ggml.tokens", [])) & MARKERS,
        embedding_dims=int(get(f"{arch}.embedding_length_out") or n_embd) if n_embd else None,
    )
