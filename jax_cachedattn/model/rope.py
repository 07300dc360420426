"""Rotary position embedding, applied at attention time (decoupled from the cache).

Keys are cached *before* RoPE; every attention call rotates queries and keys by the positions they
have in the *current* context, so dropping the oldest tokens just renumbers the rest from 0.
Convention: Hugging Face ``rotate_half`` (the first and second halves of a head form the pairs).
"""

from __future__ import annotations

import jax.numpy as jnp


def rope_tables(positions: jnp.ndarray, head_dim: int, theta: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables ``[T, Dh]`` (float32) for integer ``positions`` ``[T]``."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
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
