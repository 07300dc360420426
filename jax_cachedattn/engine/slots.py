"""The decode state of every slot and the two programs over it: ``insert`` and ``generate``.

JetStream's shape: ``prefill`` (engine/prefill.py) leaves a job's KV in its pages; ``insert`` puts
the job into a free slot (its block table, length, first sampled token, PRNG key, sampling
settings); ``generate`` steps every active slot together, ``steps`` tokens per dispatch. Both are
jitted once per engine and DONATE the state and the pool: the cache is updated in place, never
copied. The host loop only moves jobs between the queue and the slots.

A slot's life: IDLE -> GEN (sampling; the sampled token is fed next) -> CLOSE (feeding the tokens
that close the turn: the chat template's end, and the last sampled token when the budget ran out)
-> DONE (every token of the turn has its KV in the pool; the host commits it and frees the slot).
A stop token is not fed: the turn is closed with the template's end instead (so a reply ended by
``<|endoftext|>`` is stored as the template renders it, ``...<|im_end|>\\n``).

The pool holds every slot's keys rotated to their positions (its history is rotated once, when
written into its pages at insert), so a step rotates only its new token's key. The store keeps keys
before RoPE: each step also puts its new pre-RoPE keys into ``raw_k``, a ring of the last R rows
per slot, from which the engine's saves take them (values come from the pool).

Legend: S slots, M pages per slot, E closing tokens (at most), V vocab, D d_model, R ring rows, L layers.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from jax_cachedattn.model import TRACE_COUNTS, ModelConfig, embed, rope_tables, unembed
from jax_cachedattn.model.paged_attention import paged_decode_block

IDLE, GEN, CLOSE, DONE = 0, 1, 2, 3


@flax.struct.dataclass
class DecodeState:
    """Every slot's decode state; one pytree, donated through each step."""

    tokens: jax.Array  # [S] int32: the token fed at the next step
    lengths: jax.Array  # [S] int32: KV rows the slot holds = position of the token fed next
    tables: jax.Array  # [S, M] int32: block tables (trash page 0 past the slot's pages)
    phase: jax.Array  # [S] int32: IDLE, GEN, CLOSE or DONE
    count: jax.Array  # [S] int32: tokens sampled this turn
    budget: jax.Array  # [S] int32: max new tokens of the turn
    end: jax.Array  # [S, E] int32: the template's closing tokens (empty for token-id messages)
    end_len: jax.Array  # [S] int32
    tail: jax.Array  # [S, E + 1] int32: tokens to feed while closing
    tail_len: jax.Array  # [S] int32
    tail_pos: jax.Array  # [S] int32: next index into tail
    keys: jax.Array  # [S] PRNG keys (typed), one stream per slot
    temperature: jax.Array  # [S] float32 (0: greedy)
    top_p: jax.Array  # [S] float32
    raw_k: tuple  # per layer [S, R, K, Dh]: the pre-RoPE keys of each slot's last R rows (row i at i % R)


def empty_state(slots: int, width: int, end_max: int, ring: int = 1, raw_shape: tuple = (0, 1, 1),
                dtype=jnp.float32, device=None) -> DecodeState:
    """raw_shape: ``(layers, kv_heads, head_dim)`` of the ring of pre-RoPE keys (``ring`` rows per slot)."""
    L, K, Dh = raw_shape

    def z():  # a buffer of its own per field: the state is donated leaf by leaf
        return jnp.zeros((slots,), jnp.int32)

    st = DecodeState(
        tokens=z(), lengths=z(), tables=jnp.zeros((slots, width), jnp.int32), phase=z(), count=z(), budget=z(),
        end=jnp.zeros((slots, end_max), jnp.int32), end_len=z(), tail=jnp.zeros((slots, end_max + 1), jnp.int32),
        tail_len=z(), tail_pos=z(), keys=jax.random.split(jax.random.key(0), slots),
        temperature=jnp.zeros((slots,), jnp.float32), top_p=jnp.ones((slots,), jnp.float32),
        raw_k=tuple(jnp.zeros((slots, ring, K, Dh), dtype) for _ in range(L)),
    )
    # Committed to the device like every later state, so the first step compiles the same program.
    return jax.device_put(st, device or jax.devices()[0])


