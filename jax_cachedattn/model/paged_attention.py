"""Decode attention over a paged KV pool with ragged lengths (one new query token per sequence).

Legend: S sequences (decode slots), H query heads, K kv heads, G = H/K, Dh head dim, P pages in the
pool, B tokens per page, M pages per sequence (block-table width).

The pool of one layer is ``[2, P, B, K, Dh]`` (index 0: keys, 1: values); sequence ``s`` holds its
token ``i`` at page ``block_tables[s, i // B]``, row ``i % B``, at position ``i`` of its context. The
engine's pool holds keys already rotated to those positions (rotated once per turn, when a slot's
history is written into its pages), so decode attention reads them as they are. The attention can
also rotate pre-RoPE keys page by page (``rope_pages``: row ``b`` of the ``j``-th page of every
sequence sits at position ``j*B + b``, so one table ``[M, B, Dh]`` serves every slot); the engine
did that at every step until measured (docs/engine.md).

The pure-``jnp`` path is a loop over page index with an online softmax, each step reading one page
per sequence: on XLA:CPU this beat gathering every page into a dense ``[S, M*B, K, Dh]`` first (the
gather materialises the whole history; see docs/engine.md). It is checked against the
``ref_ragged_paged_attention`` that the jax wheel ships (tests/test_paged_attention.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_cachedattn.model.config import ModelConfig
from jax_cachedattn.model.layers import layer_rope_tables, mlp, project_qkv, rms_norm
from jax_cachedattn.model.rope import apply_rope

_NEG = -1e30
ROWS_PER_STEP = 64  # rows of each sequence one loop step of the pure-jnp path reads (see below)


def decode_rope_tables(config: ModelConfig, pages: int, page_size: int, positions: jax.Array) -> tuple:
    """``(page_cos, page_sin)`` ``[pages, page_size, Dh]`` (row ``b`` of the ``j``-th page sits at
    position ``j*page_size + b``) and ``(cos, sin)`` ``[S, Dh]`` of the queries' ``positions``: computed
    once per decode step and shared by every layer."""
    cos_h, sin_h, cos_q, sin_q = layer_rope_tables(config, pages * page_size, positions)
    shape = (pages, page_size, config.head_dim)
    return (cos_h.reshape(shape), sin_h.reshape(shape)), (cos_q, sin_q)


def _rotated_scores(qh, k, cos, sin):
    """``q . rope(k)`` without materialising the rotated page: with halves ``k = [k1, k2]``,
    ``rope(k) = [k1 c - k2 s, k2 c + k1 s]``; qh ``[S, K, G, Dh]``, k ``[S, B, K, Dh]``, cos/sin ``[B, Dh]``."""
    half = k.shape[-1] // 2
    f32 = jnp.float32
    c, s = cos[None, :, None, :half], sin[None, :, None, :half]
    k1, k2 = k[..., :half].astype(f32), k[..., half:].astype(f32)
    r1, r2 = (k1 * c - k2 * s).astype(k.dtype), (k2 * c + k1 * s).astype(k.dtype)
    return (jnp.einsum("skgd,sbkd->skgb", qh[..., :half], r1, preferred_element_type=f32)
            + jnp.einsum("skgd,sbkd->skgb", qh[..., half:], r2, preferred_element_type=f32))


def paged_decode_attention(q, kv_pages, block_tables, lengths, rope_pages=None, rows_per_step: int = ROWS_PER_STEP):
    """Attention of one query per sequence over its pages.

    q ``[S, H, Dh]``: queries, already rotated to their positions. kv_pages ``[2, P, B, K, Dh]``.
    block_tables ``[S, M]`` int32; lengths ``[S]`` int32: keys ``0..lengths[s]-1`` are attended (a
    sequence with length 0 gets zeros). rope_pages: ``(cos, sin)`` ``[>=M, B, Dh]`` to rotate the
    (pre-RoPE) keys by position, or None to use them as they are. Returns ``[S, H, Dh]`` in q's dtype.

    Each loop step reads ``c = max(1, rows_per_step // B)`` pages per sequence (a page of B rows, or
    several small ones: the step's work stays about ``rows_per_step`` rows whatever the page size).
    The loop runs over ``ceil(max(ceil(lengths / B)) / c)`` steps only (a dynamic trip count): a batch
    of short histories does not pay for the block table's width.
    """
    S, H, Dh = q.shape
    _, P, B, K, _ = kv_pages.shape
    G = H // K
    c = max(1, rows_per_step // B)
    f32 = jnp.float32
    if rope_pages is not None:
        c = 1  # the per-page RoPE tables are indexed by page
    M = block_tables.shape[1]
    if M % c:  # whole groups of c pages (trash page 0 past the table; masked by the lengths)
        block_tables = jnp.pad(block_tables, ((0, 0), (0, c - M % c)))
    qh = (q.astype(f32) * Dh**-0.5).astype(q.dtype).reshape(S, K, G, Dh)
    n_steps = ((jnp.max(lengths) + B - 1) // B + c - 1) // c
    rows = jnp.arange(c * B, dtype=jnp.int32)

    def body(j, carry):
        m, denom, out = carry
        pid = jax.lax.dynamic_slice_in_dim(block_tables, j * c, c, axis=1)  # [S, c]
        kv = kv_pages[:, pid].reshape(2, S, c * B, K, Dh)  # c pages per sequence
        k, v = kv[0], kv[1]
        if rope_pages is not None:
            sc = _rotated_scores(qh, k, rope_pages[0][j], rope_pages[1][j])
        else:
            sc = jnp.einsum("skgd,sbkd->skgb", qh, k, preferred_element_type=f32)
        valid = (j * c * B + rows)[None, :] < lengths[:, None]  # [S, c*B]
        sc = jnp.where(valid[:, None, None, :], sc, _NEG)
        m_new = jnp.maximum(m, sc.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid[:, None, None, :], jnp.exp(sc - m_new), 0.0)
        denom = denom * alpha + p.sum(axis=-1, keepdims=True)
        out = out * alpha + jnp.einsum("skgb,sbkd->skgd", p.astype(v.dtype), v, preferred_element_type=f32)
        return m_new, denom, out

    init = (jnp.full((S, K, G, 1), _NEG, f32), jnp.zeros((S, K, G, 1), f32), jnp.zeros((S, K, G, Dh), f32))
    m, denom, out = jax.lax.fori_loop(0, n_steps, body, init)
    out = out / jnp.maximum(denom, 1e-30)
    return out.reshape(S, H, Dh).astype(q.dtype)


def paged_decode_attention_gathered(q, kv_pages, block_tables, lengths, rope_pages=None):
    """The same result by gathering every sequence's pages into a dense history first (the slow way
    on XLA:CPU; kept as a second oracle and for the benchmark)."""
    S, H, Dh = q.shape
    _, P, B, K, _ = kv_pages.shape
    M = block_tables.shape[1]
    kv = kv_pages[:, block_tables].reshape(2, S, M * B, K, Dh)
    k, v = kv[0], kv[1]
    if rope_pages is not None:
        cos, sin = rope_pages[0][:M].reshape(M * B, Dh), rope_pages[1][:M].reshape(M * B, Dh)
        k = jax.vmap(lambda x: apply_rope(x, cos, sin))(k)
    G = H // K
    qh = q.astype(jnp.float32).reshape(S, K, G, Dh) * Dh**-0.5
    sc = jnp.einsum("skgd,snkd->skgn", qh, k.astype(jnp.float32))
    valid = jnp.arange(M * B)[None, :] < lengths[:, None]
    sc = jnp.where(valid[:, None, None, :], sc, -jnp.inf)
    p = jax.nn.softmax(sc, axis=-1)
    p = jnp.where(lengths[:, None, None, None] > 0, p, 0.0)
    out = jnp.einsum("skgn,snkd->skgd", p, v.astype(jnp.float32))
    return out.reshape(S, H, Dh).astype(q.dtype)


def paged_decode_block(lp: dict, x, kv_pages, block_tables, positions, page, row, live, config: ModelConfig, rope):
    """One decoder block for one new token per slot, its K/V written into the pool first.

    x ``[S, D]``; kv_pages ``[2, P, B, K, Dh]`` (donated by the caller's program: updated in place)
    holding each slot's keys *rotated* to their positions in the slot's context (the engine rotates
    a slot's history once per turn, when it writes it into the pages; see engine/programs.py), so no
    key is rotated again here: the new key is stored rotated and the pages are used as they are.
    positions ``[S]``: each token's position (= rows its slot already holds); page/row ``[S]``: where
    its K/V goes (the trash page 0 for idle slots); live ``[S]`` bool; rope: ``(cos, sin)`` ``[S, Dh]``
    of ``positions``. Returns ``(x [S, D], kv_pages, k [S, K, Dh])`` with ``k`` the new key *before*
    RoPE (what the store keeps).
    """
    S = x.shape[0]
    H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    h = rms_norm(x, lp["attn_norm"], config.rms_eps)
    q, k, v = project_qkv(lp, h, config)  # Qwen2-style q/k/v biases included, as in layer_step
    q, k, v = q.reshape(S, H, Dh), k.reshape(S, K, Dh), v.reshape(S, K, Dh)
    cos_q, sin_q = rope
    kv_pages = kv_pages.at[:, page, row].set(jnp.stack([apply_rope(k, cos_q, sin_q), v]).astype(kv_pages.dtype))
    lengths = jnp.where(live, positions + 1, 0)
    a = paged_decode_attention(apply_rope(q, cos_q, sin_q), kv_pages, block_tables, lengths)
    x = x + a.reshape(S, H * Dh) @ lp["wo"]
    x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], config.rms_eps))
    return x, kv_pages, k
