"""Dropping a range of rows from a session's history (`TieredStore.drop_range`): the plan and its work.

A session's kept history is one contiguous run of absolute rows ``[offset, end)`` (block i holds
rows ``[i*B, (i+1)*B)``). Dropping rows ``[start, stop)`` of it (relative to the kept history) is:

* ``start == 0`` -- a front truncation: ``offset += stop``; metadata only (`truncate_front`).
* ``stop == num_tokens`` -- a tail drop: ``end = offset + start``; metadata only. The next turn's
  writes go to rows the older manifests still call valid, so the save worker holds every later task
  (a barrier) until this drop's manifest is durable or failed: a kill leaves the old manifest over
  untouched rows or the new one, never a manifest over rewritten rows.
* otherwise -- a move: the kept rows ``[offset, offset+start)`` and ``[offset+stop, end)`` are copied,
  in order, to fresh rows from ``dst = end`` on (rows no older manifest covers; the disk chunk holding ``end`` is rewritten with its
  rows before ``end`` unchanged, as an append does), then ``offset = end``,
  ``end = end + kept``. The manifest, written last, switches from the old run to the new one. Bytes
  rewritten: the kept rows (every layer, K and V); the old blocks leave the memory tiers once copied.

Keys are stored before RoPE, so the rows after the dropped range stay valid where they land.
"""

from __future__ import annotations

import concurrent.futures as cf

import jax
import numpy as np

from .core import Core, ceil_div
from .errors import LayoutMismatch, StoreError
from .lifecycle import done_future
from .chunks import aligned_empty
from .session import Session


def plan(offset: int, end: int, start: int, stop: int) -> tuple:
    """The plan of dropping kept rows ``[start, stop)`` from the run ``[offset, end)`` (stop > start)."""
    if start == 0:
        return ("front", offset + stop)
    if stop == end - offset:
        return ("tail", offset + start)
    return ("move", offset, end, offset + start, offset + stop, end)


def submit(wb, s, turn) -> None:
    """Queue a drop turn's work on the save worker (under the lock)."""
    if turn.plan[0] == "ids":  # a session without KV: its token ids only
        return
    if turn.plan[0] == "tail":
        wb.submit(s, turn, _trim_tail, wb)
    else:
        fut = wb.submit(s, turn, _move, wb, turn.res)
        for layer in range(wb.core.L):  # read-your-writes: a load waits for the copy of its layer
            s.layer_task[layer] = fut


def _trim_tail(s, turn, wb) -> None:
    core = wb.core
    nb = ceil_div(turn.plan[1], core.B)
    try:
        core.hooks.point("drop.tail", s.sid)
    finally:
        with core.lock:
            s.trims.remove(nb)
            if turn.live:
                wb.mem.trim(s, nb)


def barrier(s, _no_turn, turn) -> None:
    """A save-worker task (of no turn): wait until ``turn``'s manifest is durable or failed (errors
    reported there)."""
    try:
        turn.done.result()
    except BaseException:  # noqa: BLE001 - the turn's future carries it
        pass


