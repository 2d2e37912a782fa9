"""read_meta on GGUF headers written here with gguf-py's own writer: the values the plan and the
gate take from a model, as llama.cpp reads them."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import pytest

from llamadeploy.gguf_meta import MARKERS, header_fields, read_meta


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



MODEL = Path(os.environ.get("GEMMA_GGUF", "/var/cache/llamactl-ci/models/gemma-3-270m-q4_k_m.gguf"))


def oracle(path: Path, keep: frozenset[str]) -> dict:
    """What gguf-py's GGUFReader reads, in header_fields' shape: string arrays reduced to the
    members in ``keep``, numeric arrays past 65536 elements to None."""
    reader = gguf.GGUFReader(str(path), "r")
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's own fields for the file header
            continue
        value = field.contents()
        if field.types[:2] == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
            value = [v for v in value if v in keep]
        elif field.types[0] == gguf.GGUFValueType.ARRAY and len(value) > 65536:
            value = None
        out[name] = value
    return out


def test_header_fields_reads_what_gguf_py_reads_from_a_written_header(tmp_path):
    """Every value type the format has, written by gguf-py's writer: the same values back."""
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("llama.block_count", 4)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 1e-6)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**40)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 0.1)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_array("llama.attention.head_count_kv", [2, 4, 8, 4])
    w.add_token_list(["<s>", "<start_of_turn>", "hello", "<end_of_turn>", "ünïcode"])
    w.add_array("tokenizer.ggml.scores", [0.5] * 70000)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    keep = frozenset({"<start_of_turn>", "<end_of_turn>", "ünïcode", "absent"})
    fields = header_fields(path, keep)
    assert fields == oracle(path, keep)
    assert fields["tokenizer.ggml.tokens"] == ["<start_of_turn>", "<end_of_turn>", "ünïcode"]
    assert fields["llama.attention.head_count_kv"] == [2, 4, 8, 4] and fields["tokenizer.ggml.scores"] is None


@pytest.mark.skipif(not MODEL.exists(), reason="test GGUF not present")
def test_header_fields_reads_what_gguf_py_reads_from_the_real_model():
    """Gemma 3 270M: 262k tokens walked, the same header as GGUFReader's, and read_meta's values."""
    assert header_fields(MODEL, MARKERS) == oracle(MODEL, MARKERS)
    meta = read_meta(MODEL)
    assert (meta.architecture, meta.n_layers, meta.n_ctx_train, meta.n_head_kv) == ("gemma3", 18, 32768, 1)
    assert (meta.key_length, meta.value_length, meta.sliding_window, meta.embedding_dims) == (256, 256, 512, 640)
    assert meta.has_chat_template is False and meta.marker_tokens == {"<start_of_turn>", "<end_of_turn>"}


def test_a_file_that_is_not_little_endian_gguf_is_refused(tmp_path):
    swapped = tmp_path / "be.gguf"
    swapped.write_bytes(b"GGUF" + (3).to_bytes(4, "big") + bytes(16))
    with pytest.raises(ValueError, match="GGUF version 50331648 .byte-swapped: a big-endian file.."):
        header_fields(swapped)
    other = tmp_path / "x.bin"
    other.write_bytes(b"\0" * 32)
    with pytest.raises(ValueError, match="not a GGUF file"):
        header_fields(other)
