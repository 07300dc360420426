"""The turn: find the session's KV, truncate on overflow, prefill layer by layer behind the
loads, decode, and save the new KV asynchronously. The only place where model and store meet.

Device work goes through a few jitted entry points (embed, one step per layer, unembed, the
decode step); host code only orders them. JAX dispatch is asynchronous, so the load of layer
``l + k`` (a ``pinned_host -> device`` copy issued by the store) is in flight while layer ``l``
computes, and the save of a layer's new KV (``device -> host`` copy, then a TensorStore write)
runs while the next layers compute. One sync per decode step (the sampled token).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.engine.config import EngineConfig, TurnResult
from jax_cachedattn.engine.truncation import ContextOverflow, plan_truncation
from jax_cachedattn.model import (
    TRACE_COUNTS,
    ModelConfig,
    TokenError,
    bucket_length,
    decode_step,
    embed_jit,
    layer_step_jit,
    sample,
    unstack_layers,
    validate_tokens,
)
from jax_cachedattn.store import KVLost, TieredStore, validate_session_id


class InputError(ValueError):
    """A turn's input cannot be served (empty message, no tokenizer for text, ...)."""


class _Rows:
    """Rows ``[lo, hi)`` of a device array ``[2, T, K, Dh]``, sliced on the host after the copy.

    Handed to ``store.save_layer``: the device -> host copy starts now, the slice costs nothing
    and no per-length program is compiled. Holding it keeps the device buffer alive until the
    store has copied it (the device write buffer).
    """

    def __init__(self, arr: jax.Array, lo: int, hi: int):
        self._arr, self._lo, self._hi = arr, lo, hi
        self.shape = (arr.shape[0], hi - lo) + tuple(arr.shape[2:])
        self.dtype = arr.dtype
        try:
            arr.copy_to_host_async()
        except Exception:  # noqa: BLE001 - some backends have no async host copy: np.asarray copes
            pass

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self._arr)[:, self._lo : self._hi]
        return out.astype(dtype) if dtype is not None else out


@functools.partial(jax.jit, static_argnames=("config",))
def _logits_at(params, config: ModelConfig, x, idx):
    """Logits ``[V]`` of row ``idx`` of ``x [T, D]``."""
    from jax_cachedattn.model import unembed

    TRACE_COUNTS["logits_at"] += 1
    return unembed(params, config, jax.lax.dynamic_slice_in_dim(x, idx, 1))[0]


@functools.partial(jax.jit, static_argnames=("config",))
def _all_logits(params, config: ModelConfig, x):
    from jax_cachedattn.model import unembed

    return unembed(params, config, x)


@functools.partial(jax.jit, static_argnames=("config", "S", "naive"))
def _rope_tables(config: ModelConfig, S: int, positions, naive: bool):
    """A turn's RoPE tables, computed once for the per-layer steps of ``preload="layerwise"``."""
    from jax_cachedattn.model import layer_rope_tables

    return layer_rope_tables(config, S, positions, with_history=not naive)


@functools.partial(jax.jit, static_argnames=("config", "cap", "naive"))
def _layers_in_program(layers, config: ModelConfig, x, blocks, offs, hist_len, positions, cap: int, naive: bool):
    """Consecutive layers in one program: each layer's history blocks come in as they are
    (``pinned_host`` or device), are moved to the device inside the program and assembled there, so
    XLA can overlap the copies of later layers with the compute of earlier ones.

    layers: the group's per-layer params (unstacked: slicing the stacked ``params["layers"]`` inside
    an unrolled program copies every layer's weights). x ``[T, D]``. blocks: per layer a tuple of
    ``[2, B, K, Dh]`` blocks (a layer already in the read buffer comes as one ``[2, cap, K, Dh]``
    block); offs ``[len(layers)]``: the row of each layer's first kept token in its concatenation.
    Returns ``(x, hists, news)``: ``hists`` per layer ``[2, cap, K, Dh]``, ``news`` per layer
    ``[2, T, K, Dh]`` (pre-RoPE keys). Compiled once per (group size, block counts, T, cap).
    """
    from jax_cachedattn.model import layer_rope_tables, layer_step, query_block
    from jax_cachedattn.store import assemble_blocks

    TRACE_COUNTS["layers_in_program"] += 1
    T = x.shape[0]
    rope = layer_rope_tables(config, cap, positions, with_history=not naive)  # once for all layers
    hists, news = [], []
    for i, lp in enumerate(layers):
        lb = tuple(jax.device_put(b, jax.memory.Space.Device) for b in blocks[i])
        hist = assemble_blocks(lb, offs[i], hist_len, cap)
        x, k, v = layer_step(lp, x, hist[0], hist[1], hist_len, positions, config, query_block(T), naive, rope)
        hists.append(hist)
        news.append(jnp.stack([k, v]))
    return x, tuple(hists), tuple(news)