def _sample(logits, keys, temperature, top_p):
    """Per slot: argmax when its temperature is 0, else a top-p draw with its own key. ``[S, V] -> [S]``."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(lg, key, t, p):
        z = lg.astype(jnp.float32) / jnp.maximum(t, 1e-6)
        sorted_z = jnp.sort(z)[::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_z))
        cutoff = sorted_z[jnp.minimum(jnp.searchsorted(cum, p), z.shape[-1] - 1)]
        return jax.random.categorical(key, jnp.where(z < cutoff, -jnp.inf, z)).astype(jnp.int32)

    hot = temperature > 0
    drawn = jax.lax.cond(jnp.any(hot), lambda: jax.vmap(draw)(logits, keys, temperature, top_p), lambda: greedy)
    return jnp.where(hot, drawn, greedy)


def _advance(st: DecodeState, sampled, gen, stop_ids) -> DecodeState:
    """Slots in ``gen`` sampled ``sampled``: continue, or start closing (stop token or budget)."""
    count = st.count + gen
    is_stop = jnp.isin(sampled, stop_ids)
    fin_stop = gen & is_stop
    fin = fin_stop | (gen & (count >= st.budget))
    use_end = fin_stop & (st.end_len > 0)  # chat: a stop token is replaced by the template's end
    E = st.end.shape[1]
    tail_end = jnp.concatenate([st.end, jnp.zeros((st.end.shape[0], 1), jnp.int32)], axis=1)
    tail_tok = jnp.concatenate([sampled[:, None], st.end], axis=1)
    new_tail = jnp.where(use_end[:, None], tail_end, tail_tok)
    new_len = jnp.where(use_end, st.end_len, st.end_len + 1)
    del E
    return st.replace(
        count=count,
        tokens=jnp.where(fin, new_tail[:, 0], jnp.where(gen, sampled, st.tokens)),
        tail=jnp.where(fin[:, None], new_tail, st.tail),
        tail_len=jnp.where(fin, new_len, st.tail_len),
        tail_pos=jnp.where(fin, 1, st.tail_pos),
        phase=jnp.where(fin, CLOSE, st.phase),
    )


@functools.partial(jax.jit, donate_argnames=("state",))
def insert(state: DecodeState, slot, table, length, first_logits, key, budget, end, end_len, temperature, top_p,
           stop_ids):
    """Put a prefilled job into ``slot``: its block table ``[M]``, the ``length`` rows it holds, and
    its first token sampled from ``first_logits [V]``. DONATES ``state``. Returns
    ``(state, first_token)``."""
    TRACE_COUNTS["slots_insert"] += 1
    key, sub = jax.random.split(key)
    first = _sample(first_logits[None], sub[None], temperature[None], top_p[None])[0]

    def put(a, v):
        return a.at[slot].set(v)

    st = state.replace(
        tokens=put(state.tokens, first), lengths=put(state.lengths, length), tables=put(state.tables, table),
        phase=put(state.phase, GEN), count=put(state.count, 0), budget=put(state.budget, budget),
        end=put(state.end, end), end_len=put(state.end_len, end_len), tail_pos=put(state.tail_pos, 0),
        keys=put(state.keys, key), temperature=put(state.temperature, temperature), top_p=put(state.top_p, top_p),
    )
    gen = jnp.arange(state.tokens.shape[0]) == slot
    sampled = jnp.full_like(st.tokens, first)
    return _advance(st, sampled, gen, stop_ids), first


def decode_buckets(max_slots: int) -> tuple[int, ...]:
    """The decode batch sizes compiled for ``max_slots`` slots: powers of two below it, then itself."""
    return tuple(b for b in (1 << i for i in range(max_slots.bit_length())) if b < max_slots) + (max_slots,)


def decode_bucket(busy: int, max_slots: int) -> int:
    """The smallest decode batch (:func:`decode_buckets`) covering slots ``0 .. busy - 1``."""
    return next(b for b in decode_buckets(max_slots) if b >= busy)


@functools.partial(jax.jit, donate_argnames=("state",))
def set_table(state: DecodeState, slot, table) -> DecodeState:
    """A slot's block table ``[M]`` replaced (its reply grew onto a new page). DONATES ``state``."""
    TRACE_COUNTS["slots_set_table"] += 1
    return state.replace(tables=state.tables.at[slot].set(table))