def _gather(blocks: list, lo: int, hi: int, B: int) -> np.ndarray:
    """Rows ``[lo, hi)`` [2, hi-lo, K, D] of a layer's host blocks (absolute rows)."""
    parts = []
    for b in range(lo // B, ceil_div(hi, B)):
        blk = blocks[b] if b < len(blocks) else None
        if blk is None:
            raise StoreError(f"block {b} left the host tier while a drop_range needed its rows (a bug: "
                             "a session with a change in flight is pinned there)")
        x = np.asarray(blk)
        parts.append(x[:, max(lo, b * B) - b * B : min(hi, (b + 1) * B) - b * B])
    return np.concatenate(parts, axis=1) if parts else None


def _move(s, turn, wb, res) -> None:
    """Copy the kept rows to their new blocks (host tier, then disk), then drop the old blocks."""
    core, mem, B = wb.core, wb.mem, wb.core.B
    _, o, e, a, b, dst = turn.plan
    kept = (a - o) + (e - b)
    d0, d1 = dst // B, ceil_div(dst + kept, B)
    with res:
        core.hooks.point("drop.move", s.sid)
        with core.lock:
            if not turn.live:
                return
            if s.host is None:
                raise StoreError(f"session {s.sid!r} left the host tier while a drop_range needed it (a bug)")
            src = [list(bl) for bl in s.host.layers]
        news = []
        for layer in range(core.L):
            bl = src[layer]
            shape = (2, (d1 - d0) * B, core.layout.kv_heads, core.layout.head_dim)
            flat = np.zeros(shape, core.layout.np_dtype)  # the new blocks' rows, in order
            if dst > d0 * B:  # block d0's rows before ``dst``: the history's last partial block, unchanged
                flat[:, : dst - d0 * B] = _gather(bl, d0 * B, dst, B)
            at = dst - d0 * B
            for lo, hi in ((o, a), (b, e)):
                if hi > lo:
                    flat[:, at : at + hi - lo] = _gather(bl, lo, hi, B)
                    at += hi - lo
            new = aligned_empty((d1 - d0, 2, B) + shape[2:], core.layout.np_dtype)
            new[:] = flat.reshape(2, d1 - d0, B, *shape[2:]).transpose(1, 0, 2, 3, 4)
            news.append(new)
        core.stats.add("bytes_written", core.L * kept * core.layout.bytes_per_token_layer, tier="host")
        hosts = [jax.device_put(list(new), core.host_sharding, may_alias=True) for new in news]
        with core.lock:
            if not turn.live:
                return
            for layer in range(core.L):
                for i in range(d1 - d0):
                    mem.put(s, "host", layer, d0 + i, hosts[layer][i], res)
                s.layer_ver[layer] = s.layer_ver.get(layer, 0) + 1
            mem.drop(s, "device")  # the device copy held the old run
    C = core.disk.chunk
    for g in range(core.disk.groups):
        for i in range(d1 - d0):  # whole chunks from the one holding ``dst`` to the one holding the new end
            lo = (dst - d0 * B) // C * C if i == 0 else 0
            wb._write_chunk(s, turn, g, d0 + i, [news[la][i] for la in core.disk.group_layers(g)], lo,
                            core.disk.rows_on_disk(d0 + i, dst + kept))
    with core.lock:
        if turn.live:
            mem.drop_front(s, d0)  # the old run leaves the memory tiers


class Dropper:
    """`TieredStore.drop_range` / `truncate_front`: validate, change the history in memory, queue the work."""

    def __init__(self, core: Core, wb, life, reader):
        self.core, self.wb, self.life, self.reader = core, wb, life, reader

    def truncate_front(self, sid: str, n_drop: int) -> cf.Future:
        """Drop the oldest ``n_drop`` tokens; the rest stays bit-identical. Returns a future (manifest);
        if that fails the session goes back to its last durable state (like a failed turn).
        The same as ``drop_range(sid, 0, n_drop)``."""
        s = self.life.get(sid)
        with self.core.lock:
            n = self._check_drop(s, 0, n_drop)
        return self.drop_range(sid, 0, n)

    def _check_drop(self, s: Session, start, stop) -> int:
        """Under the lock: refuse a change of the history while a turn is open; validate the range."""
        if s.open is not None and s.open.live:
            raise LayoutMismatch(f"session {s.sid!r}: commit or abort the turn before dropping tokens")
        for v in (start, stop):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise LayoutMismatch(f"token index {v!r} is not an int")
        if not 0 <= start <= stop <= s.num_tokens:
            raise LayoutMismatch(f"cannot drop tokens [{start}, {stop}) of {s.num_tokens}")
        return int(stop)

    def drop_range(self, sid: str, start: int, stop: int) -> cf.Future:
        """`TieredStore.drop_range` (its docstring is the contract): front, tail or a moved middle."""
        s = self.life.get(sid)
        core = self.core
        with core.lock:
            self._check_drop(s, start, stop)
            start, stop = int(start), int(stop)
            self.life.give_up_open(s)  # a failed turn left behind: its error was reported
            if start == stop:
                return s.log[-1].done if s.log else done_future(s.turn)
            p = plan(s.offset, s.end, start, stop)
            if p[0] == "front":
                s.offset = p[1]
                s.token_ids = s.token_ids[stop:].copy()
                return self._seal_meta(s, "truncate", None)
            if not s.kv_valid:  # token ids only: nothing to move
                s.token_ids = np.concatenate([s.token_ids[:start], s.token_ids[stop:]])
                s.end = s.offset + len(s.token_ids)
                return self._seal_meta(s, "drop", ("ids",))
            if p[0] == "tail":
                s.end = p[1]
                s.token_ids = s.token_ids[:start].copy()
                # The blocks past the new end leave the tables on the save worker, after the saves
                # queued before (they need those rows); until then a next turn's `save_layer` reserves
                # them as new blocks (``s.trims``).
                s.trims.append(ceil_div(p[1], core.B))
                return self._seal_meta(s, "drop", p)
            n = s.num_tokens
        # A move: the session's rows must be in the host tier (pinned there once the turn is queued).
        kept = n - (stop - start)
        for attempt in range(3):
            self.reader.ensure_host(s)
            with core.lock:
                dst = s.end
                d0, d1 = dst // core.B, ceil_div(dst + kept, core.B)
            res = self.life.take("host", core.L * (d1 - d0) * self.core.block_bytes, s, True)
            try:
                dgrow = max(0, d1 - s.disk_blocks)
                with self.life.reserve("disk", core.disk_bytes(dgrow), s) as dres:
                    with core.lock:
                        self._check_drop(s, start, stop)
                        if s.num_tokens != n or s.end != dst or not s.kv_valid:
                            raise LayoutMismatch(f"session {sid!r} changed while tokens were dropped from it")
                        if s.host is None:
                            continue  # evicted meanwhile: bring it back
                        more = min(dgrow, max(0, d1 - s.disk_blocks))
                        s.held["disk"].absorb(dres, core.disk_bytes(more))
                        s.disk_blocks += more
                        p = plan(s.offset, s.end, start, stop)
                        s.offset, s.end = dst, dst + kept
                        s.token_ids = np.concatenate([s.token_ids[:start], s.token_ids[stop:]])
                        fut = self._seal_meta(s, "drop", p, res)
                        res = None
                        return fut
            finally:
                if res is not None:
                    res.release()
        raise StoreError(f"session {sid!r} kept leaving the host tier while tokens were dropped from it")

    def _seal_meta(self, s: Session, kind: str, plan, res=None) -> cf.Future:
        """Under the lock: queue the change of ``s``'s history made in memory; its manifest's future."""
        prev = s.log[-1].done if s.log else None
        t = s.add_meta(kind, self.core.layout, self.core.B)
        t.plan, t.res = plan, res
        self.wb.seal(s, t, prev)
        return t.done