@functools.partial(jax.jit, static_argnames=("config", "naive"))
def _prefill_scan(params, config: ModelConfig, tokens, naive: bool):
    """A turn with no cached history (a new session or a recompute) as one scanned program over the
    layers. Returns ``(x [T, D], news)``, ``news`` ``L x [2, T, K, Dh]`` (pre-RoPE keys)."""
    from jax_cachedattn.model import embed, layer_rope_tables, layer_step, query_block

    TRACE_COUNTS["prefill_scan"] += 1
    T = tokens.shape[0]
    empty = jnp.zeros((0, config.num_kv_heads, config.head_dim), config.jnp_dtype)
    positions = jnp.arange(T, dtype=jnp.int32)
    rope = layer_rope_tables(config, 0, positions)  # once, not once per layer

    def body(x, lp):
        x, k, v = layer_step(lp, x, empty, empty, jnp.int32(0), positions, config, query_block(T), naive, rope)
        return x, jnp.stack([k, v])

    x, new_kv = jax.lax.scan(body, embed(params, tokens), params["layers"])
    return x, tuple(new_kv[i] for i in range(config.num_layers))


@functools.partial(jax.jit, static_argnames=("cap",))
def _assemble(hists, news, hist_len, cap: int):
    """Decode cache ``[L, 2, cap, K, Dh]``: history rows then the new rows at ``hist_len``."""
    TRACE_COUNTS["assemble"] += 1
    h = jnp.stack(hists)  # [L, 2, S, K, Dh]
    n = jnp.stack(news)  # [L, 2, T, K, Dh]
    L, _, S, K, Dh = h.shape
    cache = jnp.zeros((L, 2, cap, K, Dh), n.dtype)
    cache = jax.lax.dynamic_update_slice(cache, h, (0, 0, 0, 0, 0))
    return jax.lax.dynamic_update_slice(cache, n, (0, 0, hist_len, 0, 0))


@functools.partial(jax.jit, static_argnames=("size",))
def _rows_of(cache, start, size: int):
    """Per-layer rows ``[start, start+size)`` of the decode cache, as a tuple of ``[2, size, K, Dh]``."""
    part = jax.lax.dynamic_slice_in_dim(cache, start, size, axis=2)
    return tuple(part[i] for i in range(cache.shape[0]))


