"""Disk -> host promotion, layer by layer, verified as it is read.

A promotion reads the committed blocks ``[f, nb)`` of every layer, one layer group (the layers a disk
chunk spans) at a time: the group's chunks are decoded by TensorStore straight into one 64-byte
aligned buffer ``[G, nb - f, 2, B, K, D]`` (TensorStore checks each chunk's crc32c while decoding it; a
missing, short or damaged chunk raises), whose blocks go to ``pinned_host`` in one batched
``device_put`` (on the CPU the arrays alias the buffer). Reads are issued a bounded number of bytes
ahead of their consumption and groups are published in order, so a load of layer 0 waits for its
group only, not for layer L-1 (with chunks of all layers, for the whole session). The promotion
reserves its host bytes first (a handle released on every path) and installs the table only if the
session's state did not move meanwhile.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable

import jax
import numpy as np

from .chunks import aligned_empty
from .core import Core, ceil_div
from .errors import KVLost, StoreError
from .memory import BlockTable, Memory
from .session import Session

READ_AHEAD_BYTES = 32 << 20  # disk reads in flight ahead of the group being consumed (at least 2 groups)


class Stale(StoreError):
    """A promotion read blocks that a reclaim deleted after the session's front moved past them."""


class Promotion:
    """One disk -> host read of a session; loads wait on their own layer's event."""

    def __init__(self, num_layers: int, epoch: int, f: int, nb: int, end: int):
        self.epoch, self.f, self.nb, self.end = epoch, f, nb, end
        self.parts: list[Any] = [None] * num_layers
        self.events = [threading.Event() for _ in range(num_layers)]
        self.error: BaseException | None = None
        self.stale = False  # read blocks a reclaim deleted meanwhile: published nothing
        self.done: cf.Future = cf.Future()

    def wait_layer(self, layer: int, sid: str):
        self.events[layer].wait()
        if self.error is not None:
            if isinstance(self.error, StoreError):
                raise self.error
            raise StoreError(f"session {sid!r}: reading from disk failed: {self.error}") from self.error
        return None if self.stale else self.parts[layer]


class Promoter:
    def __init__(self, core: Core, mem: Memory, reserve: Callable, mark_lost: Callable):
        self.core, self.mem, self._reserve, self._mark_lost = core, mem, reserve, mark_lost

    def claim(self, s: Session) -> tuple[bool, Promotion]:
        """Under the lock: (True, p) if the caller must run ``p``, (False, p) if one runs already."""
        p = s.promoting
        if p is not None and not p.done.done() and p.epoch == s.epoch:
            return False, p
        f, nb = self.mem.span(s)
        p = s.promoting = Promotion(self.core.L, s.epoch, f, nb, s.end)
        return True, p

    def run(self, s: Session, p: Promotion) -> None:
        """Read ``s`` into the host tier; resolves ``p.done`` (to True if installed)."""
        core = self.core
        try:
            core.hooks.point("promote.read", s.sid)
            nbytes = core.L * (p.nb - p.f) * core.block_bytes
            with self._reserve("host", nbytes, s) as res, core.holding_room(res):
                core.hooks.point("promote.reserved", s.sid)

                def publish(layer: int, blocks: list) -> None:
                    p.parts[layer] = blocks
                    p.events[layer].set()

                blocks = self.read_verified(s, p.f, p.nb, publish, end=p.end)
                installed = False
                with core.lock:
                    if s.host is None and not s.gone and s.epoch == p.epoch and self.mem.span(s) == (p.f, p.nb):
                        t = BlockTable(core.L)
                        t.layers = blocks
                        s.host = t
                        s.held["host"].absorb(res)
                        installed = True
                if installed:
                    core.stats.add("bytes_written", nbytes, tier="host")
                    core.policy.touch(s.sid, "host")
            p.done.set_result(installed)
        except Stale:  # nothing published: readers look again (from the new front)
            p.stale = True
            p.done.set_result(False)
        except BaseException as e:  # noqa: BLE001 - reported through the promotion
            p.error = e
            p.done.set_exception(e)
        finally:
            for ev in p.events:
                ev.set()

    def read_verified(self, s: Session, f: int, nb: int, publish=None, *, keep: bool = True,
                      end: int | None = None) -> list[list[Any]]:
        """Read blocks [f, nb) of every layer, the last one up to the disk chunk holding row ``end - 1``
        (rows after it are zeros); ``keep`` False verifies only (one reused buffer per layer)."""
        core, lay = self.core, self.core.layout
        B, L = core.B, core.L
        blocks: list[list[Any]] = [[None] * nb for _ in range(L)]
        if nb <= f:
            for layer in range(L):
                if publish is not None:
                    publish(layer, blocks[layer])
            return blocks
        pending: list = []

        def quiesce():
            futs = [fu for q in pending if q is not None for fu in q[1]]
            for fu in futs:
                fu.cancel()
            for fu in futs:
                try:
                    fu.result()
                except BaseException:  # noqa: BLE001 - cancelled or failed: finished either way
                    pass

        def lost(e):
            quiesce()
            with core.lock:
                stale = s.dead_below > f  # the blocks were reclaimed under this read: the front moved on
            if stale:
                return Stale(f"session {s.sid!r}: its front moved while it was read")
            return self._mark_lost(s, e)

        try:
            core.disk.faults.check("read", s.sid)
            arr = core.disk.array(s.sid)
        except Exception as e:  # noqa: BLE001 - missing / undecodable / mismatched array = damaged
            raise lost(e) from e
        G = core.disk.chunk_layers
        shape = (G, nb - f, 2, B, lay.kv_heads, lay.head_dim)  # a group's layers, each [nb - f, 2, B, K, D]
        scratch = None if keep else aligned_empty(shape, lay.np_dtype)
        his = [B if end is None else core.disk.rows_on_disk(b, end) for b in range(f, nb)]
        rows = sum(his)

        def issue(g):
            buf = scratch if scratch is not None else aligned_empty(shape, lay.np_dtype)
            return buf, [core.disk.read_rows_into(arr, g, b, buf[:, i], his[i]) for i, b in enumerate(range(f, nb))]

        groups = core.disk.groups
        group_bytes = G * (nb - f) * core.block_bytes
        ahead = 1 if scratch is not None else max(2, min(groups, READ_AHEAD_BYTES // max(1, group_bytes)))
        nxt = 0
        try:
            for g in range(groups):
                while nxt < groups and nxt < g + ahead:
                    pending.append(issue(nxt))
                    nxt += 1
                (buf, futs), pending[g] = pending[g], None
                try:
                    for fu in futs:
                        fu.result()
                except Exception as e:  # noqa: BLE001 - missing, short or damaged chunk
                    pending[g] = (buf, futs)
                    raise lost(e) from e
                core.stats.add("bytes_read", G * rows * lay.bytes_per_token_layer, tier="disk")
                if not keep:
                    continue
                vals = jax.device_put([blk for layer_buf in buf for blk in layer_buf], core.host_sharding,
                                      may_alias=True)  # one batched call for the group
                for j, layer in enumerate(core.disk.group_layers(g)):
                    blocks[layer][f:nb] = vals[j * (nb - f) : (j + 1) * (nb - f)]
                    if publish is not None:
                        publish(layer, blocks[layer])
        except BaseException:
            for q in pending:
                for fu in (q[1] if q is not None else ()):
                    fu.cancel()
            raise
        return blocks


def promoted_bytes(core: Core, s: Session) -> int:
    return core.L * (ceil_div(s.end, core.B) - s.offset // core.B) * core.block_bytes


__all__ = ["Promoter", "Promotion", "aligned_empty", "KVLost"]
