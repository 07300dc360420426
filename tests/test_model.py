"""The equivalence ladder on CPU: blocked == naive attention, cached == uncached, decode == forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cachedattn.model import (
    TRACE_COUNTS,
    ModelConfig,
    TokenError,
    attention,
    attention_reference,
    bucket_length,
    decode_step,
    embed_jit,
    forward,
    init_params,
    layer_step_jit,
    prefill,
    sample,
    unembed_jit,
    unstack_layers,
    validate_tokens,
)

SEQ = 640  # RoPE bugs hide at small positions: use 600+ tokens


@pytest.fixture(scope="module", params=["gqa", "mqa", "mha"])
def model(request):
    heads = {"gqa": (4, 2), "mqa": (4, 1), "mha": (4, 4)}[request.param]
    cfg = ModelConfig.preset("tiny", num_heads=heads[0], num_kv_heads=heads[1], rope_theta=50000.0)
    params = init_params(cfg, jax.random.key(1), norm_noise=0.3)
    toks = np.random.RandomState(0).randint(0, cfg.vocab_size, SEQ).astype(np.int32)
    return cfg, params, toks, forward(params, cfg, toks)


@pytest.mark.parametrize("block_q", [64, 100, 512])
@pytest.mark.parametrize("hist,cap", [(0, 0), (37, 64), (300, 300)])
def test_blocked_attention_matches_reference(block_q, hist, cap):
    r = np.random.RandomState(hist + block_q)
    T, H, K, Dh = 150, 6, 2, 16
    q = jnp.asarray(r.randn(T, H, Dh), jnp.float32)
    kh, vh = (jnp.asarray(r.randn(cap, K, Dh), jnp.float32) for _ in range(2))
    kn, vn = (jnp.asarray(r.randn(T, K, Dh), jnp.float32) for _ in range(2))
    got = attention(q, kh, vh, kn, vn, jnp.int32(hist), block_q=block_q)
    want = attention_reference(q, kh, vh, kn, vn, jnp.int32(hist))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=1e-5)
    # Padding rows of the history must not matter.
    kh2 = kh.at[hist:].set(1e3)
    got2 = attention(q, kh2, vh, kn, vn, jnp.int32(hist), block_q=block_q)
    np.testing.assert_allclose(np.asarray(got2), np.asarray(got), atol=1e-6)


@pytest.mark.parametrize("hist", [0, 700, 1024])
def test_key_chunked_online_softmax_matches_reference(monkeypatch, hist):
    """Long key ranges go through the chunked (flash-style) scan: force small chunks so it runs."""
    import jax_cachedattn.model.layers as layers

    monkeypatch.setattr(layers, "SCORE_BLOCK_BYTES", 1)  # -> 256-key chunks
    r = np.random.RandomState(hist)
    T, H, K, Dh, cap = 600, 6, 2, 16, 1024
    q = jnp.asarray(r.randn(T, H, Dh), jnp.float32)
    kh, vh = (jnp.asarray(r.randn(cap, K, Dh) * 3, jnp.float32) for _ in range(2))
    kn, vn = (jnp.asarray(r.randn(T, K, Dh) * 3, jnp.float32) for _ in range(2))
    got = attention(q, kh, vh, kn, vn, jnp.int32(hist), block_q=256)  # past keys of 256 and 512: chunked too
    want = attention_reference(q, kh, vh, kn, vn, jnp.int32(hist))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("split", [1, 255, 512, SEQ - 1])
def test_cached_equals_uncached(model, split):
    cfg, params, toks, full = model
    L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    empty = jnp.zeros((L, 2, 0, K, Dh), jnp.float32)
    logits_h, kv = prefill(params, cfg, jnp.asarray(toks[:split]), empty, jnp.int32(0))
    # The history's cache sits in a padded buffer, as the store hands it back.
    cap = bucket_length(split)
    cache = jnp.zeros((L, 2, cap, K, Dh), jnp.float32).at[:, :, :split].set(kv)
    logits_n, new_kv = prefill(params, cfg, jnp.asarray(toks[split:]), cache, jnp.int32(split))
    assert float(jnp.abs(logits_h - full[:split]).max()) <= 1e-5
    assert float(jnp.abs(logits_n - full[split:]).max()) <= 1e-5
    # New KV is pre-RoPE: identical to what a full run stores for the same tokens.
    _, full_kv = prefill(params, cfg, jnp.asarray(toks), empty, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(new_kv), np.asarray(full_kv[:, :, split:]), atol=1e-5)


def test_per_layer_steps_equal_forward(model):
    """The engine's unit: one jitted step per layer over padded buckets."""
    cfg, params, toks, full = model
    split, n_new = 500, SEQ - 500
    layers = unstack_layers(params)
    _, kv = prefill(params, cfg, jnp.asarray(toks[:split]), jnp.zeros((cfg.num_layers, 2, 0, cfg.num_kv_heads, cfg.head_dim)), jnp.int32(0))
    S, T = bucket_length(split), bucket_length(n_new)
    new = np.zeros(T, np.int32)
    new[:n_new] = toks[split:]
    x = embed_jit(params, cfg, jnp.asarray(new))
    positions = split + jnp.arange(T, dtype=jnp.int32)
    for layer, lp in enumerate(layers):
        hist = jnp.zeros((2, S, cfg.num_kv_heads, cfg.head_dim)).at[:, :split].set(kv[layer])
        x, _ = layer_step_jit(lp, x, hist, jnp.int32(split), positions, cfg)
    logits = unembed_jit(params, cfg, x)[:n_new]
    assert float(jnp.abs(logits - full[split:]).max()) <= 1e-5


