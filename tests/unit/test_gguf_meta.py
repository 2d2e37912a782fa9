"""read_meta on GGUF headers written here with gguf-py's own writer: the values the plan and the
gate take from a model, as llama.cpp reads them."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from llamadeploy.gguf_meta import read_meta


def header(path: Path, arch: str, **values: int) -> Path:
    """A GGUF file with only a header: ``values`` under ``<arch>.<key>`` (no tensors)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in values.items():
        w.add_uint32(f"{arch}.{key.replace('__', '.')}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


BERT = dict(block_count=6, context_length=512, embedding_length=384, attention__head_count=12)


@pytest.mark.parametrize("extra, dims", [
    ({}, 384),  # a sentence encoder: its vectors are its hidden size
    ({"embedding_length_out": 768}, 768),  # a model that projects its output (llama.cpp's n_embd_out)
])
def test_embedding_dims_is_what_llama_cpp_returns(tmp_path, extra, dims):
    meta = read_meta(header(tmp_path / "m.gguf", "bert", **BERT, **extra))
    assert meta.embedding_dims == dims
    assert (meta.architecture, meta.n_layers, meta.n_ctx_train) == ("bert", 6, 512)
    assert meta.key_length == meta.value_length == 32  # 384 / 12 heads, no explicit key length

