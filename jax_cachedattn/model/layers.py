"""One decoder block as pure functions over one layer's params.

Legend: T new tokens (padded to a bucket), S history capacity (rows >= history_len are padding),
D d_model, H query heads, K kv heads, G = H/K, Dh head dim, F ffn width, B query block.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp

from jax_cachedattn.model.config import ModelConfig
from jax_cachedattn.model.rope import apply_rope, rope_tables

#: How many times each jitted entry point was traced (a trace precedes every compilation).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()

_NEG = -1e30  # finite "minus infinity": fully masked rows stay NaN-free


def rms_norm(x: jnp.ndarray, w: jnp.ndarray, eps: float) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def mlp(lp: dict, x: jnp.ndarray) -> jnp.ndarray:
    """SwiGLU: ``down(silu(x @ gate) * (x @ up))``; x ``[T, D]``."""
    return (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]


#: Bytes of one f32 score block ``[K, G, B, chunk]`` of the online softmax: small enough to stay in cache.
SCORE_BLOCK_BYTES = 8 << 20


def _attend_parts(q, parts):
    """Softmax over the concatenation of several key ranges without concatenating them.

    q ``[K, G, B, Dh]`` (already scaled); parts: ``(k [K, N, Dh], v [K, N, Dh], mask)`` with mask
    ``None`` (every key visible) or broadcastable to ``[K, G, B, N]``; a part may add a fourth item,
    ``True``: its k and v are sequence-major, ``[N, K, Dh]`` (as the cache holds them: chunking them
    is a free reshape, no transpose). Returns ``[K, G, B, Dh]`` f32.

    Flash-style online softmax: long key ranges are consumed ``chunk`` keys at a time (a scan)
    with a running max and denominator, so no ``B x N`` score matrix larger than one chunk is ever
    live (on CPU a score matrix that spills the cache made attention 2-3x slower).
    """
    f32 = jnp.float32
    Kh, G, B, Dh = q.shape
    chunk = max(256, 1 << (max(1, SCORE_BLOCK_BYTES // (Kh * G * B * 4))).bit_length() - 1)
    m = jnp.full((Kh, G, B, 1), _NEG, f32)
    denom = jnp.zeros((Kh, G, B, 1), f32)
    out = jnp.zeros((Kh, G, B, Dh), f32)

    def step(carry, k, v, mask, seq_major=False):
        m, denom, out = carry
        kspec = "nkd" if seq_major else "knd"
        sc = jnp.einsum(f"kgbd,{kspec}->kgbn", q, k, preferred_element_type=f32)
        if mask is not None:
            sc = jnp.where(mask, sc, _NEG)
        m_new = jnp.maximum(m, sc.max(axis=-1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new)
        denom = denom * alpha + p.sum(axis=-1, keepdims=True)
        out = out * alpha + jnp.einsum(f"kgbn,{kspec}->kgbd", p.astype(v.dtype), v, preferred_element_type=f32)
        return m_new, denom, out

    carry = (m, denom, out)
    for k, v, mask, *sm in parts:
        seq_major = bool(sm and sm[0])
        N = k.shape[0 if seq_major else 1]
        c = next((c for c in (chunk, 1024, 512, 256) if c <= chunk and N % c == 0), N)
        if N <= c:
            carry = step(carry, k, v, mask, seq_major)
            continue
        n = N // c
        if seq_major:
            ks, vs = k.reshape(n, c, Kh, Dh), v.reshape(n, c, Kh, Dh)  # [n, c, K, Dh]: no copy
        else:
            ks = k.reshape(Kh, n, c, Dh).swapaxes(0, 1)  # [n, K, c, Dh]
            vs = v.reshape(Kh, n, c, Dh).swapaxes(0, 1)
        if mask is None:
            carry, _ = jax.lax.scan(lambda cr, kv: (step(cr, kv[0], kv[1], None, seq_major), None), carry, (ks, vs))
        else:
            mk = jnp.broadcast_to(mask, mask.shape[:-1] + (N,))
            mk = jnp.moveaxis(mk.reshape(mk.shape[:-1] + (n, c)), -2, 0)  # [n, ..., c]
            carry, _ = jax.lax.scan(lambda cr, kvm: (step(cr, *kvm, seq_major), None), carry, (ks, vs, mk))
    m, denom, out = carry
    return out / denom


def attention(
    q: jnp.ndarray,
    k_hist: jnp.ndarray,
    v_hist: jnp.ndarray,
    k_new: jnp.ndarray,
    v_new: jnp.ndarray,
    history_len: jnp.ndarray,
    block_q: int = 256,
    hist_seq_major: bool = False,
) -> jnp.ndarray:
    """Blocked causal grouped-query attention, heads-major.

    q ``[T, H, Dh]`` and k_hist/k_new already rotated. Query block ``[s, e)`` attends to three key
    ranges, softmaxed together without concatenation: the valid history (a padding mask), the new
    keys before the block (no mask at all) and the block's own keys (the causal triangle). No
    ``T x T`` score matrix is materialised beyond the causal staircase, and only the diagonal
    blocks pay for masking. Returns ``[T, H, Dh]`` in q's dtype. ``hist_seq_major`` (static): the
    history is read sequence-major as it comes (no transpose to heads-major first; the device hit's
    prefill); the other paths keep the heads-major history as before.
    """
    T, H, Dh = q.shape
    K = k_new.shape[1]
    G = H // K
    S = k_hist.shape[0]
    scale = Dh ** -0.5
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(T, K, G, Dh).transpose(1, 2, 0, 3)  # [K,G,T,Dh]
    if hist_seq_major:
        kh, vh = k_hist, v_hist  # [S,K,Dh]
    else:
        kh, vh = k_hist.transpose(1, 0, 2), v_hist.transpose(1, 0, 2)  # [K,S,Dh]
    kn, vn = k_new.transpose(1, 0, 2), v_new.transpose(1, 0, 2)  # [K,T,Dh]
    hist_mask = (jnp.arange(S) < history_len)[None, None, None, :]
    outs = []
    for start in range(0, T, block_q):  # static loop; the last block may be shorter
        end = min(start + block_q, T)
        parts = []
        if S:
            parts.append((kh, vh, hist_mask, hist_seq_major))
        if start:
            parts.append((kn[:, :start], vn[:, :start], None))
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(start, end)[None, :]  # [B, B]
        parts.append((kn[:, start:end], vn[:, start:end], causal[None, None]))
        outs.append(_attend_parts(qh[:, :, start:end], parts))
    out = jnp.concatenate(outs, axis=2)  # [K,G,T,Dh]
    return out.transpose(2, 0, 1, 3).reshape(T, H, Dh).astype(q.dtype)


def attention_reference(q, k_hist, v_hist, k_new, v_new, history_len):
    """Naive masked attention over the concatenated keys; the oracle for :func:`attention`."""
    T, H, Dh = q.shape
    K = k_new.shape[1]
    S = k_hist.shape[0]
    k = jnp.concatenate([k_hist, k_new]).astype(jnp.float32)
    v = jnp.concatenate([v_hist, v_new]).astype(jnp.float32)
    k = jnp.repeat(k, H // K, axis=1)
    v = jnp.repeat(v, H // K, axis=1)
    s = jnp.einsum("thd,shd->hts", q.astype(jnp.float32), k) * Dh ** -0.5
    key_idx = jnp.arange(S + T)
    valid = jnp.where(key_idx < S, key_idx < history_len, (key_idx - S)[None, :] <= jnp.arange(T)[:, None])
    s = jnp.where(valid[None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("hts,shd->thd", p, v).astype(q.dtype)


def project_qkv(lp: dict, h: jnp.ndarray, config: ModelConfig) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """q, k, v of the normed residual ``h [..., D]``: ``([..., H*Dh], [..., K*Dh], [..., K*Dh])``, with the
    q/k/v biases when ``config.attn_bias`` (Qwen2). Every attention path projects through here."""
    q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]
    if config.attn_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    return q, k, v


def layer_rope_tables(config: ModelConfig, S: int, positions: jnp.ndarray, with_history: bool = True) -> tuple:
    """The RoPE tables of one :func:`layer_step`: ``(cos, sin)`` of history rows ``0..S-1`` (None
    when ``with_history`` is False: the naive cache is already rotated), then of ``positions``."""
    args = (config.head_dim, config.rope_theta, config.rope_scaling)
    hist = rope_tables(jnp.arange(S), *args) if with_history else (None, None)
    return (*hist, *rope_tables(positions, *args))


def layer_step(
    lp: dict,
    x: jnp.ndarray,
    cached_k: jnp.ndarray,
    cached_v: jnp.ndarray,
    history_len: jnp.ndarray,
    positions: jnp.ndarray,
    config: ModelConfig,
    block_q: int = 256,
    naive_rope: bool = False,
    rope: tuple | None = None,
    hist_rotated: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One decoder block over new tokens against a cached history.

    lp: one layer's params (the ``params["layers"]`` leaves without the L axis).
    x ``[T, D]``: residual stream of the new tokens. cached_k/cached_v ``[S, K, Dh]``: the
    history's *pre-RoPE* keys and values; rows ``>= history_len`` are ignored. History token ``i``
    sits at position ``i`` of the current context. positions ``[T]``: positions of the new tokens
    (normally ``history_len + arange(T)``).
    rope: optional ``rope_tables(arange(S)) + rope_tables(positions)`` (four ``[*, Dh]`` arrays),
    computed once by a caller that runs many layers in one program: the tables cost more than
    rotating with them, and XLA does not merge the per-layer copies.
    Returns ``(x [T, D], new_k [T, K, Dh], new_v [T, K, Dh])`` with ``new_k`` pre-RoPE.

    ``naive_rope=True`` is the usual engine, kept only for comparison: the cache holds keys
    *after* RoPE (rotated by the positions they had when computed), history keys are used as they
    are and ``new_k`` is returned rotated. A truncated naive cache is then wrong.

    ``hist_rotated=True`` (static): the history keys are already rotated to their positions (the
    engine's device pool); they are used as they are, with no RoPE (``rope``'s history tables may be
    None) and read sequence-major in the attention (no transpose), and ``new_k`` is still returned
    pre-RoPE.
    """
    T = x.shape[0]
    H, K, Dh = config.num_heads, config.num_kv_heads, config.head_dim
    S = cached_k.shape[0]
    h = rms_norm(x, lp["attn_norm"], config.rms_eps)
    q, k, v = project_qkv(lp, h, config)
    q, k, v = q.reshape(T, H, Dh), k.reshape(T, K, Dh), v.reshape(T, K, Dh)
    if rope is None:
        rope = layer_rope_tables(config, S, positions, with_history=not (naive_rope or hist_rotated))
    cos_h, sin_h, cos_n, sin_n = rope
    k_rot = apply_rope(k, cos_n, sin_n)
    k_hist = cached_k if naive_rope or hist_rotated else apply_rope(cached_k, cos_h, sin_h)
    a = attention(apply_rope(q, cos_n, sin_n), k_hist, cached_v, k_rot, v, history_len, block_q=block_q,
                  hist_seq_major=hist_rotated)
    x = x + a.reshape(T, H * Dh) @ lp["wo"]
    x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], config.rms_eps))
    return x, (k_rot if naive_rope else k), v
