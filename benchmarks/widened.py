"""Bigger real models for the no-op benchmark: the test model with its weights widened to F16 / F32.

The issue asks how a no-op run grows with the model's size, and the only real GGUF this
machine has is Gemma 3 270M Q4_K_M (253 MB). Dequantizing its tensors (gguf-py's own
``dequantize``) and writing them as F16 or F32 gives the same model, the same header and
vocabulary, at 2x and 4x the bytes: a model llama-server loads and answers with, and whose
size is what a re-hash of every run would pay for. Not a test; used by ``benchmarks.noop``.

    .venv/bin/python -m benchmarks.widened F16|F32 [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import dequantize

KEEP = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
TARGETS = {"F16": (np.float16, LlamaFileType.MOSTLY_F16), "F32": (np.float32, LlamaFileType.ALL_F32)}


def widened(src: Path, target: str, out: Path) -> Path:
    """Write ``src`` with every quantized tensor as ``target`` to ``out`` (by rename); returns ``out``.

    Header fields are copied as they are, except ``general.file_type`` (now the target's) and
    what the writer sets itself (architecture, alignment).
    """
    if out.exists():
        return out
    dtype, file_type = TARGETS[target]
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    tmp = out.with_name(out.name + ".partial")
    writer = GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.alignment",
                                                            "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(file_type))
    for t in reader.tensors:
        if t.tensor_type in KEEP:
            data = np.asarray(t.data)
        else:
            data = dequantize(t.data, t.tensor_type).astype(dtype)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


if __name__ == "__main__":
    from llamadeploy.sandbox import assets

    src = assets.gemma_model()
    kind = sys.argv[1]
    dest = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_name(src.name.replace("q4_k_m", kind.lower()))
    print(widened(src, kind, dest), dest.stat().st_size)
