"""Whole-model entry points: init, the cache-free reference forward, cached prefill, decode.

Shapes (one sequence, no batch axis): tokens ``[T]`` int32; a full KV cache is
``[L, 2, S, K, Dh]`` (pre-RoPE keys at index 0, values at 1), S a capacity with the valid
length carried separately, so a layer's K/V can move between memory tiers on its own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.model.config import ModelConfig
from jax_cachedattn.model.layers import TRACE_COUNTS, layer_rope_tables, layer_step, rms_norm


class TokenError(ValueError):
    """Token ids that the model cannot take (empty, out of the vocabulary, too long)."""


def init_params(config: ModelConfig, key: jax.Array, norm_noise: float = 0.0) -> dict:
    """Random params in the layout of :mod:`jax_cachedattn.model.config` (std 0.02 projections).

    ``norm_noise > 0`` draws norm weights around 1 with that std, so scaling bugs show in tests.
    """
    V, D, L = config.vocab_size, config.d_model, config.num_layers
    H, K, Dh, F = config.num_heads, config.num_kv_heads, config.head_dim, config.ffn_dim
    dt = config.jnp_dtype
    ks = iter(jax.random.split(key, 16))

    def w(shape, std=0.02):
        return (std * jax.random.normal(next(ks), shape, jnp.float32)).astype(dt)

    def norm(shape):
        return (1.0 + norm_noise * jax.random.normal(next(ks), shape, jnp.float32)).astype(dt)

    params = {
        "embed": w((V, D)),
        "layers": {
            "attn_norm": norm((L, D)),
            "wq": w((L, D, H * Dh)),
            "wk": w((L, D, K * Dh)),
            "wv": w((L, D, K * Dh)),
            "wo": w((L, H * Dh, D)),
            "mlp_norm": norm((L, D)),
            "w_gate": w((L, D, F)),
            "w_up": w((L, D, F)),
            "w_down": w((L, F, D)),
        },
        "final_norm": norm((D,)),
    }
    if config.attn_bias:
        params["layers"].update(bq=w((L, H * Dh)), bk=w((L, K * Dh)), bv=w((L, K * Dh)))
    if not config.tie_embeddings:
        params["lm_head"] = w((D, V))
    return params


def validate_tokens(tokens, config: ModelConfig, *, what: str = "tokens") -> np.ndarray:
    """Return ``tokens`` as int32 numpy ``[T]`` or raise :class:`TokenError` with a clear reason."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise TokenError(f"{what} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        raise TokenError(f"{what} is empty: at least one token id is needed")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= config.vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise TokenError(f"{what}[{i}] = {int(arr[i])} is outside the vocabulary [0, {config.vocab_size})")
    return arr.astype(np.int32)


def layer_slice(params: dict, layer: int) -> dict:
    """One layer's params (no L axis)."""
    return jax.tree.map(lambda a: a[layer], params["layers"])


def unstack_layers(params: dict) -> list[dict]:
    """Per-layer param dicts, materialised once so per-layer steps do not slice on every call."""
    return [jax.tree.map(lambda a: jnp.asarray(a[i]), params["layers"]) for i in range(params["layers"]["wq"].shape[0])]


def embed(params: dict, tokens: jnp.ndarray) -> jnp.ndarray:
    return params["embed"][tokens]


