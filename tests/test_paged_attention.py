"""Paged decode attention == the reference the jax wheel ships (ragged lengths, random block tables,
MHA/GQA/MQA), with and without rotating pre-RoPE keys by position."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from jax_cachedattn.model import ModelConfig
from jax_cachedattn.model.paged_attention import (
    decode_rope_tables,
    paged_decode_attention,
    paged_decode_attention_gathered,
)
from jax_cachedattn.model.rope import apply_rope, rope_tables


def _case(seed, S, H, K, Dh, B, M, lengths):
    r = np.random.RandomState(seed)
    P = S * M + 1 + 3  # page 0 is trash; a few pages belong to nobody
    pool = r.randn(2, P, B, K, Dh).astype(np.float32)
    tables = (1 + r.permutation(P - 1)[: S * M]).reshape(S, M).astype(np.int32)  # random, disjoint
    q = r.randn(S, H, Dh).astype(np.float32)
    return q, pool, tables, np.asarray(lengths, np.int32)


def _reference(q, pool, tables, lengths):
    S, H, Dh = q.shape
    _, P, B, K, _ = pool.shape
    combined = np.empty((P, B, 2 * K, Dh), np.float32)  # the kernel's layout: k and v heads interleaved
    combined[:, :, 0::2], combined[:, :, 1::2] = pool[0], pool[1]
    return np.asarray(ref_ragged_paged_attention(
        jnp.asarray(q), jnp.asarray(combined), jnp.asarray(lengths), jnp.asarray(tables),
        jnp.arange(S + 1, dtype=jnp.int32), jnp.asarray([S], jnp.int32), sm_scale=Dh**-0.5))


@pytest.mark.parametrize("H,K", [(4, 4), (8, 2), (6, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("B", [16, 64])
@pytest.mark.parametrize("rows", [1, 64])  # one page per loop step; 64 rows: 4 pages of 16 (M=6 padded to 8)
def test_paged_equals_reference(H, K, B, rows):
    S, Dh, M = 5, 32, 6
    lengths = [1, B - 1, B, 3 * B + 7, M * B]  # one token, partial and full pages, the whole table
    q, pool, tables, lens = _case(H * 100 + K + B, S, H, K, Dh, B, M, lengths)
    want = _reference(q, pool, tables, lens)
    attend = jax.jit(functools.partial(paged_decode_attention, rows_per_step=rows))
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(pool), jnp.asarray(tables), jnp.asarray(lens)))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    got2 = np.asarray(paged_decode_attention_gathered(jnp.asarray(q), jnp.asarray(pool), jnp.asarray(tables), jnp.asarray(lens)))
    np.testing.assert_allclose(got2, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("H,K", [(8, 2), (4, 1)])
def test_pre_rope_pages_rotated_by_position(H, K):
    """Pages hold pre-RoPE keys; rotating row b of a slot's j-th page to position j*B + b at attention
    time equals the reference over keys rotated beforehand."""
    S, Dh, B, M = 4, 16, 16, 5
    cfg = ModelConfig(vocab_size=8, d_model=H * Dh, num_layers=1, num_heads=H, num_kv_heads=K, head_dim=Dh,
                      ffn_dim=8, rope_theta=5000.0)
    lens = [3, 17, 40, 80]
    q, pool, tables, lens = _case(11, S, H, K, Dh, B, M, lens)
    rotated = pool.copy()
    cos, sin = rope_tables(jnp.arange(M * B), Dh, cfg.rope_theta)
    for s in range(S):
        for j in range(M):
            p = tables[s, j]
            rotated[0, p] = np.asarray(apply_rope(jnp.asarray(pool[0, p]), cos[j * B:(j + 1) * B], sin[j * B:(j + 1) * B]))
    page_rope, _ = decode_rope_tables(cfg, M, B, jnp.asarray(lens - 1))
    got = np.asarray(jax.jit(paged_decode_attention)(jnp.asarray(q), jnp.asarray(pool), jnp.asarray(tables),
                                                      jnp.asarray(lens), page_rope))
    np.testing.assert_allclose(got, _reference(q, rotated, tables, lens), atol=2e-6, rtol=1e-5)


def test_empty_slot_gives_zeros_and_ignores_other_pages():
    S, H, K, Dh, B, M = 3, 4, 2, 8, 8, 3
    q, pool, tables, _ = _case(5, S, H, K, Dh, B, M, [0, 0, 0])
    lens = np.asarray([0, 9, 0], np.int32)
    got = np.asarray(paged_decode_attention(jnp.asarray(q), jnp.asarray(pool), jnp.asarray(tables), jnp.asarray(lens)))
    assert np.all(got[[0, 2]] == 0)
    # Changing pages the slot does not own (or rows past its length) changes nothing.
    pool2 = pool.copy()
    mine = set(tables[1, :2].tolist())
    for p in range(pool.shape[1]):
        if p not in mine:
            pool2[:, p] = 1e3
    pool2[:, tables[1, 1], 1:] = -1e3
    got2 = np.asarray(paged_decode_attention(jnp.asarray(q), jnp.asarray(pool2), jnp.asarray(tables), jnp.asarray(lens)))
    np.testing.assert_array_equal(got2[1], got[1])
