"""Model configuration: one frozen dataclass, named presets in ``configs/``.

Params pytree layout (all arrays ``[in, out]`` so ``x @ w``; layers stacked on a leading axis ``L``)::

    params = {
      "embed":      [V, D],
      "layers": {
        "attn_norm": [L, D],
        "wq":        [L, D, H*Dh],   # RoPE convention: Hugging Face "rotate_half" (first/second halves)
        "wk":        [L, D, K*Dh],
        "wv":        [L, D, K*Dh],
        "bq", "bk", "bv": [L, H*Dh], [L, K*Dh], [L, K*Dh]   # only when ``attn_bias`` (Qwen2)
        "wo":        [L, H*Dh, D],
        "mlp_norm":  [L, D],
        "w_gate":    [L, D, F],
        "w_up":      [L, D, F],
        "w_down":    [L, F, D],
      },
      "final_norm": [D],
      "lm_head":    [D, V],         # absent when ``tie_embeddings`` (logits = x @ embed.T)
    }

Legend: V vocab, D d_model, L layers, H query heads, K kv heads, Dh head dim, F ffn hidden.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

_DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("linear", "llama3", "factors")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Scaled RoPE frequencies, as Hugging Face's ``rope_scaling`` (``rope_parameters``) describes them.

    ``linear``: every inverse frequency divided by ``factor``. ``llama3`` (Llama 3.1/3.2/3.3): wavelengths
    longer than ``original_max_position / low_freq_factor`` divided by ``factor``, shorter than
    ``original_max_position / high_freq_factor`` kept, the band between interpolated smoothly.
    ``factors``: each inverse frequency divided by its own entry of ``freq_factors`` (llama.cpp's
    ``rope_freqs`` tensor, the form in which GGUF files carry ``llama3`` scaling).
    """

    type: str
    """``linear`` or ``llama3``."""
    factor: float
    """Scale of the low frequencies (``linear``: of all of them); > 0."""
    low_freq_factor: float = 1.0
    """``llama3`` only."""
    high_freq_factor: float = 4.0
    """``llama3`` only; > ``low_freq_factor``."""
    original_max_position: int = 8192
    """``llama3`` only: the context length the model was pretrained with."""
    freq_factors: tuple[float, ...] = ()
    """``factors`` only: one divisor per inverse frequency (``head_dim / 2`` of them)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "freq_factors", tuple(float(f) for f in self.freq_factors))  # JSON lists -> hashable
        if (self.type == "factors") != bool(self.freq_factors) or not all(f > 0 for f in self.freq_factors):
            raise ValueError("RoPE scaling 'factors' needs positive freq_factors, and only it takes them")
        if self.type not in ROPE_SCALING_TYPES:
            raise ValueError(f"RoPE scaling type {self.type!r} is not supported (supported: {', '.join(ROPE_SCALING_TYPES)})")
        if not self.factor > 0:
            raise ValueError(f"RoPE scaling factor must be positive, got {self.factor!r}")
        if self.type == "llama3" and not (self.high_freq_factor > self.low_freq_factor > 0 and self.original_max_position > 0):
            raise ValueError(f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor > 0 and "
                             f"original_max_position > 0, got {self}")


#: Fields added after stores were first keyed on the config: hashed into a fingerprint only when they differ
#: from their default, so the fingerprints (and stores) of models that do not use them stay as they were.
_LATER_FIELDS = {"attn_bias": False, "rope_scaling": None}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-architecture decoder. Hashable, so it can be a static argument of ``jit``."""

    vocab_size: int
    """V: number of token ids; valid ids are ``0 <= id < vocab_size``."""
    d_model: int
    """D: width of the residual stream."""
    num_layers: int
    """L: number of decoder blocks."""
    num_heads: int
    """H: query heads."""
    num_kv_heads: int
    """K: key/value heads (GQA when ``K < H``, MQA when ``K == 1``); must divide ``H``."""
    head_dim: int
    """Dh: width of one head (even, RoPE rotates pairs)."""
    ffn_dim: int
    """F: hidden width of the SwiGLU MLP."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_eps: float = 1e-5
    """Epsilon inside RMSNorm."""
    tie_embeddings: bool = False
    """When true the output projection is the transposed input embedding."""
    max_context: int = 2048
    """Context window in tokens (history + new tokens of one turn)."""
    dtype: str = "float32"
    """Dtype of params, activations and the KV cache: float32, bfloat16 or float16."""
    name: str = "custom"
    """Preset name, for reports."""
    attn_bias: bool = False
    """Biases on the q/k/v projections (Qwen2); params then hold ``bq``, ``bk``, ``bv``."""
    rope_scaling: RopeScaling | None = None
    """Scaled RoPE frequencies (Llama 3.1+ ``llama3``, ``linear``); None for plain RoPE."""

    def __post_init__(self) -> None:
        for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "max_context"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelConfig.{f} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_eps <= 0:
            raise ValueError("rope_theta and rms_eps must be positive")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and self.rope_scaling.freq_factors and \
                len(self.rope_scaling.freq_factors) != self.head_dim // 2:
            raise ValueError(f"RoPE freq_factors has {len(self.rope_scaling.freq_factors)} entries, "
                             f"head_dim {self.head_dim} needs {self.head_dim // 2}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def jnp_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def group_size(self) -> int:
        """G: query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of pre-RoPE K plus V for one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * np.dtype(self.jnp_dtype).itemsize

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """What names this model's computation (for fingerprints): ``to_dict`` without ``name``, and
        without fields added later while they hold their defaults (older fingerprints stay valid)."""
        return {k: v for k, v in self.to_dict().items()
                if k != "name" and not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """Load ``configs/model/<name>.json`` (e.g. ``tiny``, ``smollm2-135m``, ``llama2-7b``)."""
        path = configs_dir() / "model" / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in (configs_dir() / "model").glob("*.json"))
            raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
        d = json.loads(path.read_text())
        d.setdefault("name", name)
        d.update(overrides)
        return cls.from_dict(d)


def configs_dir() -> Path:
    """The ``configs/`` folder: ``$CACHEDATTN_CONFIGS`` or the one beside the package."""
    env = os.environ.get("CACHEDATTN_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"
