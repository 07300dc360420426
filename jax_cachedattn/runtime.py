"""Wiring for applications: load a model, open its store, build an engine.

Sits above ``checkpoint``, ``store`` and ``engine``; the command line and scripts use it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.model import ModelConfig
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

MiB = 1 << 20


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    params: Any
    tokenizer: Any
    fingerprint: str


def load_model(name: str = "smollm2", dtype: str = "float32") -> LoadedModel:
    """``smollm2`` (the bundled SmolLM2-135M-Instruct GGUF, converted once and cached)."""
    if name != "smollm2":
        raise ValueError(f"unknown model {name!r}: only 'smollm2' ships with the package")
    from jax_cachedattn.checkpoint import load_smollm2, params_fingerprint, smollm2_fingerprint

    config, params, tokenizer = load_smollm2(dtype)
    fp = smollm2_fingerprint(dtype) or params_fingerprint(config, params)
    return LoadedModel(config, params, tokenizer, fp)


def kv_layout(config: ModelConfig, fingerprint: str) -> KVLayout:
    return KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, config.dtype, fingerprint)


def open_store(root: str | Path, layout: KVLayout, *, device_mib: int = 512, host_mib: int = 2048,
               disk_mib: int | None = None, compression: str | None = None) -> TieredStore:
    Path(root).mkdir(parents=True, exist_ok=True)
    cfg = StoreConfig(root=str(Path(root).resolve()), device_bytes=device_mib * MiB, host_bytes=host_mib * MiB,
                      disk_bytes=None if disk_mib is None else disk_mib * MiB, compression=compression,
                      keep_tokens_on_mismatch=True)  # another model's KV: keep the conversations, recompute
    return TieredStore(cfg, layout)


def open_engine(store_dir: str | Path | None, *, model: LoadedModel | None = None, engine_config: EngineConfig | None = None,
                **store_kwargs: Any) -> Engine:
    """An engine over the store at ``store_dir``. The engine's paged pool is the device tier:
    ``device_mib`` sizes the pool (unless ``engine_config.pool_tokens`` is set) and the store's own
    device tier is off (budget 0), so a session's KV is never held twice on the device. A model loaded
    here is owned by the engine (its stacked layer weights are freed once unstacked)."""
    own = model is None
    m = model or load_model()
    ec = engine_config or EngineConfig()
    device_mib = store_kwargs.pop("device_mib", 512)
    if ec.pool_tokens is None:
        ec = ec.replace(pool_tokens=max(m.config.max_context, device_mib * MiB // m.config.kv_bytes_per_token))
    store = None
    if store_dir is not None:
        store = open_store(store_dir, kv_layout(m.config, m.fingerprint), device_mib=0, **store_kwargs)
    return Engine(m.config, m.params, store, m.tokenizer, ec, own_params=own)