def unembed(params: dict, config: ModelConfig, x: jnp.ndarray) -> jnp.ndarray:
    """Final norm and output projection; logits in float32 ``[T, V]``."""
    h = rms_norm(x, params["final_norm"], config.rms_eps)
    w = params["embed"].T if config.tie_embeddings else params["lm_head"]
    return jnp.matmul(h, w, preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(params, config: ModelConfig, tokens):
    TRACE_COUNTS["forward"] += 1
    T = tokens.shape[0]
    K, Dh = config.num_kv_heads, config.head_dim
    empty = jnp.zeros((0, K, Dh), config.jnp_dtype)
    positions = jnp.arange(T, dtype=jnp.int32)
    rope = layer_rope_tables(config, 0, positions)  # once, not once per layer

    def body(x, lp):
        x, _, _ = layer_step(lp, x, empty, empty, jnp.int32(0), positions, config, block_q=query_block(T), rope=rope)
        return x, None

    x, _ = jax.lax.scan(body, embed(params, tokens), params["layers"])
    return unembed(params, config, x)


def forward(params: dict, config: ModelConfig, tokens) -> jnp.ndarray:
    """Full recompute, no cache: logits ``[T, V]`` (float32). The reference path."""
    toks = validate_tokens(tokens, config)
    if toks.shape[0] > config.max_context:
        raise TokenError(f"{toks.shape[0]} tokens exceed the context window of {config.max_context}")
    return _forward(params, config, jnp.asarray(toks))


def query_block(T: int) -> int:
    """Query block of the causal attention: 256 was fastest on CPU for 1K-8K tokens (scripts/)."""
    return T if T <= 256 else 256


@functools.partial(jax.jit, static_argnames=("config", "naive_rope"))
def prefill(params, config: ModelConfig, tokens, cache, history_len, naive_rope: bool = False):
    """All layers at once over new ``tokens [T]`` against ``cache [L, 2, S, K, Dh]``.

    Returns ``(logits [T, V], new_kv [L, 2, T, K, Dh])`` with pre-RoPE keys. Positions of the new
    tokens are ``history_len + arange(T)``.
    """
    TRACE_COUNTS["prefill"] += 1
    T = tokens.shape[0]
    positions = history_len + jnp.arange(T, dtype=jnp.int32)
    rope = layer_rope_tables(config, cache.shape[2], positions, with_history=not naive_rope)

    def body(x, inputs):
        lp, kv = inputs
        x, k, v = layer_step(lp, x, kv[0], kv[1], history_len, positions, config, query_block(T), naive_rope, rope)
        return x, jnp.stack([k, v])

    x, new_kv = jax.lax.scan(body, embed(params, tokens), (params["layers"], cache))
    return unembed(params, config, x), new_kv


@functools.partial(jax.jit, static_argnames=("config", "naive_rope"), donate_argnames=("cache",))
def decode_step(params, config: ModelConfig, token, cache, length, naive_rope: bool = False):
    """One new token against ``cache [L, 2, S, K, Dh]`` holding ``length`` valid rows.

    DONATES ``cache``: the new token's pre-RoPE K/V is written at row ``length`` in place.
    Returns ``(logits [V], cache)``. Requires ``length < S``.
    """
    TRACE_COUNTS["decode_step"] += 1
    positions = jnp.reshape(length, (1,)).astype(jnp.int32)
    rope = layer_rope_tables(config, cache.shape[2], positions, with_history=not naive_rope)

    def body(x, inputs):
        lp, kv = inputs
        x, k, v = layer_step(lp, x, kv[0], kv[1], length, positions, config, naive_rope=naive_rope, rope=rope)
        kv = jax.lax.dynamic_update_slice(kv, jnp.stack([k, v]), (0, length, 0, 0))
        return x, kv

    x, cache = jax.lax.scan(body, embed(params, jnp.reshape(token, (1,))), (params["layers"], cache))
    return unembed(params, config, x)[0], cache


# ---- the per-layer unit the engine pipelines -------------------------------------------------

def bucket_length(n: int, minimum: int = 16, step: int = 256) -> int:
    """Static-shape bucket for ``n`` tokens: powers of two up to ``step``, then multiples of it."""
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if n == 0:
        return 0
    if n <= step:
        return max(minimum, 1 << (n - 1).bit_length())
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("config", "naive_rope"))
def layer_step_jit(lp, x, hist_kv, history_len, positions, config: ModelConfig, naive_rope: bool = False, rope=None):
    """Jitted :func:`layer_step` over the store's layout: ``hist_kv [2, S, K, Dh]``.

    ``rope``: the turn's :func:`layer_rope_tables`, computed once by a caller that steps through
    every layer (None: computed here). Returns ``(x [T, D], new_kv [2, T, K, Dh])``. Compiled once
    per (T, S) bucket pair.
    """
    TRACE_COUNTS["layer_step"] += 1
    x, k, v = layer_step(lp, x, hist_kv[0], hist_kv[1], history_len, positions, config, query_block(x.shape[0]),
                         naive_rope, rope)
    return x, jnp.stack([k, v])


@functools.partial(jax.jit, static_argnames=("config",))
def embed_jit(params, config: ModelConfig, tokens):
    TRACE_COUNTS["embed"] += 1
    return embed(params, tokens)


@functools.partial(jax.jit, static_argnames=("config",))
def unembed_jit(params, config: ModelConfig, x):
    TRACE_COUNTS["unembed"] += 1
    return unembed(params, config, x)
