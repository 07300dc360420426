"""Wiring for applications: load a model, open its store, build an engine.

Sits above ``checkpoint``, ``store`` and ``engine``; the command line and scripts use it.
"""

from __future__ import annotations

import dataclasses
import os
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
    spec: str = "smollm2"
    """The ``--model`` spec it was loaded from."""


class ModelSpecError(ValueError):
    """A ``--model`` spec that names nothing loadable (missing file, unsupported family, corrupt weights)."""


MODEL_SPEC_HELP = ("smollm2 (the bundled SmolLM2-135M-Instruct, default), a Hugging Face folder (config.json, "
                   "*.safetensors, tokenizer.json, tokenizer_config.json) of a Llama 2/3.x, Mistral or Qwen2/2.5 model, "
                   "a .gguf file (llama or qwen2), or a checkpoint folder written by `cachedattn import-hf`")


def model_kind(spec: str) -> str:
    """``smollm2``, ``imported``, ``hf`` or ``gguf``: what ``spec`` names (ModelSpecError if nothing loadable)."""
    if spec == "smollm2":
        return "smollm2"
    from jax_cachedattn.checkpoint import is_imported

    p = Path(spec).expanduser()
    if p.is_dir():
        if is_imported(p):
            return "imported"
        if (p / "config.json").is_file():
            return "hf"
        raise ModelSpecError(f"--model {spec}: the folder has neither config.json (a Hugging Face folder) nor "
                             f"meta.json + params/ (an import-hf checkpoint)")
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ModelSpecError(f"--model {spec}: the file is not a GGUF file")
    raise ModelSpecError(f"--model {spec}: no such file or folder (expected {MODEL_SPEC_HELP})")


def load_model(spec: str = "smollm2", dtype: str = "float32") -> LoadedModel:
    """Load the model ``spec`` names (see :data:`MODEL_SPEC_HELP`) with its tokenizer and chat template.

    The fingerprint names the store's layout: sha256 over the config and every weight's bytes (cached
    for ``smollm2`` and import-hf checkpoints). Raises :class:`ModelSpecError` (a ``ValueError``) with a
    one-line reason for anything that cannot be loaded.
    """
    from jax_cachedattn.checkpoint import params_fingerprint

    kind = model_kind(spec)
    path = str(Path(spec).expanduser())
    try:
        if kind == "smollm2":
            from jax_cachedattn.checkpoint import load_smollm2, smollm2_fingerprint

            config, params, tokenizer = load_smollm2(dtype)
            return LoadedModel(config, params, tokenizer, smollm2_fingerprint(dtype) or params_fingerprint(config, params), spec)
        if kind == "gguf":
            from jax_cachedattn.checkpoint import load_gguf

            config, params, tokenizer = load_gguf(path, dtype=dtype)
            return LoadedModel(config, params, tokenizer, params_fingerprint(config, params), spec)
        if kind == "hf":
            from jax_cachedattn.checkpoint import load_hf
            from jax_cachedattn.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_hf_folder(path)  # before the weights: a broken tokenizer fails fast
            config, params = load_hf(path, dtype=dtype)
            return LoadedModel(config, params, tokenizer, params_fingerprint(config, params), spec)
        from jax_cachedattn.checkpoint import load_imported

        config, params, tokenizer, fp = load_imported(path)
        if dtype is not None and dtype != config.dtype:
            import jax
            import jax.numpy as jnp

            config = config.replace(dtype=dtype)
            params = jax.tree.map(lambda a: jnp.asarray(a, dtype=config.jnp_dtype), params)
            fp = params_fingerprint(config, params)
        return LoadedModel(config, params, tokenizer, fp, spec)
    except FileNotFoundError as e:
        raise ModelSpecError(f"--model {spec}: {e}") from e
    except ValueError as e:
        if isinstance(e, ModelSpecError):
            raise
        raise ModelSpecError(f"--model {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


XLA_CACHE_MAX_BYTES = 4 << 30  # the persistent compilation cache evicts least recently used programs beyond this


def enable_compilation_cache(enabled: bool = True) -> str | None:
    """Persist compiled programs across processes in ``<cache_dir>/xla`` (``$CACHEDATTN_NO_XLA_CACHE`` or
    ``enabled=False`` opts out). A cache folder the application already set is kept. Entries are read and written
    under a file lock (several processes may share the folder) and the folder is kept under
    ``XLA_CACHE_MAX_BYTES``, least recently used out first. Returns the folder in use."""
    import jax

    current = jax.config.jax_compilation_cache_dir
    if not enabled or os.environ.get("CACHEDATTN_NO_XLA_CACHE"):
        return current
    if current:
        return current
    from jax.experimental.compilation_cache import compilation_cache as cc

    from jax_cachedattn.assets import cache_dir

    path = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_max_size == -1:
        # jax reads and writes entries under a file lock only when the cache has a size limit; without it a
        # process can read an entry another cachedattn process is still writing (a torn executable).
        jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_MAX_BYTES)
    _stamp_unstamped_entries(Path(path))
    cc.reset_cache()  # a process that compiled before has checked the (then unset) cache: look again
    return path


