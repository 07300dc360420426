"""The save pipeline and the commit log.

One save worker runs, in the order they were issued, every task that touches a session's host
blocks or its files: saves, the flush of a turn's partial blocks at its commit, the drop of front
blocks after a truncation, and the removal of a deleted session's files. One committer publishes
turns in order: it waits for exactly the writes its turn issued (each `Turn` owns its writes), then
for the previous pending turn of the session, then writes the manifest (durably) and marks the turn
durable. A failure fails that turn and every later pending turn of the session, and rewinds the
session to its last durable turn (``on_fail``, the facade's rollback); the error goes to the turn's
future and to `flush`.

Writes: a full block is written once, when a save fills it; a partial block stays in the host tier
(counted there) and is written once, when its turn commits. A write covers whole disk chunks
(``disk_chunk`` tokens, a divisor of the block) from the one holding the turn's first row to the one
holding its last: rows of earlier turns are rewritten only in the chunk the turn continues. A chunk
spans a group of ``disk_chunk_layers`` layers, so a block is written once every layer of its group
has it (a full block when the group's last layer fills it, a partial one at the commit, when every
layer has reached the turn's end). Two writes of one chunk are never in flight at once (they were
seen landing out of order), and all writes are issued from the one worker thread, so a later write
of a chunk always lands after an earlier one.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from typing import Callable

import jax
import numpy as np

from . import ranges
from .core import Core, ceil_div
from .errors import LayoutMismatch, StoreError
from .memory import Memory
from .chunks import aligned_empty
from .session import Session, Turn

WRITE_INFLIGHT_BYTES = 256 << 20  # chunk writes issued but not committed before the worker waits


class Writeback:
    def __init__(self, core: Core, mem: Memory, on_fail: Callable[[Session, Turn, BaseException], BaseException]):
        self.core, self.mem, self.on_fail = core, mem, on_fail
        self.worker = cf.ThreadPoolExecutor(1, thread_name_prefix="kvstore-save")
        self.committer = cf.ThreadPoolExecutor(1, thread_name_prefix="kvstore-commit")
        self._inflight: collections.deque = collections.deque()  # (bytes, commit future); worker only
        self._inflight_bytes = 0

    # ---- issuing (under core.lock) ------------------------------------------------------------------
    def submit(self, s: Session, turn: Turn | None, fn, *args) -> cf.Future:
        fut = self.worker.submit(self._run, s, turn, fn, args)
        if turn is not None:
            turn.tasks.append(fut)
        s.last_task = fut
        return fut

    def submit_save(self, s: Session, turn: Turn, layer: int, kv, a0: int, a1: int, res) -> None:
        s.layer_task[layer] = self.submit(s, turn, self._save, layer, kv, a0, a1, res)

    def seal(self, s: Session, turn: Turn, prev: cf.Future | None) -> None:
        """``turn`` was committed in memory: flush its partial blocks, then publish it."""
        if turn.kind == "data":
            self.submit(s, turn, self._flush)
        elif turn.kind == "truncate":
            self.submit(s, turn, self._drop_front)
        elif turn.kind == "drop":
            ranges.submit(self, s, turn)
        self.committer.submit(self._commit, s, turn, prev)
        if turn.kind == "drop" and turn.plan[0] == "tail":
            # Later writes go to rows the older manifests still call valid: none lands before this
            # turn's manifest is durable (or failed, and the turns after it with it).
            self.submit(s, None, ranges.barrier, turn)

    # ---- worker tasks -------------------------------------------------------------------------------
    def _run(self, s: Session, turn: Turn | None, fn, args) -> None:
        try:
            fn(s, turn, *args)
        except BaseException as e:  # noqa: BLE001 - the turn's commit reports it
            if turn is not None:
                with self.core.lock:
                    if turn.error is None:
                        turn.error = e
            else:
                raise

    def _save(self, s: Session, turn: Turn, layer: int, kv, a0: int, a1: int, res) -> None:
        core, B = self.core, self.core.B
        with res:  # what is not moved into the session's table goes back to the budget, whatever happens
            core.hooks.point("save.start", s.sid)
            if not turn.live:
                return
            x = np.asarray(kv)  # waits for the device -> host copy
            if x.shape[1] != a1 - a0:
                raise LayoutMismatch(f"session {s.sid!r} layer {layer}: {x.shape[1]} rows for a save of {a1 - a0}")
            b0, b1 = a0 // B, ceil_div(a1, B)
            with core.lock:
                if not turn.live:
                    return
                olds = [s.host.block(layer, b) if s.host is not None else None for b in range(b0, b1)]
            # The touched blocks packed once into one aligned buffer [nb, 2, B, K, D]; a block's rows
            # before the save come from its host copy (the committed rows of the session's last block).
            new = aligned_empty((b1 - b0, 2, B) + x.shape[2:], x.dtype)
            for i, b in enumerate(range(b0, b1)):
                lo, hi = max(a0, b * B), min(a1, (b + 1) * B)
                if lo > b * B or hi < (b + 1) * B:
                    if olds[i] is not None:
                        new[i] = np.asarray(olds[i])
                    elif lo > b * B:
                        raise StoreError(f"session {s.sid!r} layer {layer}: block {b} left the host tier while a save "
                                         "needed its rows (a bug: a session with a turn in flight is pinned there)")
                    else:
                        new[i] = 0
                new[i, :, lo - b * B : hi - b * B] = x[:, lo - a0 : hi - a0]
            hblocks = jax.device_put(list(new), core.host_sharding, may_alias=True)  # one batched call
            core.hooks.point("save.write", s.sid)
            full = []
            with core.lock:
                if not turn.live:
                    return
                for i, b in enumerate(range(b0, b1)):
                    self.mem.put(s, "host", layer, b, hblocks[i], res)
                dev = s.device is not None and any(blk is not None for blk in s.device.layers[layer])
                if dev:  # the touched device blocks are stale now: out of the table until replaced below
                    dl, gone = s.device.layers[layer], 0
                    for b in range(b0, min(b1, len(dl))):
                        if dl[b] is not None:
                            dl[b], gone = None, gone + 1
                    self.mem.free(s, "device", gone)
                s.layer_ver[layer] = ver = s.layer_ver.get(layer, 0) + 1
                dirty = turn.dirty.setdefault(layer, {})
                for i, b in enumerate(range(b0, b1)):
                    if a1 >= (b + 1) * B:
                        dirty.pop(b, None)
                        full.append((b, new[i]))
                    else:
                        dirty[b] = new[i]  # written at the commit, rows up to the turn's end
                # A full block is written once every layer of its disk chunks' group has filled it.
                G = core.disk.chunk_layers
                g = layer // G
                ready = []
                for b, data in full:
                    have = turn.full.setdefault((g, b), {})
                    have[layer] = data
                    if len(have) == G:
                        del turn.full[(g, b)]
                        ready.append((b, [have[la] for la in core.disk.group_layers(g)]))
            core.stats.add("bytes_written", x.nbytes, tier="host")
            if dev:  # keep the device copy of the layer current: the touched blocks, moved outside the lock
                self._refresh_device(s, turn, layer, b0, new, ver)
            for b, datas in ready:
                self._write_chunk(s, turn, g, b, datas, self._first_row(turn, b), B)

    def _refresh_device(self, s: Session, turn: Turn, layer: int, b0: int, new: np.ndarray, ver: int) -> None:
        core = self.core
        nbytes = len(new) * core.block_bytes
        with core.lock:
            if not core.budgets["device"].fits(nbytes):
                if s.device is not None:
                    self.mem.free(s, "device", s.device.drop_layer(layer))
                return
            res = core.take("device", nbytes)
        with res:
            dblocks = jax.device_put(list(new), core.dev_sharding)
            with core.lock:
                if s.device is None or not turn.live or s.layer_ver.get(layer) != ver:
                    return  # evicted, or saved again meanwhile: that save refreshes it
                for i, blk in enumerate(dblocks):
                    self.mem.put(s, "device", layer, b0 + i, blk, res)
            core.stats.add("bytes_written", nbytes, tier="device")

    def _flush(self, s: Session, turn: Turn) -> None:
        """At the commit: write the turn's partial blocks, a layer group's together, rows up to its end."""
        core = self.core
        core.hooks.point("commit.flush", s.sid)
        with core.lock:
            if turn.full:  # every layer reached the same end, so no group can still be waiting for one
                raise StoreError(f"session {s.sid!r}: full blocks of layer groups {sorted(turn.full)} were never "
                                 "completed by all their layers (a bug)")
            groups: dict[tuple[int, int], dict[int, np.ndarray]] = {}
            for layer, blocks in turn.dirty.items():
                for b, d in blocks.items():
                    groups.setdefault((layer // core.disk.chunk_layers, b), {})[layer] = d
            turn.dirty.clear()
            todo = []
            for (g, b), have in sorted(groups.items()):
                layers = core.disk.group_layers(g)
                if len(have) != len(layers):
                    raise StoreError(f"session {s.sid!r}: block {b} is partial in layers {sorted(have)} of group "
                                     f"{list(layers)} only (a bug)")
                todo.append((g, b, [have[la] for la in layers], core.disk.rows_on_disk(b, turn.pend[layers[0]])))
        for g, b, datas, hi in todo:
            self._write_chunk(s, turn, g, b, datas, self._first_row(turn, b), hi)

    def _first_row(self, turn: Turn, b: int) -> int:
        """The first row of block ``b`` that ``turn`` writes: rows before the turn's start are on disk
        (written by earlier turns, or queued before it on this worker), except those sharing a disk
        chunk with the turn's first row (a chunk is written whole)."""
        B, C = self.core.B, self.core.disk.chunk
        return max(0, (turn.base_end - b * B) // C * C)

    def _write_chunk(self, s: Session, turn: Turn, g: int, b: int, datas: list, lo: int = 0,
                     hi: int | None = None) -> None:
        """Write rows ``[lo, hi)`` (whole disk chunks) of block ``b`` of the layers of group ``g``
        (``datas``: their blocks, in order); the turn owns the write."""
        core = self.core
        hi = core.B if hi is None else hi
        nbytes = len(datas) * (hi - lo) * core.layout.bytes_per_token_layer
        # No wait for a removal of an earlier session of this id: it is a task of this same worker,
        # queued before any task of the new session (FIFO), so it already ran.
        with core.lock:
            if not turn.live:
                return
            grow = max(s.disk_blocks, b + 1) if b >= s.disk_cap else 0
        if grow:
            core.hooks.point("save.resize", s.sid)
            core.disk.resize(s.sid, grow)  # raises: the turn fails (its commit reports it)
            with core.lock:
                s.disk_cap = grow
                if s.disk_cap > s.disk_blocks:  # never happens with the caller's reservation; kept exact
                    s.held["disk"].absorb(core.take("disk", core.disk_bytes(s.disk_cap - s.disk_blocks)))
                    s.disk_blocks = s.disk_cap
        with core.lock:
            prev = s.chunk_writes.get((g, b))
        if prev is not None and not prev.done():
            try:
                prev.result()
            except BaseException:  # noqa: BLE001 - that write's own turn reports it
                pass
        w = core.disk.write_rows(s.sid, g, b, datas, lo, hi)
        with core.lock:
            s.chunk_writes[(g, b)] = w
            turn.writes.append(w)
        core.stats.add("bytes_written", nbytes, tier="disk")
        self._inflight.append((nbytes, w))
        self._inflight_bytes += nbytes
        while self._inflight and self._inflight[0][1].done():
            self._inflight_bytes -= self._inflight.popleft()[0]
        while self._inflight and self._inflight_bytes > WRITE_INFLIGHT_BYTES:
            nbytes, c = self._inflight.popleft()
            self._inflight_bytes -= nbytes
            try:
                c.result()
            except BaseException:  # noqa: BLE001 - reported by the commit
                pass

    def _drop_front(self, s: Session, turn: Turn) -> None:
        """After a truncation, once the saves queued before it ran: drop blocks before the new front."""
        self.core.hooks.point("truncate.drop", s.sid)
        with self.core.lock:
            if turn.live:
                self.mem.drop_front(s, turn.snap.offset // self.core.B)

    def _reclaim(self, s: Session, _no_turn) -> None:
        """Delete the chunk files before the durable manifest's front (no manifest covers them any
        more) and give their bytes back to the disk budget. A crash before this leaves them to the next
        open (`recovery`); a failure leaves them to the next reclaim. Runs on the save worker, so no
        write of this session issued after it can be undone by it (a session that lost its KV and
        restarts at 0 has ``kv_valid`` False until its new manifest is durable: nothing is deleted)."""
        core = self.core
        core.hooks.point("reclaim.delete", s.sid)
        with core.lock:
            m = s.durable
            if s.gone or m is None or not m.kv_valid or not s.kv_valid:
                return
            lo, hi = s.disk_lo, min(m.offset // core.B, s.disk_cap)
            if hi <= lo:
                return
            waits = [s.chunk_writes.pop((g, b)) for g in range(core.disk.groups) for b in range(lo, hi)
                     if (g, b) in s.chunk_writes]
            # A promotion claimed before the front moved may be reading these blocks: its failure is
            # then a stale read (retried from the new front), not damage.
            s.dead_below = max(s.dead_below, hi)
        for w in waits:  # never in flight here (the writes of blocks before a durable front finished)
            try:
                w.result()
            except BaseException:  # noqa: BLE001 - reported by its own turn
                pass
        try:
            core.disk.delete_blocks(s.sid, lo, hi)
        except Exception:  # noqa: BLE001 - left for the next reclaim or the next open
            core.stats.add("reclaim_failures")
            return
        with core.lock:
            if s.gone or s.disk_lo != lo:
                return
            s.held["disk"].release(core.disk_bytes(hi - lo))
            s.disk_lo = hi
        core.stats.add("bytes_reclaimed", core.disk_bytes(hi - lo), tier="disk")

    # ---- committer ----------------------------------------------------------------------------------
    def _commit(self, s: Session, turn: Turn, prev: cf.Future | None) -> None:
        core = self.core
        try:
            core.hooks.point("commit.wait", s.sid)
            for t in list(turn.tasks):
                try:
                    t.result()
                except BaseException:  # noqa: BLE001 - recorded in turn.error
                    pass
            if turn.error is not None:
                raise turn.error
            for w in turn.writes:
                w.result()
            if prev is not None:
                try:
                    prev.result()
                except BaseException as e:  # noqa: BLE001
                    raise StoreError(f"an earlier turn of session {s.sid!r} was not saved") from e
            core.hooks.point("commit.manifest", s.sid)
            with s.mlock:
                with core.lock:
                    if not turn.live:
                        raise turn.error or StoreError("turn given up")
                core.disk.write_manifest(s.sid, turn.snap).result()
                with core.lock:
                    s.durable = turn.snap
                    if turn in s.log:
                        s.log.remove(turn)
                    if turn.snap.kv_valid and turn.snap.offset // core.B > s.disk_lo and not s.gone:
                        s.reclaim = self.submit(s, None, self._reclaim)  # the dead front, after the queued writes
            turn.done.set_result(turn.snap.turn)
        except BaseException as e:  # noqa: BLE001 - to the turn's future (and flush)
            turn.done.set_exception(self.on_fail(s, turn, e))

    def shutdown(self) -> None:
        self.worker.shutdown(wait=True)
        self.committer.shutdown(wait=True)
