"""Rotary position embedding, applied at attention time (decoupled from the cache).

Keys are cached *before* RoPE; every attention call rotates queries and keys by the positions they
have in the *current* context, so dropping the oldest tokens just renumbers the rest from 0.
Convention: Hugging Face ``rotate_half`` (the first and second halves of a head form the pairs).

Inverse frequencies (plain, ``linear`` and ``llama3`` scaled) are computed on the host in float32
with the operations, in the order, that transformers' ``modeling_rope_utils`` uses, so the angles match
its to the bit; they are constants of the traced program.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jax_cachedattn.model.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies ``[Dh/2]`` float32, as transformers' ``ROPE_INIT_FUNCTIONS`` compute them."""
    f32 = np.float32
    inv_freq = (f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(f32) / f32(head_dim))))
    if scaling is None:
        return inv_freq.astype(f32)
    factor = f32(scaling.factor)
    if scaling.type == "linear":
        return (inv_freq / factor).astype(f32)
    if scaling.type == "factors":  # llama.cpp: theta_i / freq_factor_i
        return (inv_freq / np.asarray(scaling.freq_factors, f32)).astype(f32)
    # llama3: long wavelengths divided by factor, short kept, the band between interpolated.
    old = f32(scaling.original_max_position)
    lo, hi = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    low_freq_wavelen, high_freq_wavelen = old / lo, old / hi
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
    smooth = ((old / wavelen - lo) / (hi - lo)).astype(f32)
    smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_tables(positions: jnp.ndarray, head_dim: int, theta: float,
                scaling: RopeScaling | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables ``[T, Dh]`` (float32) for integer ``positions`` ``[T]``."""
    inv_freq = jnp.asarray(rope_inv_freq(head_dim, theta, scaling))  # [Dh/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # each pair's two halves share an angle: half the work
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` ``[T, N, Dh]`` by tables ``[T, Dh]``; computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.astype(x.dtype)
