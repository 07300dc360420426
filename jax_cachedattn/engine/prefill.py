"""Prefill of one job: its history brought to the device layer by layer behind compute, its new
tokens computed against it, their KV handed to the store as each layer finishes.

Three strategies, one small class each (``EngineConfig.preload``):

* :class:`NoHistory`: a new session or a recompute, every layer in one program.
* :class:`InProgram` (``in_program``, what ``auto`` picks): each layer's ``pinned_host`` blocks go
  into one jitted program that moves them to the device itself, so XLA overlaps layer ``l + 1``'s
  copy with layer ``l``'s compute; from disk the layers are split into programs of growing size,
  each dispatched as soon as its layers are read.
* :class:`PerLayer` (``layerwise``; ``upfront`` is the same with every layer loaded first): one
  jitted step per layer; the loads of the next ``read_ahead`` layers are dispatched before a layer
  computes.

A history already in the device pool (a device hit) enters every strategy as layers already
loaded. Each returns a :class:`Prefilled`; the engine then writes it into the job's pages.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.engine import programs as P
from jax_cachedattn.engine.plan import TurnPlan
from jax_cachedattn.engine.read_buffer import ReadAhead, ReadBuffer
from jax_cachedattn.model import TRACE_COUNTS, bucket_length


class Rows:
    """Rows ``[lo, hi)`` of a device array ``[2, T, K, Dh]``, sliced on the host after the copy.

    Handed to ``store.save_layer``: the device -> host copy starts now, the slice costs nothing and
    no per-length program is compiled. Holding it keeps the device buffer alive until the store has
    copied it (the device write buffer).
    """

    def __init__(self, arr: jax.Array, lo: int, hi: int):
        self._arr, self._lo, self._hi = arr, lo, hi
        self.shape = (arr.shape[0], hi - lo) + tuple(arr.shape[2:])
        self.dtype = arr.dtype
        arr.copy_to_host_async()

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self._arr)[:, self._lo : self._hi]
        return out.astype(dtype) if dtype is not None else out


def prompt_bucket_length(n: int, step: int = 16) -> int:
    """Bucket of ``n`` new tokens (0 for 0). Up to 256 tokens: ``n`` rounded up to a multiple of
    ``max(step, 2**(b - 3))``, where ``2**b`` is the power of two at or above ``n``: an eighth of an
    octave, never finer than ``step`` (step 8: 8, 16, ..., 64, then 80, 96, 112, 128, then 160, 192,
    224, 256), so a padded prompt is at most ~1/8 longer than its octave's top or ``step`` tokens
    longer, and the buckets up to 256 number 8 + 4 + 4 at step 8 (12 at step 16). Beyond 256: a
    multiple of 128. A short follow-up turn's cost grows with its padded length
    (``python -m jax_cachedattn.bench.turncost``; docs/benchmarks.md), so it is padded little, while the
    long prompts, whose per-token cost is what matters, share few programs."""
    if n <= 0:
        return 0
    if n <= 256:
        g = max(step, 1 << max(0, (n - 1).bit_length() - 3))
        return -(-n // g) * g
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
class Prefilled:
    """A job's prefill: ``x [T, D]``, per layer ``hists [2, S, K, Dh]`` and ``news [2, T, K, Dh]``."""

    x: jax.Array
    hists: tuple
    news: tuple
    mode: str  # how the history came: layerwise, in_program, upfront or none
    ahead: int  # layers in flight ahead of compute
    preloaded: int  # layers found in the read buffer


@dataclasses.dataclass
class Context:
    """What every strategy reads: the model, the store, the config, the read buffer and estimator."""

    config: object  # ModelConfig
    params: dict  # non-layer params
    layers: tuple  # per-layer params
    store: object  # TieredStore or None
    engine_config: object  # EngineConfig
    read_ahead: ReadAhead
    read_buffer: ReadBuffer

    def save_new(self, plan: TurnPlan, layer: int, new_kv: jax.Array) -> None:
        lo, n = plan.save_from - plan.cached_len, len(plan.compute_ids)
        if self.store is not None and n > lo:
            self.store.save_layer(plan.sid, layer, Rows(new_kv, lo, n), start=plan.save_from)


