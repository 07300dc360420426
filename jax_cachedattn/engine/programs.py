"""The engine's jitted programs, apart from the decode state's (engine/slots.py).

Each is compiled once per static shape: prompt buckets (``T``), history buckets (``S``), the
in-program layer groups. Params are arguments, never closed over; per-layer params come as a tuple
(``unstack_layers``): slicing the stacked weights inside a program copies them.

Legend: L layers, T new tokens (padded), S history capacity, K kv heads, Dh head dim, P pages,
B rows per page, M pages per slot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_cachedattn.model import (
    TRACE_COUNTS, ModelConfig, apply_rope, embed, layer_rope_tables, layer_step, query_block, rope_tables, unembed,
)
from jax_cachedattn.store import assemble_blocks


@functools.partial(jax.jit, static_argnames=("config",))
def logits_at(params, config: ModelConfig, x, idx):
    """Logits ``[V]`` of row ``idx`` of ``x [T, D]``."""
    TRACE_COUNTS["logits_at"] += 1
    return unembed(params, config, jax.lax.dynamic_slice_in_dim(x, idx, 1))[0]


@functools.partial(jax.jit, static_argnames=("config",))
def all_logits(params, config: ModelConfig, x):
    return unembed(params, config, x)


@functools.partial(jax.jit, static_argnames=("config",))
def embed_tokens(params, config: ModelConfig, tokens):
    TRACE_COUNTS["embed"] += 1
    return embed(params, tokens)


def _prefill_rope(config: ModelConfig, S: int, positions, naive: bool, hist_rotated: bool) -> tuple:
    """The tables of :func:`layer_step`. ``hist_rotated``: the history comes from the device pool,
    whose keys are already rotated to their positions: its tables are the identity (cos 1, sin 0:
    ``layer_step`` then uses those keys exactly as they are and still returns the new keys pre-RoPE)."""
    rope = layer_rope_tables(config, S, positions, with_history=not naive)
    if hist_rotated and not naive and S:
        rope = (jnp.ones_like(rope[0]), jnp.zeros_like(rope[1]), rope[2], rope[3])
    return rope


@functools.partial(jax.jit, static_argnames=("config", "S", "naive", "hist_rotated"))
def rope_for_layers(config: ModelConfig, S: int, positions, naive: bool, hist_rotated: bool = False):
    """A turn's RoPE tables, computed once for the per-layer steps of ``preload="layerwise"``."""
    return _prefill_rope(config, S, positions, naive, hist_rotated)


@functools.partial(jax.jit, static_argnames=("config", "naive"))
def one_layer(lp, x, hist_kv, history_len, positions, config: ModelConfig, naive: bool, rope):
    """One layer over ``hist_kv [2, S, K, Dh]``; returns ``(x [T, D], new_kv [2, T, K, Dh])``."""
    TRACE_COUNTS["layer_step"] += 1
    x, k, v = layer_step(lp, x, hist_kv[0], hist_kv[1], history_len, positions, config, query_block(x.shape[0]),
                         naive, rope)
    return x, jnp.stack([k, v])


@functools.partial(jax.jit, static_argnames=("config", "cap", "naive", "hist_rotated"))
def layers_in_program(layers, config: ModelConfig, x, blocks, offs, hist_len, positions, cap: int, naive: bool,
                      hist_rotated: bool = False):
    """Consecutive layers in one program: each layer's history blocks come in as they are
    (``pinned_host`` or device), are moved to the device inside the program and assembled there, so
    XLA can overlap the copies of later layers with the compute of earlier ones.

    blocks: per layer a tuple of ``[2, B, K, Dh]`` blocks (a layer already on the device comes as
    one ``[2, cap, K, Dh]`` block); offs ``[len(layers)]``: the row of each layer's first kept token.
    Returns ``(x, hists, news)``: per layer ``[2, cap, K, Dh]`` and ``[2, T, K, Dh]`` (pre-RoPE keys).
    With no history (``cap == 0``) every layer runs against an empty cache (a new session, a recompute).

    ``hist_rotated`` (static; its programs are the device hits'): every layer's history is the device
    pool's bucket, one ``[2, cap, K, Dh]`` block read at row 0 (``read_rows``), keys already rotated.
    It is used as it is: no assembly (no concatenation, slice or zeroing: rows ``>= hist_len`` are
    masked in the attention, and the pool holds only finite values), no RoPE on the history keys,
    and the returned ``hists`` are those blocks (the caller does not write them back: they are in
    the pool already). Every other path (host, disk, read-buffer blocks) is traced as before.
    """
    TRACE_COUNTS["layers_in_program"] += 1
    T = x.shape[0]
    pooled = hist_rotated and bool(cap)
    if pooled:  # no history tables: the pool's keys are used as they are
        rope = layer_rope_tables(config, 0, positions, with_history=False)
    else:
        rope = _prefill_rope(config, cap, positions, naive, hist_rotated)  # once for all layers
    empty = jnp.zeros((2, 0, config.num_kv_heads, config.head_dim), config.jnp_dtype)
    hists, news = [], []
    for i, lp in enumerate(layers):
        if pooled:
            (hist,) = blocks[i]
        elif cap:
            lb = tuple(jax.device_put(b, jax.memory.Space.Device) for b in blocks[i])
            hist = assemble_blocks(lb, offs[i], hist_len, cap)
        else:
            hist = empty
        x, k, v = layer_step(lp, x, hist[0], hist[1], hist_len, positions, config, query_block(T), naive, rope,
                             hist_rotated=pooled)
        hists.append(hist)
        news.append(jnp.stack([k, v]))
    return x, tuple(hists), tuple(news)


