"""Reading GGUF files (llama.cpp's format): metadata and dequantized tensors, nothing model-specific.

A leaf module: the weight loader (``checkpoint/gguf.py``) and the tokenizer (``tokenizer.py``) both read
GGUF files through it, so neither imports the other to get at the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class GGUFError(ValueError):
    """The GGUF file is missing, corrupt, truncated, or describes something we cannot load."""


def open_gguf(path: Any) -> Any:
    """A ``gguf.GGUFReader`` over ``path``, after checking that every tensor lies inside the file."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file not found: {p}")
    try:
        reader = gguf.GGUFReader(p, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on bad bytes
        raise GGUFError(f"{p} is not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") from e
    size = p.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(f"{p} is truncated: tensor {t.name!r} ends at byte {end} but the file has {size}")
    return reader


def _field_value(field: Any) -> Any:
    v = field.contents()
    if isinstance(v, float):  # float32 metadata: keep its shortest decimal (9.99999974e-06 -> 1e-05)
        v = float(str(np.float32(v)))
    return v


def reader_metadata(reader: Any) -> dict[str, Any]:
    """All metadata key/values of an open reader, arrays as Python lists."""
    return {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read_gguf_metadata(path: Any) -> dict[str, Any]:
    """All metadata key/values of a GGUF file, arrays as Python lists."""
    return reader_metadata(open_gguf(path))


def dequantize(t: Any) -> np.ndarray:
    """One tensor as float32 numpy in numpy (reversed ggml) dim order, e.g. ``[out, in]``."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    qtype = t.tensor_type
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if qtype == Q.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif qtype == Q.F16:
        arr = np.asarray(t.data).view(np.float16).astype(np.float32)
    else:
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise GGUFError(f"tensor {t.name!r}: quantization type {qtype.name} is not supported ({e})") from e
        arr = np.asarray(arr, dtype=np.float32)
    return arr.reshape(shape)