class NoHistory:
    """Every layer against an empty cache, one program."""

    def run(self, c: Context, plan: TurnPlan, x, positions, T: int, naive: bool) -> Prefilled:
        x, hists, news = P.layers_in_program(c.layers, c.config, x, tuple(() for _ in c.layers),
                                             jnp.zeros(len(c.layers), jnp.int32), jnp.int32(0), positions, 0, naive)
        for layer, n in enumerate(news):
            c.save_new(plan, layer, n)
        return Prefilled(x, hists, news, "none", 0, 0)


_ZERO_BLOCKS: dict = {}


def padded_blocks(blocks: tuple, S: int) -> tuple:
    """A layer's history blocks padded with a shared zero block (same shape, dtype and memory) to
    the count any history of capacity ``S`` may need, ``ceil((S + B - 1) / B)`` (the first kept
    token may sit anywhere in the first block): the in-program signature depends on the history
    bucket only, not on the history's length, so jobs of one bucket share one compiled program."""
    B = blocks[0].shape[1]
    want = -(-(S + B - 1) // B)
    if len(blocks) >= want:
        return tuple(blocks)
    b = blocks[0]
    key = (b.shape, b.dtype, b.sharding)
    if key not in _ZERO_BLOCKS:
        _ZERO_BLOCKS[key] = jax.device_put(np.zeros(b.shape, b.dtype), b.sharding)
    return tuple(blocks) + (_ZERO_BLOCKS[key],) * (want - len(blocks))


class InProgram:
    """Each group of layers as one program that moves its own history blocks to the device.

    The read buffer's rates come from here too: the compute rate from a job without history or with
    its history on the device (the engine), the load rate from a host job's program, whose time is
    at least the copy of every layer's history (an upper bound of the load time, exact when loading
    is the slower; when compute is the slower it says loads hide behind it, and the read-ahead
    stays small)."""

    def run(self, c: Context, plan: TurnPlan, x, positions, S: int, naive: bool, ready: dict, preloaded: int,
            rotated: bool = False):
        ec, store, L = c.engine_config, c.store, len(c.layers)
        groups = ec.program_groups or (4 if plan.source == "disk" else 1)
        sizes = group_sizes(L, groups, ec.group_growth)
        if plan.source == "disk":
            store.prefetch(plan.sid)  # every layer's read in flight at once; each group waits for its own
        measure = plan.source == "host" and not ready
        traced, t0 = sum(TRACE_COUNTS.values()), time.perf_counter()
        hists, news = [], []
        for g0, size in zip(np.cumsum([0] + sizes[:-1]).tolist(), sizes):
            idx = range(g0, g0 + size)
            parts = [((ready[i],), 0) if i in ready else store.layer_blocks(plan.sid, i)[:2] for i in idx]
            parts = [(p[0] if i in ready else padded_blocks(p[0], S), p[1]) for i, p in zip(idx, parts)]
            x, h, n = P.layers_in_program(
                tuple(c.layers[i] for i in idx), c.config, x, tuple(p[0] for p in parts),
                jnp.asarray([p[1] for p in parts], jnp.int32), jnp.int32(plan.cached_len), positions, S, naive, rotated)
            hists += h
            news += n
            for i, layer in enumerate(idx):
                c.save_new(plan, layer, n[i])
        if measure:
            x.block_until_ready()  # the engine waits for the first token next anyway
            if sum(TRACE_COUNTS.values()) == traced:  # a compile is neither load nor compute
                c.read_ahead.observe_load(L * plan.cached_len * store.layout.bytes_per_token_layer,
                                          time.perf_counter() - t0)
        return Prefilled(x, tuple(hists), tuple(news), "in_program", sizes[0], preloaded)


class PerLayer:
    """One jitted step per layer, the next ``ahead`` layers' loads dispatched before each."""

    def __init__(self, upfront: bool):
        self.upfront = upfront

    def run(self, c: Context, plan: TurnPlan, x, positions, S: int, T: int, naive: bool, ready: dict,
            preloaded: int, rotated: bool = False):
        ec, store, L = c.engine_config, c.store, len(c.layers)
        loads = dict(ready)
        hist_bytes = plan.cached_len * store.layout.bytes_per_token_layer if store is not None else 0
        if self.upfront:
            ahead = L
        elif plan.source == "disk" and ec.read_ahead is None:
            # Every layer's disk read is already in flight (the store reads them concurrently) and a
            # disk load blocks until its layer is verified: ask for the next one only.
            ahead = 1
        else:
            ahead = c.read_ahead.layers(hist_bytes, T)
        if plan.source == "disk":
            store.prefetch(plan.sid)
        t_l0 = time.perf_counter()
        measure = 0 not in loads and plan.source == "host"
        if 0 not in loads:
            loads[0] = store.load_layer(plan.sid, 0, pad_to=S)
        if self.upfront:
            for layer in range(1, L):
                if layer not in loads:
                    loads[layer] = store.load_layer(plan.sid, layer, pad_to=S)
            jax.block_until_ready(list(loads.values()))
        else:
            loads[0].block_until_ready()
            if measure:
                c.read_ahead.observe_load(hist_bytes, time.perf_counter() - t_l0)
        rope = P.rope_for_layers(c.config, S, positions, naive, rotated)
        hists, news = [], []
        hist_len = jnp.int32(plan.cached_len)
        for layer in range(L):
            for j in range(layer + 1, min(L, layer + 1 + ahead)):
                if j not in loads:
                    loads[j] = store.load_layer(plan.sid, j, pad_to=S)
            hist = loads.pop(layer)
            t_c = time.perf_counter() if layer == 0 else None
            traced = sum(TRACE_COUNTS.values())
            x, new_kv = P.one_layer(c.layers[layer], x, hist, hist_len, positions, c.config, naive, rope)
            if t_c is not None and sum(TRACE_COUNTS.values()) == traced:  # a compile is not compute
                x.block_until_ready()
                c.read_ahead.observe_compute(T, 1, time.perf_counter() - t_c)
            c.save_new(plan, layer, new_kv)
            hists.append(hist)
            news.append(new_kv)
        return Prefilled(x, tuple(hists), tuple(news), "upfront" if self.upfront else "layerwise", ahead, preloaded)


def prefill(c: Context, plan: TurnPlan, device_hist: tuple | None) -> tuple[Prefilled, int, int]:
    """Run the job's prefill with the configured strategy. ``device_hist``: per layer the history
    already on the device (a pool hit: keys rotated to their positions, used as they are), or None.
    Returns ``(Prefilled, S, T)``."""
    ec, mc = c.engine_config, c.config
    naive = ec.rope_mode == "naive"
    n_comp, cached = len(plan.compute_ids), plan.cached_len
    S, T = bucket_length(cached), prompt_bucket_length(n_comp, ec.prompt_bucket)
    padded = np.zeros(T, np.int32)
    padded[:n_comp] = plan.compute_ids
    positions = jnp.arange(cached, cached + T, dtype=jnp.int32)
    x = P.embed_tokens(c.params, mc, jnp.asarray(padded))
    if not cached:
        return NoHistory().run(c, plan, x, positions, T, naive), S, T
    if device_hist is not None:
        ready, preloaded = dict(enumerate(device_hist)), 0
    else:
        ready = c.read_buffer.take(plan.sid, plan.num_tokens, plan.turn, S)
        preloaded = len(ready)
    mode = "in_program" if ec.preload == "auto" else ec.preload
    rotated = device_hist is not None
    if mode == "in_program":
        return InProgram().run(c, plan, x, positions, S, naive, ready, preloaded, rotated), S, T
    return PerLayer(mode == "upfront").run(c, plan, x, positions, S, T, naive, ready, preloaded, rotated), S, T
