"""Next-token selection: greedy or temperature (with optional top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits: jnp.ndarray, key: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0) -> jnp.ndarray:
    """Pick a token from ``logits [V]``: argmax when ``temperature == 0``, else a categorical draw."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1)
    if key is None:
        raise ValueError("temperature sampling needs a PRNG key")
    return _sample_temp(logits, key, temperature, top_p)


@jax.jit
def _sample_temp(logits, key, temperature, top_p):
    z = logits.astype(jnp.float32) / temperature
    sorted_z = jnp.sort(z)[::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_z))
    cutoff = sorted_z[jnp.minimum(jnp.searchsorted(cum, top_p), z.shape[-1] - 1)]
    z = jnp.where(z < cutoff, -jnp.inf, z)
    return jax.random.categorical(key, z)