def prompt_bucket_length(n: int, step: int = 16) -> int:
    """Bucket of ``n`` new tokens: a multiple of ``step`` up to 256 tokens, of 128 beyond (0 for 0)."""
    if n <= 0:
        return 0
    if n <= 256:
        return -(-n // step) * step
    return -(-n // 128) * 128


def group_sizes(num_layers: int, groups: int, growth: float) -> list[int]:
    """Split ``num_layers`` into ``groups`` consecutive groups, each ``growth`` times the one before
    (rounded; every group non-empty)."""
    groups = max(1, min(groups, num_layers))
    w = [growth**i for i in range(groups)]
    sizes = [max(1, round(num_layers * x / sum(w))) for x in w]
    sizes[-1] += num_layers - sum(sizes)
    while sizes[-1] < 1:  # rounding gave the earlier groups too much
        i = max(range(groups - 1), key=lambda j: sizes[j])
        sizes[i] -= 1
        sizes[-1] += 1
    return sizes


@dataclasses.dataclass
class _Preloaded:
    """The read buffer: a queued job's first layers, loaded while the current job decodes."""

    num_tokens: int
    turn: int
    cap: int
    layers: dict[int, jax.Array]


class Engine:
    """Runs conversation turns against a :class:`TieredStore`.

    ``Engine(model_config, params, store, tokenizer, config)``; ``store=None`` keeps nothing
    across turns. With a tokenizer, messages are text rendered with the chat template; without
    one, messages are token ids.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        params: dict,
        store: TieredStore | None = None,
        tokenizer: Any = None,
        config: EngineConfig | None = None,
    ):
        self.model_config = model_config
        self.params = params
        self.layers = unstack_layers(params)
        self.store = store
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self._key = jax.random.key(self.config.seed)
        self._read_buffer: dict[str, _Preloaded] = {}
        self._t_load_per_byte: float | None = None  # seconds per byte, host -> device (EMA)
        self._t_layer: dict[tuple[int, int], float] = {}  # (S, T) bucket -> seconds per layer (EMA)
        if store is not None:
            lay = store.layout
            mc = model_config
            if (lay.num_layers, lay.kv_heads, lay.head_dim, lay.dtype) != (mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.dtype):
                raise ValueError(f"store layout {lay} does not match the model {mc.name}")
        self._boundary_id = tokenizer.token_to_id("<|im_start|>") if tokenizer is not None else None

    # ---- inputs -------------------------------------------------------------------------------
    def _prompt_ids(self, message: str | Sequence[int] | np.ndarray, first_turn: bool) -> np.ndarray:
        if isinstance(message, str):
            if not message.strip():
                raise InputError("the message is empty")
            if self.tokenizer is None:
                raise InputError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.chat_turn(message, first_turn=first_turn)
            return validate_tokens(np.asarray(ids, np.int32), self.model_config, what="message")
        return validate_tokens(message, self.model_config, what="message")

    def _lookup(self, sid: str):
        if self.store is None:
            return None
        return self.store.lookup(sid)

    # ---- read-ahead sizing (the paper's read buffer) --------------------------------------------
    def _read_ahead(self, hist_len: int, S: int, T: int) -> int:
        L = self.model_config.num_layers
        if self.config.read_ahead is not None:
            return min(L, self.config.read_ahead)
        t_comp = self._t_layer.get((S, T))
        if self._t_load_per_byte is None or t_comp is None or t_comp <= 0:
            return min(L, 2)
        t_load = self._t_load_per_byte * hist_len * self.store.layout.bytes_per_token_layer
        if t_load <= t_comp:
            return min(L, 2)
        # Loading is slower: keep enough layers in flight that the last load lands when compute needs it.
        return min(L, 1 + math.ceil(L * (1.0 - t_comp / t_load)))

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else 0.7 * old + 0.3 * new

    # ---- the read buffer ------------------------------------------------------------------------
    def preload(self, sid: str, layers: int | None = None) -> bool:
        """Start loading the first ``layers`` layers of ``sid``'s history to the device now.

        Called for the next queued job while the current one decodes; the loads are dispatched
        asynchronously and held until that job's turn picks them up. Returns False when there is
        nothing to preload.
        """
        if self.store is None or not self.config.use_cache:
            return False
        info = self.store.lookup(sid)
        if info is None or not info.kv_valid or info.num_tokens == 0:
            return False
        S = bucket_length(info.num_tokens)
        k = layers if layers is not None else self._read_ahead(info.num_tokens, S, bucket_length(64))
        pre = _Preloaded(info.num_tokens, info.turn, S, {})
        for layer in range(min(k, self.model_config.num_layers)):
            pre.layers[layer] = self.store.load_layer(sid, layer, pad_to=S)
        self._read_buffer[sid] = pre
        return True

    def _take_preloaded(self, sid: str, num_tokens: int, turn: int, cap: int) -> dict[int, jax.Array]:
        pre = self._read_buffer.pop(sid, None)
        if pre is None or (pre.num_tokens, pre.turn, pre.cap) != (num_tokens, turn, cap):
            return {}
        return pre.layers

    # ---- one turn ---------------------------------------------------------------------------------
    def turn(self, session_id: str, message: str | Sequence[int] | np.ndarray, *, max_new_tokens: int | None = None,
             next_session: str | None = None) -> TurnResult:
        """Run one turn of ``session_id`` with the new user ``message``; see :class:`TurnResult`.

        ``next_session``: the job queued after this one; its first layers are preloaded into the
        read buffer while this turn decodes.
        """
        t0 = time.perf_counter()
        cfg, ec, mc = self.config, self.config, self.model_config
        sid = validate_session_id(session_id)
        max_new = ec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new}")
        info = self._lookup(sid)
        chat = isinstance(message, str)
        new_ids = self._prompt_ids(message, first_turn=info is None)
        hist_ids = np.zeros(0, np.int32) if info is None else np.asarray(info.token_ids, np.int32)
        reserve = max_new + 2  # the reply and the tokens that close it (<|im_end|>\n)
        n_drop = plan_truncation(hist_ids, len(new_ids), reserve, mc.max_context, cfg.truncation_ratio, self._boundary_id)
        kv_valid = info is not None and info.kv_valid
        if n_drop:
            self._read_buffer.pop(sid, None)
            hist_ids = hist_ids[n_drop:]
            if kv_valid:
                self.store.truncate_front(sid, n_drop)
        if info is None:
            source = "new"
        elif not kv_valid or not ec.use_cache:
            source = "recompute"
        else:
            source = info.tier or "recompute"
        hist_len = len(hist_ids)
        if source in ("new", "recompute"):
            # Everything is computed; only rows the store does not hold yet are saved.
            compute_ids = np.concatenate([hist_ids, new_ids])
            cached_len, save_from = 0, (hist_len if kv_valid else 0)
        else:
            compute_ids, cached_len, save_from = new_ids, hist_len, hist_len
        try:
            result = self._run(sid, info, compute_ids, cached_len, save_from, hist_ids, new_ids, max_new,
                               source, t0, n_drop, next_session, chat)
        except KVLost:
            # A checksum failure found while loading: recompute from the token ids, same answer.
            self.store.delete(sid)
            compute_ids = np.concatenate([hist_ids, new_ids])
            result = self._run(sid, None, compute_ids, 0, 0, hist_ids, new_ids, max_new, "recompute", t0, n_drop,
                               next_session, chat)
        return result

    def _run(self, sid, info, compute_ids, cached_len, save_from, hist_ids, new_ids, max_new, source, t0, n_drop,
             next_session, chat) -> TurnResult:
        mc, store = self.model_config, self.store
        ec = self.config
        if ec.preload == "auto":
            # In-program was the faster at most shapes in scripts/bench_overlap.py on the CPU (see
            # README): from host/device memory as one program, from disk as `program_groups` programs
            # of growing size, so that the first (small) group computes while later layers are still
            # being read.
            ec = ec.replace(preload="in_program")
        L, K, Dh = mc.num_layers, mc.num_kv_heads, mc.head_dim
        naive = ec.rope_mode == "naive"
        n_comp = len(compute_ids)
        # New tokens bucket finer (128) than history capacity (256): padding is compute, capacity is a copy.
        S, T = bucket_length(cached_len), prompt_bucket_length(n_comp, ec.prompt_bucket)
        padded = np.zeros(T, np.int32)
        padded[:n_comp] = compute_ids
        positions = jnp.arange(cached_len, cached_len + T, dtype=jnp.int32)
        hist_len_arr = jnp.int32(cached_len)

        # ---- layer-wise pre-loading: loads run ahead of compute ----------------------------------
        loads: dict[int, jax.Array] = {}
        empty = jnp.zeros((2, 0, K, Dh), mc.jnp_dtype)
        if cached_len and ec.preload == "in_program":
            ready = self._take_preloaded(sid, info.num_tokens, info.turn, S)  # already [2, S, K, Dh] on device
            preloaded = len(ready)
            groups = ec.program_groups or (4 if source == "disk" else 1)
            sizes = group_sizes(L, groups, ec.group_growth)
            ahead = sizes[0]
            if source == "disk":
                store.prefetch(sid)  # every layer's read in flight at once; each group waits for its own
            x = embed_jit(self.params, mc, jnp.asarray(padded))
            hists, news = [], []
            for g0, size in zip(np.cumsum([0] + sizes[:-1]).tolist(), sizes):
                idx = range(g0, g0 + size)
                parts = [((ready[i],), 0) if i in ready else store.layer_blocks(sid, i)[:2] for i in idx]
                x, h, n = _layers_in_program(
                    tuple(self.layers[i] for i in idx), mc, x, tuple(p[0] for p in parts),
                    jnp.asarray([p[1] for p in parts], jnp.int32), hist_len_arr, positions, S, naive)
                hists += h
                news += n
                for i, layer in enumerate(idx):
                    store.save_layer(sid, layer, _Rows(n[i], 0, n_comp), start=save_from)
        elif not cached_len and ec.preload == "in_program":
            ahead = preloaded = 0
            x, news = _prefill_scan(self.params, mc, jnp.asarray(padded), naive)
            hists, news = [empty] * L, list(news)
            if store is not None and n_comp > save_from:
                for layer in range(L):
                    store.save_layer(sid, layer, _Rows(news[layer], save_from, n_comp), start=save_from)
        elif cached_len:
            loads.update(self._take_preloaded(sid, info.num_tokens, info.turn, S))
            preloaded = len(loads)
            if source == "disk":
                store.prefetch(sid)
            if ec.preload == "upfront":
                ahead = L
            elif source == "disk" and ec.read_ahead is None:
                # Every layer's disk read is already in flight (the store reads them concurrently) and
                # a disk load blocks this thread until its layer is verified: ask for the next one
                # only, so compute is dispatched as soon as each layer lands.
                ahead = 1
            else:
                ahead = self._read_ahead(cached_len, S, T)
            t_l0 = time.perf_counter()
            measure = 0 not in loads and source in ("host", "device")
            if 0 not in loads:
                loads[0] = store.load_layer(sid, 0, pad_to=S)
            if ec.preload == "upfront":
                for layer in range(1, L):
                    if layer not in loads:
                        loads[layer] = store.load_layer(sid, layer, pad_to=S)
                jax.block_until_ready(list(loads.values()))
            else:
                loads[0].block_until_ready()
                if measure:
                    self._t_load_per_byte = self._ema(self._t_load_per_byte, (time.perf_counter() - t_l0) /
                                                      max(1, cached_len * store.layout.bytes_per_token_layer))
        else:
            ahead = preloaded = 0
        if ec.preload != "in_program":
            x = embed_jit(self.params, mc, jnp.asarray(padded))
            rope = _rope_tables(mc, S, positions, naive)
            hists, news = [], []
            for layer in range(L):
                for j in range(layer + 1, min(L, layer + 1 + ahead)):
                    if j not in loads:
                        loads[j] = store.load_layer(sid, j, pad_to=S)
                hist = loads.pop(layer) if cached_len else empty
                t_c = time.perf_counter() if layer == 0 else None
                x, new_kv = layer_step_jit(self.layers[layer], x, hist, hist_len_arr, positions, mc, naive, rope)
                if t_c is not None and cached_len:
                    x.block_until_ready()
                    self._t_layer[(S, T)] = self._ema(self._t_layer.get((S, T)), time.perf_counter() - t_c)
                if store is not None and n_comp > save_from - cached_len:
                    store.save_layer(sid, layer, _Rows(new_kv, save_from - cached_len, n_comp), start=save_from)
                hists.append(hist)
                news.append(new_kv)
        prompt_logits = np.asarray(_all_logits(self.params, mc, x)[:n_comp]) if ec.return_logits else None
        logits = _logits_at(self.params, mc, x, jnp.int32(n_comp - 1))
        tok = int(self._sample(logits))
        ttft = time.perf_counter() - t0

        # ---- decode ------------------------------------------------------------------------------
        if next_session and next_session != sid:
            try:
                self.preload(next_session)
            except Exception:  # noqa: BLE001 - a preload is only a hint
                pass
        total_hist = cached_len
        cap = bucket_length(max(total_hist + T, total_hist + n_comp + max_new + 4))
        cache = _assemble(tuple(hists), tuple(news), jnp.int32(total_hist), cap)
        del hists, news, loads
        length = total_hist + n_comp
        saved = length
        stop_ids = self.tokenizer.stop_ids if self.tokenizer is not None else set()
        generated = [tok]
        decode_logits = [np.asarray(logits)] if ec.return_logits else None
        while len(generated) < max_new and tok not in stop_ids:
            logits, cache = decode_step(self.params, mc, jnp.int32(tok), cache, jnp.int32(length), naive)
            length += 1
            tok = int(self._sample(logits))
            generated.append(tok)
            if decode_logits is not None:
                decode_logits.append(np.asarray(logits))
            if store is not None and length - saved >= ec.save_every:
                self._save_rows(sid, cache, saved, length, total_hist)
                saved = length
        # Feed the last sampled token and the template's closing tokens so that the stored history
        # is exactly the conversation as the chat template renders it.
        tail = [tok]
        if chat:
            end = list(self.tokenizer.assistant_end())
            tail = [tok] + (end[1:] if tok == end[0] else end)
        fed = list(generated[:-1])
        for t in tail:
            _, cache = decode_step(self.params, mc, jnp.int32(t), cache, jnp.int32(length), naive)
            length += 1
        fed += tail
        all_ids = np.concatenate([hist_ids, new_ids, np.asarray(fed, np.int32)]).astype(np.int32)
        assert length == len(all_ids), (length, len(all_ids))
        if store is not None:
            if length > saved:
                self._save_rows(sid, cache, saved, length, total_hist)
            store.commit_turn(sid, all_ids)
        reply_ids = [t for t in generated if t not in stop_ids]
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        return TurnResult(
            session=sid, reply=reply, reply_tokens=reply_ids, history_tokens=len(hist_ids),
            prompt_tokens=len(new_ids), generated_tokens=len(generated), truncated_tokens=n_drop,
            ttft_s=ttft, total_s=time.perf_counter() - t0, source=source,
            reused_tokens=cached_len, read_ahead=ahead, preloaded_layers=preloaded,
            preload=ec.preload if cached_len else "none",
            prompt_logits=None if prompt_logits is None else prompt_logits[len(compute_ids) - len(new_ids):],
            decode_logits=decode_logits,
        )

    def _save_rows(self, sid: str, cache: jax.Array, lo: int, hi: int, base: int) -> None:
        """Save decode-cache rows ``[lo, hi)`` (absolute cache rows) of every layer, asynchronously."""
        size = bucket_length(hi - lo, minimum=self.config.save_every)
        start = min(lo, cache.shape[2] - size)
        parts = _rows_of(cache, jnp.int32(start), size)
        for layer, part in enumerate(parts):
            self.store.save_layer(sid, layer, _Rows(part, lo - start, hi - start), start=lo)

    def _sample(self, logits: jax.Array) -> jax.Array:
        ec = self.config
        if ec.temperature == 0:
            return sample(logits)
        self._key, sub = jax.random.split(self._key)
        return sample(logits, sub, ec.temperature, ec.top_p)

    # ---- batches and lifecycle ----------------------------------------------------------------
    def run_batch(self, turns: Sequence[tuple[str, str | Sequence[int]]], *, window: int = 4) -> list[TurnResult]:
        """Run turns in order. The queue is visible to the store: the next ``window`` jobs' sessions
        are prefetched disk -> host, and the next job's first layers are preloaded while the
        current one decodes."""
        results = []
        for i, (sid, msg) in enumerate(turns):
            if self.store is not None and self.config.use_cache:
                upcoming = [s for s, _ in turns[i + 1 : i + 1 + window]]
                policy = getattr(self.store, "policy", None)
                if policy is not None and hasattr(policy, "set_future"):
                    policy.set_future([s for s, _ in turns[i:]])
                for s in upcoming:
                    if s != sid:
                        try:
                            if self.store.lookup(s) is not None:
                                self.store.prefetch(s)
                        except Exception:  # noqa: BLE001 - a hint only
                            pass
            nxt = turns[i + 1][0] if i + 1 < len(turns) else None
            results.append(self.turn(sid, msg, next_session=nxt))
        return results

    def flush(self) -> None:
        if self.store is not None:
            self.store.flush()

    def close(self) -> None:
        self._read_buffer.clear()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Engine", "InputError", "ContextOverflow", "TokenError"]
