"""Queued jobs' histories brought into the device pool while the batch decodes (the paper's pre-loading).

The device tier is the page pool: a job whose history sits in host memory would, at its turn, copy
it to the device and rotate and scatter it into its pages (``programs.write_pages``) before its
first token. While other slots decode, the loop hands this module the jobs waiting in its queue;
for the first of them whose history is in host memory (and whose turn will reuse all of it: no
truncation), it takes pages that are free and not promised to a decoding slot's reply, registers
them in the pool as the session's copy for the store's ``(turn, num_tokens)``, not ready
(``PagePool.preloading``), and writes the history into them layer by layer, the same rows, layout and
rotation a host hit writes (``programs.write_history``). Once every layer is written the copy is
ready: the job's ``_begin`` finds a device hit (``PagePool.holds``) and its prefill reads the pages
in place. Its result still says ``source="host"`` (where the KV came from) with ``preload="pool"``.

Bounded work: between two decode dispatches at most ``EngineConfig.pool_preload_rows`` history rows
(summed over layers) are written: ``max(1, pool_preload_rows // num_tokens)`` whole layers, each its store blocks
(``layer_blocks``: the host tier's ``pinned_host`` blocks, no wait) handed to one small program that
moves, assembles and scatters them (one program per history bucket), so a decoding slot waits at most
that long per round. A job whose preload is part done when its turn comes has its remaining layers
written then (:meth:`PoolPreload.finish`: the work its host-hit prefill would have done anyway).

Validity: the pages are evictable from the moment they are registered (``PagePool.alloc`` takes the
least recently used cached copies, ready or not), so a preload never keeps a running or starting job
from its pages; the writer checks before each round that the entry is still the one it registered
and, after taking the blocks, that the store still reports the same ``(turn, num_tokens)``,
else it drops the copy. A change of the session later (a new turn, a drop, a truncation) changes
that pair, so the job's plan no longer matches and ``_begin`` frees the stale pages. Everything runs
on the loop's thread; the store's own threads are not touched (``lookup`` and ``layer_blocks`` are its
thread-safe reads).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jax_cachedattn.engine import programs as P
from jax_cachedattn.engine.pool import CachedPages, block_table
from jax_cachedattn.engine.prefill import padded_blocks
from jax_cachedattn.model import bucket_length
from jax_cachedattn.store import KVLost, UnknownSession


@dataclasses.dataclass
class _Writing:
    sid: str
    turn: int
    num_tokens: int
    S: int  # history bucket of the loads
    entry: CachedPages
    table: object  # jnp block table [M]
    layer: int = 0  # the next layer to write


class PoolPreload:
    """Writes queued jobs' host histories into the pool, one job at a time, a bounded part per round."""

    def __init__(self, engine):
        self.e = engine
        self._w: _Writing | None = None
        self._refused: set[tuple] = set()  # (sid, turn, num_tokens) whose job would not reuse it all

    # ---- choosing a job -----------------------------------------------------------------------------
    def _eligible(self, sid, message, max_new):
        """The store's info of ``sid`` if its queued job would load its whole history from host memory."""
        e = self.e
        if e.store is None or not e.config.use_cache or not isinstance(sid, str):
            return None
        info = e.store.lookup(sid)
        if (info is None or not info.kv_valid or info.tier != "host" or info.num_tokens == 0
                or e.pool.entry(sid) is not None):
            return None
        key = (sid, info.turn, info.num_tokens)
        if key in self._refused:
            return None
        plan = e._plan(sid, message, max_new)
        if plan.source != "host" or plan.n_drop or (plan.turn, plan.num_tokens) != (info.turn, info.num_tokens):
            self._refused.add(key)  # a truncation (or a store that changed meanwhile): not planned again
            return None
        return info

    def _open(self, info) -> bool:
        e, pool = self.e, self.e.pool
        n = pool.pages_for(info.num_tokens)
        if n > e._width or n > pool.free_pages(evictable=False) - pool.promised:
            return False  # only pages that are free and not promised to a decoding slot's reply
        pages = pool.alloc(n)
        entry = pool.preloading(info.session_id, pages, info.turn, info.num_tokens)
        self._w = _Writing(info.session_id, info.turn, info.num_tokens, bucket_length(info.num_tokens), entry,
                           jnp.asarray(block_table(pages, e._width)))
        e.read_buffer.drop(info.session_id)  # its layers come through the pool now
        return True

    # ---- writing ----------------------------------------------------------------------------------------
    def _write(self, rows: int | None) -> None:
        """Write the next layers of the job in progress (``rows`` history rows, at least one layer;
        None: every layer left). Drops it when its entry or its session changed."""
        e, w = self.e, self._w
        pool, mc = e.pool, e.model_config
        if pool.entry(w.sid) is not w.entry:  # evicted, dropped or replaced since the last round
            self._w = None
            return
        L = mc.num_layers
        k = L - w.layer if rows is None else min(L - w.layer, max(1, rows // max(1, w.num_tokens)))
        try:
            for layer in range(w.layer, w.layer + k):
                blocks, off = e.store.layer_blocks(w.sid, layer)[:2]
                kv = P.write_history(pool.pages[layer], padded_blocks(blocks, w.S), jnp.int32(off), w.table,
                                     jnp.int32(w.num_tokens), w.S, config=mc, rotate=e.config.rope_mode != "naive")
                pool.pages = pool.pages[:layer] + (kv,) + pool.pages[layer + 1:]
            info = e.store.lookup(w.sid)
        except (UnknownSession, KVLost):  # deleted or damaged meanwhile: its own turn reports it
            info = None
        except BaseException:
            self.cancel()
            raise
        if info is None or not info.kv_valid or (info.turn, info.num_tokens) != (w.turn, w.num_tokens):
            self.cancel()  # the session changed while its rows were read: they may be another state's
            return
        w.layer += k
        if w.layer == L:
            w.entry.ready = True
            pool.stats["preloads"] += 1
            self._w = None

    def step(self, jobs) -> None:
        """One round's bounded work for the queued ``jobs`` (``(sid, message, max_new)``, in queue order,
        sessions not busy)."""
        budget = self.e.config.pool_preload_rows
        if budget <= 0:
            return
        if self._w is None:
            for sid, message, max_new in jobs:
                try:
                    info = self._eligible(sid, message, max_new)
                except (UnknownSession, KVLost, ValueError):  # gone, damaged, bad input: its own turn reports it
                    continue
                if info is not None:
                    if not self._open(info):
                        return  # no room now: the next round tries again
                    break
        if self._w is not None:
            self._write(budget)

    def write_all(self, sid: str) -> bool:
        """Preload ``sid``'s host history now, every layer (the warm-up compiles the program this way);
        False when it is not in host memory or the pool has no room."""
        info = self.e.store.lookup(sid) if self.e.store is not None else None
        if self._w is not None or info is None or info.tier != "host" or not info.num_tokens or not self._open(info):
            return False
        self._write(None)
        return self.e.pool.holds(sid, info.turn, info.num_tokens)

    def finish(self, sid: str) -> None:
        """Before ``sid``'s job starts: write the layers its preload has left (none when none is in progress)."""
        if self._w is not None and self._w.sid == sid:
            self._write(None)

    def writing(self) -> str | None:
        """The session whose history is being written, or None."""
        return None if self._w is None else self._w.sid

    def cancel(self) -> None:
        """Give up the preload in progress: its pages go back (if the pool still has them as its entry)."""
        w, self._w = self._w, None
        if w is not None and self.e.pool.entry(w.sid) is w.entry:
            self.e.pool.drop(w.sid)
