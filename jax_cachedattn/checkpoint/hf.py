"""Load a local Hugging Face folder (``config.json`` + ``*.safetensors``) of a Llama 2/3.x, Mistral or
Qwen2/2.5 model into our params pytree.

Hugging Face stores linear weights as ``[out, in]``; ours are ``[in, out]`` (``x @ w``), so every
projection is transposed. RoPE needs no permutation: both use the "rotate_half" convention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from jax_cachedattn.model.config import ModelConfig, RopeScaling


class HFCheckpointError(ValueError):
    """The folder is not a loadable Hugging Face checkpoint of a supported family."""


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


SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
HF_ROPE_SCALING_TYPES = ("linear", "llama3")
"""One code path; the differences between these families are fields of ``ModelConfig``."""


_BIAS_MAP = {  # Qwen2
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
}


def _rope_scaling(hf: dict[str, Any]) -> tuple[float | None, RopeScaling | None]:
    """``(rope_theta, RopeScaling or None)`` from ``rope_scaling`` (transformers < 5) or ``rope_parameters`` (>= 5)."""
    rp = hf.get("rope_parameters")
    rs = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(rp, dict) and "rope_theta" in rp and not isinstance(rp.get("rope_theta"), dict):
        theta = rp["rope_theta"] if theta is None else theta
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        raise HFCheckpointError(f"per-layer rope_parameters {rp!r} are not supported")
    spec = rs if rs not in (None, {}) else rp if isinstance(rp, dict) else None
    kind = (spec or {}).get("rope_type", (spec or {}).get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind not in HF_ROPE_SCALING_TYPES:
        raise HFCheckpointError(f"RoPE scaling type {kind!r} is not supported (supported: {', '.join(HF_ROPE_SCALING_TYPES)})")
    try:
        if kind == "linear":
            return theta, RopeScaling("linear", float(spec["factor"]))
        return theta, RopeScaling("llama3", float(spec["factor"]), float(spec["low_freq_factor"]),
                                  float(spec["high_freq_factor"]), int(spec["original_max_position_embeddings"]))
    except KeyError as e:
        raise HFCheckpointError(f"{kind} RoPE scaling lacks {e.args[0]!r}: {spec!r}") from e
    except ValueError as e:
        raise HFCheckpointError(str(e)) from e


def _refuse_sliding_window(hf: dict[str, Any], mt: str) -> None:
    """Sliding-window attention is not implemented: refuse a config in which a window is active."""
    window = hf.get("sliding_window")
    ctx = hf.get("max_position_embeddings")
    if mt == "qwen2":
        active = bool(hf.get("use_sliding_window")) and window is not None
    else:
        active = window is not None and (ctx is None or int(window) < int(ctx))
    if active:
        raise HFCheckpointError(
            f"{mt} config uses sliding-window attention (sliding_window={window}, context {ctx}), which is not "
            f"supported yet; only checkpoints without an active window (e.g. Mistral-7B v0.2+) load")


def config_from_hf(hf: dict[str, Any], dtype: str | None = None, name: str = "hf") -> ModelConfig:
    """``ModelConfig`` from a Hugging Face ``config.json`` dict of a Llama, Mistral or Qwen2 model."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFCheckpointError(f"unsupported model_type {mt!r}: supported are {', '.join(SUPPORTED_MODEL_TYPES)}")
    theta, scaling = _rope_scaling(hf)
    _refuse_sliding_window(hf, mt)
    if hf.get("mlp_bias"):
        raise HFCheckpointError("mlp_bias=True is not supported")
    if hf.get("attention_bias"):  # Llama's flag biases o_proj too; Qwen2's q/k/v biases need no flag
        raise HFCheckpointError("attention_bias=True is not supported")
    attn_bias = mt == "qwen2"
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFCheckpointError(f"hidden_act {act!r} is not supported (only silu)")
    if float(hf.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise HFCheckpointError(f"partial_rotary_factor {hf['partial_rotary_factor']} is not supported")
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
            max_context=int(hf.get("max_position_embeddings", 2048)), dtype=dtype, name=name,
            attn_bias=attn_bias, rope_scaling=scaling)
    except KeyError as e:
        raise HFCheckpointError(f"config.json lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise HFCheckpointError(f"config.json is not a usable {mt} config: {e}") from e


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
    hf = read_hf_config(folder)
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

    layer_map = dict(_LAYER_MAP)
    if cfg.attn_bias:
        layer_map.update(_BIAS_MAP)
        shapes.update(bq=(H * Dh,), bk=(K * Dh,), bv=(K * Dh,))
    layers: dict[str, list[np.ndarray]] = {ours: [] for ours, _ in layer_map.values()}
    for i in range(cfg.num_layers):
        for suffix, (ours, transpose) in layer_map.items():
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


def read_hf_config(path: Any) -> dict[str, Any]:
    """The ``config.json`` dict of a Hugging Face folder (FileNotFoundError / HFCheckpointError)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder not found: {folder}")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    try:
        hf = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{cfg_path} is not a JSON object")
    return hf


def load_hf(path: Any, dtype: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a local Hugging Face folder (Llama/Mistral/Qwen2): ``(ModelConfig, params)`` with jnp arrays in ``dtype``.

    ``dtype`` defaults to the checkpoint's ``torch_dtype`` (float32 when absent or unsupported).
    Raises ``FileNotFoundError`` (no folder / no config.json) or ``HFCheckpointError`` (a ``ValueError``:
    unsupported model_type or RoPE scaling, an active sliding window, missing/corrupt/truncated safetensors, shape mismatch).
    """
    import jax
    import jax.numpy as jnp

    cfg, np_params = load_hf_numpy(path, dtype)
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, dtype=cfg.jnp_dtype), np_params)