def test_decode_step_by_step_equals_forward(model):
    cfg, params, toks, full = model
    L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    start = 600
    _, kv = prefill(params, cfg, jnp.asarray(toks[:start]), jnp.zeros((L, 2, 0, K, Dh)), jnp.int32(0))
    cache = jnp.zeros((L, 2, 1024, K, Dh)).at[:, :, :start].set(kv)
    for pos in range(start, SEQ):
        logits, cache = decode_step(params, cfg, jnp.int32(toks[pos]), cache, jnp.int32(pos))
        assert float(jnp.abs(logits - full[pos]).max()) <= 1e-5


def test_bucketing_bounds_compilations():
    cfg = ModelConfig.preset("tiny", num_layers=1)
    params = init_params(cfg, jax.random.key(0))
    lp = unstack_layers(params)[0]
    before = TRACE_COUNTS["layer_step"]
    shapes = set()
    for hist, new in [(10, 3), (100, 17), (200, 30), (250, 60), (300, 64), (400, 5), (500, 12)]:
        S, T = bucket_length(hist), bucket_length(new)
        shapes.add((S, T))
        x = jnp.zeros((T, cfg.d_model))
        out, kv = layer_step_jit(lp, x, jnp.zeros((2, S, cfg.num_kv_heads, cfg.head_dim)), jnp.int32(hist),
                                 hist + jnp.arange(T, dtype=jnp.int32), cfg)
        assert kv.shape == (2, T, cfg.num_kv_heads, cfg.head_dim)
    assert TRACE_COUNTS["layer_step"] - before == len(shapes) < 7


def test_bucket_length():
    assert [bucket_length(n) for n in (0, 1, 16, 17, 100, 256, 257, 513, 1100)] == [0, 16, 16, 32, 128, 256, 512, 768, 1280]
    assert bucket_length(600, step=512) == 1024
    with pytest.raises(ValueError):
        bucket_length(-1)


@pytest.mark.parametrize(
    "bad,match",
    [([], "empty"), ([1, 2, 512], "outside the vocabulary"), ([-1], "outside the vocabulary"),
     ([[1, 2]], "1-D"), ([1.5], "integer")],
)
def test_bad_tokens_raise(bad, match):
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(TokenError, match=match):
        validate_tokens(np.asarray(bad), cfg)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(TokenError):
        forward(params, cfg, np.asarray(bad))


def test_too_long_raises():
    cfg = ModelConfig.preset("tiny", max_context=32)
    with pytest.raises(TokenError, match="context window"):
        forward(init_params(cfg, jax.random.key(0)), cfg, np.zeros(33, np.int32))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.preset("tiny", num_heads=3, num_kv_heads=2)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("nope")
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig.preset("tiny", dtype="int8")
    assert ModelConfig.preset("smollm2-135m").kv_bytes_per_token == 30 * 2 * 3 * 64 * 4


def test_sampling():
    logits = jnp.asarray([0.1, 3.0, 0.2, 2.9])
    assert int(sample(logits)) == 1
    k = jax.random.key(3)
    assert int(sample(logits, k, temperature=0.7)) == int(sample(logits, k, temperature=0.7))
    assert int(sample(logits, k, temperature=1.0, top_p=0.01)) == 1  # top-p keeps the argmax only
    draws = {int(sample(logits, jax.random.key(i), temperature=1.0)) for i in range(40)}
    assert {1, 3} <= draws
    with pytest.raises(ValueError):
        sample(logits, None, temperature=1.0)