def _stamp_unstamped_entries(folder: Path) -> None:
    """Give every cached program without an access-time file one dated 0 (least recently used).

    A size-limited jax cache reads the access time of every entry before each write; an entry written without a
    limit (an older cachedattn, or an application's own jax settings) has none, and then every later write fails.
    Runs under the lock jax takes for the folder."""
    import filelock

    if not folder.is_dir():
        return
    with filelock.FileLock(folder / ".lockfile", timeout=30):
        for entry in folder.glob("*-cache"):
            stamp = folder / (entry.name.removesuffix("-cache") + "-atime")
            if not stamp.exists():
                stamp.write_bytes((0).to_bytes(8, "little"))


def kv_layout(config: ModelConfig, fingerprint: str) -> KVLayout:
    return KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, config.dtype, fingerprint)


def open_store(root: str | Path, layout: KVLayout, *, device_mib: int = 512, host_mib: int = 2048,
               disk_mib: int | None = None, compression: str | None = None) -> TieredStore:
    Path(root).mkdir(parents=True, exist_ok=True)
    cfg = StoreConfig(root=str(Path(root).resolve()), device_bytes=device_mib * MiB, host_bytes=host_mib * MiB,
                      disk_bytes=None if disk_mib is None else disk_mib * MiB, compression=compression,
                      keep_tokens_on_mismatch=True)  # another model's KV: keep the conversations, recompute
    return TieredStore(cfg, layout)


def open_engine(store_dir: str | Path | None, *, model: LoadedModel | str | None = None,
                engine_config: EngineConfig | None = None, compilation_cache: bool = True, **store_kwargs: Any) -> Engine:
    """An engine over ``model`` (a :class:`LoadedModel` or a spec for :func:`load_model`; default ``smollm2``)
    and the store at ``store_dir`` (None: no store). Turns on JAX's persistent compilation cache unless
    ``compilation_cache=False`` or ``$CACHEDATTN_NO_XLA_CACHE`` is set, so a new process does not recompile.
    The engine's paged pool is the device tier: ``device_mib`` sizes the pool (unless
    ``engine_config.pool_tokens`` is set) and the store's own device tier is off (budget 0), so a session's
    KV is never held twice on the device. A model loaded here is owned by the engine (its stacked layer
    weights are freed once unstacked)."""
    enable_compilation_cache(compilation_cache)
    own = not isinstance(model, LoadedModel)
    m = model if isinstance(model, LoadedModel) else load_model(model or "smollm2")
    ec = engine_config or EngineConfig()
    device_mib = store_kwargs.pop("device_mib", 512)
    if ec.pool_tokens is None:
        ec = ec.replace(pool_tokens=max(m.config.max_context, device_mib * MiB // m.config.kv_bytes_per_token))
    store = None
    if store_dir is not None:
        store = open_store(store_dir, kv_layout(m.config, m.fingerprint), device_mib=0, **store_kwargs)
    return Engine(m.config, m.params, store, m.tokenizer, ec, own_params=own)
