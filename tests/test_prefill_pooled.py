"""The device-hit prefill (``layers_in_program(hist_rotated=True)``) uses the pool's bucket as it
is: no assembly and no RoPE on the history keys. It equals the host path, which assembles pre-RoPE
blocks, even when the bucket's rows past the history hold other data (as the pool's pages may)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cachedattn.engine import programs as P
from jax_cachedattn.model import ModelConfig, apply_rope, init_params, rope_tables, unstack_layers


@pytest.mark.parametrize("naive", [False, True])
def test_pooled_history_equals_assembled_blocks(naive):
    cfg = ModelConfig.preset("tiny", num_heads=4, num_kv_heads=2, rope_theta=50000.0)
    layers = tuple(unstack_layers(init_params(cfg, jax.random.key(1), norm_noise=0.3)))
    L, K, Dh, S, T, n, B = len(layers), cfg.num_kv_heads, cfg.head_dim, 512, 16, 300, 64
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((L, 2, S, K, Dh)).astype(np.float32)  # rows >= n: stale rows of other data
    cos, sin = rope_tables(jnp.arange(S), Dh, cfg.rope_theta, cfg.rope_scaling)
    # the pool holds keys rotated to their positions (in both modes: a naive cache holds rotated keys)
    pooled = tuple((jnp.stack([apply_rope(jnp.asarray(r[0]), cos, sin), jnp.asarray(r[1])]),) for r in raw)
    host = pooled if naive else tuple((jnp.asarray(r),) for r in raw)  # the store keeps keys pre-RoPE
    off = 5  # the host path's first kept row sits inside its first block: exercise the slice
    blocks = tuple(tuple(jnp.pad(h[0], ((0, 0), (off, 0), (0, 0), (0, 0)))[:, i:i + B]
                         for i in range(0, S + B, B)) for h in host)
    x = jnp.asarray(rng.standard_normal((T, cfg.d_model)).astype(np.float32))
    pos = jnp.arange(n, n + T, dtype=jnp.int32)
    offs = jnp.full(L, off, jnp.int32)
    want = P.layers_in_program(layers, cfg, x, blocks, offs, jnp.int32(n), pos, S, naive, False)
    got = P.layers_in_program(layers, cfg, x, pooled, jnp.zeros(L, jnp.int32), jnp.int32(n), pos, S, naive, True)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[2], want[2]):  # new keys: pre-RoPE (decoupled) or rotated (naive) in both
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
    for g, p in zip(got[1], pooled):  # the pooled path hands the pool's bucket back as it came
        np.testing.assert_array_equal(g, p[0])
    # the garbage past the history matters nowhere: zeroing it changes nothing
    zeroed = tuple((jnp.where((jnp.arange(S) < n)[None, :, None, None], p[0], 0),) for p in pooled)
    again = P.layers_in_program(layers, cfg, x, zeroed, jnp.zeros(L, jnp.int32), jnp.int32(n), pos, S, naive, True)
    np.testing.assert_array_equal(again[0], got[0])


@pytest.mark.parametrize("hist", [300, 1024])
def test_sequence_major_history_through_the_chunked_scan(monkeypatch, hist):
    """The device hit's history, read sequence-major, through the key-chunked scan (small chunks
    forced) equals the reference, with stale rows past the history."""
    import jax_cachedattn.model.layers as layers
    from jax_cachedattn.model import attention, attention_reference

    monkeypatch.setattr(layers, "SCORE_BLOCK_BYTES", 1)  # -> 256-key chunks: 4 of them
    r = np.random.RandomState(hist)
    T, H, K, Dh, cap = 16, 6, 2, 16, 1024
    q = jnp.asarray(r.randn(T, H, Dh), jnp.float32)
    kh, vh = (jnp.asarray(r.randn(cap, K, Dh) * 3, jnp.float32) for _ in range(2))
    kn, vn = (jnp.asarray(r.randn(T, K, Dh) * 3, jnp.float32) for _ in range(2))
    got = attention(q, kh, vh, kn, vn, jnp.int32(hist), hist_seq_major=True)
    want = attention_reference(q, kh, vh, kn, vn, jnp.int32(hist))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    heads_major = attention(q, kh, vh, kn, vn, jnp.int32(hist))
    np.testing.assert_allclose(np.asarray(got), np.asarray(heads_major), atol=1e-6, rtol=1e-6)
