"""Load a local Hugging Face Llama folder (``config.json`` + ``*.safetensors``) into our params pytree.

Hugging Face stores linear weights as ``[out, in]``; ours are ``[in, out]`` (``x @ w``), so every
projection is transposed. RoPE needs no permutation: both use the "rotate_half" convention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jax_cachedattn.model.config import ModelConfig


class HFCheckpointError(ValueError):
    """The folder is not a loadable Hugging Face Llama checkpoint."""


_LAYER_MAP = {  # HF suffix after ``model.layers.{i}.`` -> (our name, transpose)
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}


def config_from_hf(hf: dict[str, Any], dtype: str | None = None, name: str = "hf") -> ModelConfig:
    """``ModelConfig`` from a Hugging Face Llama ``config.json`` dict."""
    mt = hf.get("model_type")
    if mt != "llama":
        raise HFCheckpointError(f"unsupported model_type {mt!r}: only 'llama' is supported")
    if hf.get("rope_scaling") not in (None, {}):
        raise HFCheckpointError(f"rope_scaling {hf['rope_scaling']!r} is not supported (only None)")
    rp = hf.get("rope_parameters")  # transformers >= 5 writes rope_theta here
    if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
        raise HFCheckpointError(f"rope_parameters {rp!r} is not supported (only the default rope_type)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise HFCheckpointError(f"{flag}=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    theta = hf.get("rope_theta")
    if theta is None and isinstance(rp, dict):
        theta = rp.get("rope_theta")
    try:
        H = int(hf["num_attention_heads"])
        D = int(hf["hidden_size"])
        if dtype is None:
            td = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
            dtype = td if td in ("float32", "bfloat16", "float16") else "float32"
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), d_model=D, num_layers=int(hf["num_hidden_layers"]), num_heads=H,
            num_kv_heads=int(hf.get("num_key_value_heads") or H), head_dim=int(hf.get("head_dim") or D // H),
            ffn_dim=int(hf["intermediate_size"]), rope_theta=float(theta if theta is not None else 10000.0),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_context=int(hf.get("max_position_embeddings", 2048)), dtype=dtype, name=name)
    except KeyError as e:
        raise HFCheckpointError(f"config.json lacks {e.args[0]!r}") from e


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise HFCheckpointError(f"{folder}: shards named in the index are missing: {missing}")
        paths = [folder / f for f in files]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise HFCheckpointError(f"{folder} has no *.safetensors files")
    out: dict[str, np.ndarray] = {}
    for p in paths:
        try:
            out.update(load_file(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFCheckpointError(f"{p} is not a readable safetensors file (corrupt or truncated?): {e}") from e
        except TypeError as e:  # bfloat16 has no numpy dtype in safetensors' numpy path
            out.update(_load_via_torch(p, e))
    return out


def _load_via_torch(p: Path, cause: Exception) -> dict[str, np.ndarray]:
    try:
        from safetensors.torch import load_file
        import torch
    except ImportError:
        raise HFCheckpointError(f"{p}: cannot read with numpy ({cause}) and torch is not installed") from cause
    return {k: v.to(torch.float32).numpy() for k, v in load_file(p).items()}


def load_hf_numpy(path: Any, dtype: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """``(config, params as numpy arrays in their stored dtype)``; the work behind ``load_hf``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    cfg = config_from_hf(hf, dtype, name=folder.name)
    t = _read_tensors(folder)
    D, H, K, Dh, F, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    shapes = {"attn_norm": (D,), "mlp_norm": (D,), "wq": (H * Dh, D), "wk": (K * Dh, D), "wv": (K * Dh, D),
              "wo": (D, H * Dh), "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F)}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in t:
            raise HFCheckpointError(f"{folder}: tensor {name!r} is missing")
        a = t[name]
        if a.shape != shape:
            raise HFCheckpointError(f"{folder}: tensor {name!r} has shape {a.shape}, config implies {shape}")
        return a

    layers: dict[str, list[np.ndarray]] = {ours: [] for ours, _ in _LAYER_MAP.values()}
    for i in range(cfg.num_layers):
        for suffix, (ours, transpose) in _LAYER_MAP.items():
            a = get(f"model.layers.{i}.{suffix}", shapes[ours])
            layers[ours].append(a.T if transpose else a)
    params: dict[str, Any] = {
        "embed": get("model.embed_tokens.weight", (V, D)),
        "layers": {k: np.stack(v) for k, v in layers.items()},
        "final_norm": get("model.norm.weight", (D,)),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("lm_head.weight", (V, D)).T)
    return cfg, params


def load_hf(path: Any, dtype: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a local Hugging Face Llama folder: ``(ModelConfig, params)`` with jnp arrays in ``dtype``.

    ``dtype`` defaults to the checkpoint's ``torch_dtype`` (float32 when absent or unsupported).
    Raises ``FileNotFoundError`` (no folder / no config.json) or ``HFCheckpointError`` (a ``ValueError``:
    non-llama model_type, rope_scaling, missing/corrupt/truncated safetensors, shape mismatch).
    """
    import jax
    import jax.numpy as jnp

    cfg, np_params = load_hf_numpy(path, dtype)
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.jnp_dtype), np_params)
