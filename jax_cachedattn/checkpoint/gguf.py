"""Load a Llama-architecture (llama, qwen2) GGUF file (llama.cpp format) into a ``ModelConfig`` and a params pytree.

Quantized tensors are dequantized with ``gguf.quants.dequantize`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
K-quants, F16, BF16, F32). Shapes: ggml lists dims innermost-first, so a tensor with ggml shape
``[in, out]`` is a numpy ``[out, in]`` array, i.e. Hugging Face's ``weight`` layout; we transpose it
to the ``[in, out]`` layout of ``jax_cachedattn.model``. llama.cpp's converter permutes the rows of
``q_proj``/``k_proj`` (interleaved RoPE pairs); ``_unpermute`` undoes that, giving back the rows of
Hugging Face's "rotate_half" convention.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jax_cachedattn.gguf_file import GGUFError, dequantize as _dequantize, open_gguf, reader_metadata
from jax_cachedattn.gguf_file import read_gguf_metadata  # noqa: F401  (re-exported)
from jax_cachedattn.model.config import ModelConfig, RopeScaling
from jax_cachedattn.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
"""llama.cpp writes Llama 2/3.x and Mistral as ``llama`` (q/k rows permuted), Qwen2/2.5 as ``qwen2`` (not permuted, q/k/v biases)."""

CONVERTER_VERSION = 1
"""Bump when the conversion's output changes, so caches keyed on it are rebuilt."""


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's ``permute``: rows ``[n_head, Dh/2, 2]`` -> ``[n_head, 2, Dh/2]``."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_from_meta(meta: dict[str, Any], has_output: bool, dtype: str, name: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture {arch!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is None:
            raise GGUFError(f"GGUF metadata lacks {full!r}")
        return default

    d_model = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else int(get("vocab_size"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_head))
    kind = meta.get(f"{arch}.rope.scaling.type")
    scaling = None
    if kind == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise GGUFError(f"RoPE scaling {kind!r} is not supported (supported: linear)")
    window = meta.get(f"{arch}.attention.sliding_window")
    if window and int(window) < int(get("context_length", 2048)):
        raise GGUFError(f"sliding-window attention (window {window}) is not supported yet")
    return ModelConfig(
        vocab_size=vocab, d_model=d_model, num_layers=int(get("block_count")), num_heads=n_head,
        num_kv_heads=int(get("attention.head_count_kv", n_head)), head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")), rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)), tie_embeddings=not has_output,
        max_context=int(get("context_length", 2048)), dtype=dtype, name=name, attn_bias=arch == "qwen2",
        rope_scaling=scaling)


_LAYER_MAP = {  # gguf name -> (our name, transpose to [in, out])
    "attn_norm": ("attn_norm", False), "attn_q": ("wq", True), "attn_k": ("wk", True), "attn_v": ("wv", True),
    "attn_output": ("wo", True), "ffn_norm": ("mlp_norm", False), "ffn_gate": ("w_gate", True),
    "ffn_up": ("w_up", True), "ffn_down": ("w_down", True),
}


def load_gguf_numpy(path: Any) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """``(config, params as float32 numpy, metadata)``; the work behind ``load_gguf``."""
    reader = open_gguf(path)
    meta = reader_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    name = str(meta.get("general.name") or Path(path).stem)
    cfg = _config_from_meta(meta, "output.weight" in tensors, "float32", name)
    if "rope_freqs.weight" in tensors:  # llama.cpp's form of Llama 3.1 ``llama3`` scaling
        if cfg.rope_scaling is not None:
            raise GGUFError(f"{path}: both rope_freqs and RoPE scaling {cfg.rope_scaling.type!r}; cannot combine them")
        f = _dequantize(tensors["rope_freqs.weight"]).reshape(-1)
        if f.shape != (cfg.head_dim // 2,):
            raise GGUFError(f"tensor 'rope_freqs.weight' has {f.size} entries, head_dim {cfg.head_dim} needs {cfg.head_dim // 2}")
        cfg = cfg.replace(rope_scaling=RopeScaling("factors", float(f.max()), freq_factors=tuple(f.tolist())))
    permuted = meta.get("general.architecture") == "llama"
    L = cfg.num_layers

    def need(n: str) -> Any:
        if n not in tensors:
            raise GGUFError(f"GGUF file {path} lacks tensor {n!r}")
        return tensors[n]

    def expect(n: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if arr.shape != shape:
            raise GGUFError(f"tensor {n!r} has shape {arr.shape}, expected {shape} from the metadata")
        return arr

    D, H, K, Dh, F, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    hf_shapes = {"attn_norm": (D,), "ffn_norm": (D,), "attn_q": (H * Dh, D), "attn_k": (K * Dh, D),
                 "attn_v": (K * Dh, D), "attn_output": (D, H * Dh), "ffn_gate": (F, D), "ffn_up": (F, D),
                 "ffn_down": (D, F)}
    layers: dict[str, list[np.ndarray]] = {ours: [] for ours, _ in _LAYER_MAP.values()}
    for i in range(L):
        for g, (ours, transpose) in _LAYER_MAP.items():
            n = f"blk.{i}.{g}.weight"
            w = expect(n, _dequantize(need(n)), hf_shapes[g])
            if g == "attn_q" and permuted:
                w = _unpermute(w, H)
            elif g == "attn_k" and permuted:
                w = _unpermute(w, K)
            layers[ours].append(np.ascontiguousarray(w.T) if transpose else w)
        if cfg.attn_bias:
            for g, ours, width in (("attn_q", "bq", H * Dh), ("attn_k", "bk", K * Dh), ("attn_v", "bv", K * Dh)):
                n = f"blk.{i}.{g}.bias"
                layers.setdefault(ours, []).append(expect(n, _dequantize(need(n)), (width,)))
    params: dict[str, Any] = {
        "embed": expect("token_embd.weight", _dequantize(need("token_embd.weight")), (V, D)),
        "layers": {k: np.stack(v) for k, v in layers.items()},
        "final_norm": expect("output_norm.weight", _dequantize(need("output_norm.weight")), (D,)),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(expect("output.weight", _dequantize(tensors["output.weight"]), (V, D)).T)
    return cfg, params, meta


def load_gguf(path: Any, dtype: str = "float32") -> tuple[ModelConfig, dict[str, Any], Any]:
    """Load a llama or qwen2 GGUF: ``(ModelConfig, params (jnp arrays in dtype), Tokenizer)``.

    Raises ``FileNotFoundError`` for a missing file and ``GGUFError`` (a ``ValueError``) for a corrupt
    or truncated file, an unsupported architecture or an unsupported quantization type.
    """
    import jax
    import jax.numpy as jnp

    cfg, np_params, meta = load_gguf_numpy(os.fspath(path))
    cfg = cfg.replace(dtype=dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.jnp_dtype), np_params)
    return cfg, params, Tokenizer.from_gguf_fields(meta)
