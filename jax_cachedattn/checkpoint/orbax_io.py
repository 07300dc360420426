"""Params as orbax checkpoints, the converted-SmolLM2 cache, and a fingerprint that names a model.

``save_params(path, params, config=None)`` writes an orbax ``StandardCheckpointer`` checkpoint at
``path`` (a folder) and, when given, the config as ``<path>.config.json`` beside it. ``restore_params(path, like=None)`` restores it; ``like`` (a pytree of arrays or
``jax.ShapeDtypeStruct``) fixes shapes, dtypes and shardings, otherwise the stored ones are used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_cachedattn.model.config import ModelConfig


def _config_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".config.json")


def save_params(path: Any, params: Any, config: ModelConfig | None = None, *, force: bool = True) -> Path:
    """Write ``params`` as an orbax checkpoint at ``path`` (a folder; replaced when ``force``).

    With ``config``, its JSON goes to ``<path>.config.json`` beside the folder.
    """
    import orbax.checkpoint as ocp

    p = Path(path).absolute()
    p.parent.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(p, params, force=force)
        ckptr.wait_until_finished()
    if config is not None:
        _config_sidecar(p).write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    return p


def restore_params(path: Any, like: Any = None) -> Any:
    """Restore params saved by ``save_params``; ``like`` gives target shapes/dtypes (else as stored)."""
    import orbax.checkpoint as ocp

    p = Path(path).absolute()
    if not p.is_dir():
        raise FileNotFoundError(f"orbax checkpoint not found: {p}")
    target = None
    if like is not None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
                              if not isinstance(a, jax.ShapeDtypeStruct) else a, like)
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(p, target) if target is not None else ckptr.restore(p)


def load_config(path: Any) -> ModelConfig:
    """The ``ModelConfig`` written beside a checkpoint by ``save_params(..., config=...)``."""
    side = _config_sidecar(Path(path).absolute())
    if not side.is_file():
        raise FileNotFoundError(f"no config beside checkpoint: {side}")
    return ModelConfig.from_dict(json.loads(side.read_text()))


def params_fingerprint(config: ModelConfig, params: Any) -> str:
    """sha256 hex over the config JSON (minus its ``name``) and every leaf's path, dtype, shape and bytes.

    Two models get the same fingerprint only if every weight is bit-identical and the config matches:
    the KV store keys sessions on it so KV is never served across models. Hashing all bytes of
    SmolLM2 in float32 (540 MB) takes about a second; ``load_smollm2`` caches the result.
    """
    h = hashlib.sha256()
    h.update(json.dumps(config.identity_dict(), sort_keys=True).encode())
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for kp, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(kp)}|{a.dtype.str}|{a.shape}".encode())
        h.update(memoryview(a.view(np.uint8).reshape(-1)))
    return h.hexdigest()


# ---- the SmolLM2 cache --------------------------------------------------------------------------

def _file_key(path: Path, nbytes: int = 1 << 24) -> str:
    """sha256 of the first 16 MiB plus the file size: cheap, and distinct for different GGUFs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(nbytes))
    return f"{h.hexdigest()[:16]}-{path.stat().st_size}"


def load_smollm2(dtype: str = "float32", *, gguf_path: Any = None, cache: Any = None) -> tuple[ModelConfig, Any, Any]:
    """SmolLM2-135M-Instruct: ``(ModelConfig, params, Tokenizer)``.

    The first call dequantizes the GGUF (``smollm2_gguf_path()`` unless ``gguf_path``) and saves the
    params as an orbax checkpoint under ``<cache>/params/<gguf key>-<dtype>-v<converter>/``, with the
    config and the params fingerprint beside it; later calls restore that instead of dequantizing.
    The tokenizer's GGUF metadata is cached too (parsing the GGUF header alone takes ~3 s).
    """
    from jax_cachedattn import assets
    from jax_cachedattn.checkpoint import gguf as gguf_mod
    from jax_cachedattn.tokenizer import Tokenizer

    src = Path(gguf_path) if gguf_path is not None else assets.smollm2_gguf_path()
    root = Path(cache) if cache is not None else assets.cache_dir()
    entry = root / "params" / f"{_file_key(src)}-{dtype}-v{gguf_mod.CONVERTER_VERSION}"
    ckpt, meta_file, tok_file = entry / "params", entry / "meta.json", entry / "tokenizer.json"
    if meta_file.is_file() and ckpt.is_dir() and tok_file.is_file():
        meta = json.loads(meta_file.read_text())
        config = ModelConfig.from_dict(meta["config"])
        params = restore_params(ckpt)
        return config, params, Tokenizer.from_gguf_fields(json.loads(tok_file.read_text()))
    config, params, tokenizer = gguf_mod.load_gguf(src, dtype=dtype)
    tmp = root / "params" / f".{entry.name}.tmp-{os.getpid()}-{time.time_ns()}"
    save_params(tmp / "params", params)
    meta = {"config": config.to_dict(), "fingerprint": params_fingerprint(config, params), "source": str(src)}
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer.to_fields()))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks the entry complete
    try:
        os.replace(tmp, entry)  # atomic publish; a concurrent winner leaves ours to delete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return config, params, tokenizer


def smollm2_fingerprint(dtype: str = "float32", *, cache: Any = None, gguf_path: Any = None) -> str | None:
    """The cached fingerprint of converted SmolLM2 params, or None if not converted yet."""
    from jax_cachedattn import assets
    from jax_cachedattn.checkpoint import gguf as gguf_mod

    src = Path(gguf_path) if gguf_path is not None else assets.smollm2_gguf_path()
    root = Path(cache) if cache is not None else assets.cache_dir()
    meta_file = root / "params" / f"{_file_key(src)}-{dtype}-v{gguf_mod.CONVERTER_VERSION}" / "meta.json"
    return json.loads(meta_file.read_text())["fingerprint"] if meta_file.is_file() else None