# ---- the pool's input and output -----------------------------------------------------------------

def _scatter_rows(kv_pages, rows, positions, valid, table, config, rotate: bool):
    """Write ``rows [2, N, K, Dh]`` at ``positions [N]`` of a slot (block table ``[M]``); rows not
    ``valid`` go to the trash page 0. ``rotate``: the keys come pre-RoPE and are stored rotated to
    their positions (the pool's keys are rotated once, here, not at every decode step)."""
    B = kv_pages.shape[2]
    if rotate:
        cos, sin = rope_tables(positions, config.head_dim, config.rope_theta, config.rope_scaling)
        rows = jnp.stack([apply_rope(rows[0], cos, sin), rows[1]])
    page = jnp.where(valid, table[jnp.minimum(positions // B, table.shape[0] - 1)], 0)
    row = jnp.where(valid, positions % B, 0)
    return kv_pages.at[:, page, row].set(rows.astype(kv_pages.dtype))


@functools.partial(jax.jit, static_argnames=("write_hist", "config", "rotate"), donate_argnames=("pool",))
def write_pages(pool, hists, news, table, hist_len, n_new, write_hist: bool, config: ModelConfig = None,
                rotate: bool = False):
    """Put a prefilled job's KV into its pages: the history rows ``[0, hist_len)`` (unless they are
    already there: a device hit) and the new rows at ``hist_len + [0, n_new)``. DONATES ``pool``.
    hists: per layer ``[2, S, K, Dh]``; news: per layer ``[2, T, K, Dh]``. ``rotate``: the keys come
    pre-RoPE (``rope_mode="decoupled"``) and go into the pool rotated to their positions."""
    TRACE_COUNTS["write_pages"] += 1
    out = []
    for kv, hist, new in zip(pool, hists, news):
        if write_hist and hist.shape[1]:
            i = jnp.arange(hist.shape[1], dtype=jnp.int32)
            kv = _scatter_rows(kv, hist, i, i < hist_len, table, config, rotate)
        j = jnp.arange(new.shape[1], dtype=jnp.int32)
        kv = _scatter_rows(kv, new, hist_len + j, j < n_new, table, config, rotate)
        out.append(kv)
    return tuple(out)


@functools.partial(jax.jit, static_argnames=("cap", "config", "rotate"), donate_argnames=("kv",))
def write_history(kv, blocks, off, table, hist_len, cap: int, config: ModelConfig = None, rotate: bool = False):
    """One layer's history into a slot's pages (block table ``[M]``): its store blocks (``[2, B, K, Dh]``,
    ``pinned_host`` or device, padded to the count of bucket ``cap``: ``prefill.padded_blocks``) moved
    to the device and assembled here as the in-program prefill assembles a host hit's history
    (``off``: the row of the first kept token), then rows ``[0, hist_len)`` written as
    :func:`write_pages` writes them (keys rotated when ``rotate``): a queued job's history preloaded
    into the pool (engine/pool_preload.py). One program per ``cap`` bucket, whatever the layer or the
    history's length. DONATES ``kv`` (that layer's ``[2, P, B, K, Dh]``)."""
    TRACE_COUNTS["write_history"] += 1
    lb = tuple(jax.device_put(b, jax.memory.Space.Device) for b in blocks)
    hist = assemble_blocks(lb, off, hist_len, cap)
    i = jnp.arange(cap, dtype=jnp.int32)
    return _scatter_rows(kv, hist, i, i < hist_len, table, config, rotate)


@functools.partial(jax.jit, static_argnames=("size",))
def read_rows(pool, table, start, size: int):
    """Rows ``[start, start + size)`` of a slot, per layer ``[2, size, K, Dh]`` (rows past the
    slot's pages read the trash page: the caller slices them away). Keys as the pool holds them
    (rotated to their positions)."""
    TRACE_COUNTS["read_rows"] += 1
    B = pool[0].shape[2]
    pos = start + jnp.arange(size, dtype=jnp.int32)
    page = table[jnp.minimum(pos // B, table.shape[0] - 1)]
    return tuple(kv[:, page, pos % B] for kv in pool)


@functools.partial(jax.jit, static_argnames=("size",))
def read_decoded(pool, raw_k, table, slot, start, size: int):
    """Decoded rows ``[start, start + size)`` of ``slot`` as the store keeps them, per layer
    ``[2, size, K, Dh]``: pre-RoPE keys from the decode state's ring ``raw_k`` (per layer
    ``[S, R, K, Dh]``, row ``i`` at ``i % R``; only the last R rows are there), values from the pool."""
    TRACE_COUNTS["read_decoded"] += 1
    B = pool[0].shape[2]
    pos = start + jnp.arange(size, dtype=jnp.int32)
    page = table[jnp.minimum(pos // B, table.shape[0] - 1)]
    out = []
    for kv, rk in zip(pool, raw_k):
        k = rk[slot, pos % rk.shape[1]]
        out.append(jnp.stack([k.astype(kv.dtype), kv[1, page, pos % B]]))
    return tuple(out)