@functools.partial(jax.jit, static_argnames=("config", "steps", "with_logits", "naive", "active"),
                   donate_argnames=("state", "pool"))
def generate(params, layers, config: ModelConfig, state: DecodeState, pool, stop_ids, steps: int,
             with_logits: bool = False, naive: bool = False, active: int | None = None):
    """``steps`` decode steps of every live slot (GEN or CLOSE). DONATES ``state`` and ``pool``.

    ``active``: only slots ``0 .. active - 1`` are stepped (the rest must be idle): the step's
    matmuls then have ``active`` rows, not ``max_slots`` (a bucket of :func:`decode_buckets`, so one
    program per bucket). None: every slot.

    params: the non-layer params (embed, final_norm, lm_head); layers: per-layer params (a tuple,
    unrolled: slicing stacked weights inside a program copies them). Returns ``(state, pool,
    emitted [steps, S], logits)`` (S = ``active`` when given): emitted holds each step's sampled token,
    -1 where a slot did not sample; logits ``[steps, S, V]`` (or None unless ``with_logits``). ``naive``: the store keeps
    post-RoPE keys too (``EngineConfig.rope_mode="naive"``): the saves read the pool, the ring is unused.
    ``state.raw_k`` has one ring per layer.
    """
    TRACE_COUNTS["slots_generate"] += 1
    full = state
    if active is not None and active < full.tables.shape[0]:
        state = jax.tree.map(lambda a: a[:active], full)
    S, M = state.tables.shape
    B = pool[0].shape[2]
    if len(state.raw_k) != len(layers):
        raise ValueError(f"the state has {len(state.raw_k)} key rings for {len(layers)} layers")
    R = 0 if naive else state.raw_k[0].shape[1]
    idx = jnp.arange(S)

    def step(carry, _):
        st, pool = carry
        live = (st.phase == GEN) | (st.phase == CLOSE)
        pos = st.lengths
        page = jnp.where(live, st.tables[idx, jnp.minimum(pos // B, M - 1)], 0)
        row = jnp.where(live, pos % B, 0)
        rope = rope_tables(pos, config.head_dim, config.rope_theta, config.rope_scaling)
        x = embed(params, st.tokens)
        new_pool, raw = [], []
        for lp, kv, rk in zip(layers, pool, st.raw_k):
            x, kv, k = paged_decode_block(lp, x, kv, st.tables, pos, page, row, live, config, rope)
            new_pool.append(kv)
            if R:  # only live slots write: a finished slot's last rows may still be waiting for their save
                r = pos % R
                rk = rk.at[idx, r].set(jnp.where(live[:, None, None], k.astype(rk.dtype), rk[idx, r]))
            raw.append(rk)
        st = st.replace(raw_k=tuple(raw))
        logits = unembed(params, config, x)  # [S, V] f32
        keys, subs = jnp.moveaxis(jax.vmap(jax.random.split)(st.keys), 1, 0)
        sampled = _sample(logits, subs, st.temperature, st.top_p)
        gen = st.phase == GEN
        closing = st.phase == CLOSE
        st = st.replace(lengths=st.lengths + live, keys=keys)
        more = st.tail_pos < st.tail_len
        nxt = st.tail[idx, jnp.minimum(st.tail_pos, st.tail.shape[1] - 1)]
        st = st.replace(
            tokens=jnp.where(closing & more, nxt, st.tokens),
            tail_pos=st.tail_pos + (closing & more),
            phase=jnp.where(closing & ~more, DONE, st.phase),
        )
        st = _advance(st, sampled, gen, stop_ids)
        out = jnp.where(gen, sampled, -1)
        return (st, tuple(new_pool)), (out, logits if with_logits else None)

    (state, pool), (emitted, logits) = jax.lax.scan(step, (state, tuple(pool)), None, length=steps)
    if state is not full and S < full.tables.shape[0]:  # the stepped slots back into the whole state
        state = jax.tree.map(lambda a, b: a.at[:S].set(b), full, state)
    return state, pool, emitted, logits
