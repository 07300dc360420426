"""A session's record, its turns, and the state machine that moves it between committed turns.

A `Session` holds the committed state (offset, end, turn, token ids: what `lookup` shows), the last
manifest on disk (``durable``), at most one open `Turn` (the saves since the last `commit_turn`) and
the commit log (``log``: turns committed in memory whose manifests are not on disk yet, in order).

Every queued task carries the `Turn` it works for. A turn dies when it is aborted, when an earlier
turn of its session fails, or when the session is deleted; a dead turn's queued work does nothing and
its commit fails. ``epoch`` counts the times the committed state was rewound (abort, failed commit,
delete): work issued against an older epoch (a promotion, a prefetch) publishes nothing.

States: NEW (no manifest yet) -> IDLE <-> OPEN (saving) -> COMMITTING (log not empty) -> IDLE;
any failure -> rewind to ``durable`` (or forget a NEW session); LOST (``kv_valid`` False: token ids
only, saves restart at 0); GONE (deleted: ``gone``).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading
from typing import Any

import numpy as np

from .budget import Reservation
from .manifest import Manifest

_seq = itertools.count(1)


class Turn:
    """One turn: its saves (data) or a change of the history (``kind`` "truncate" / "drop" / "lost").

    A "drop" turn (`TieredStore.drop_range`) carries ``plan``: ``("tail", new_end)`` (rows after
    ``new_end`` dropped, metadata only) or ``("move", o, e, a, b, dst)`` (the kept rows ``[o, a)`` and
    ``[b, e)`` copied to fresh rows from ``dst`` on, rows the older manifests never cover)."""

    def __init__(self, sid: str, num_layers: int, base_end: int, kind: str = "data", base_offset: int = 0):
        self.sid, self.kind, self.seq = sid, kind, next(_seq)
        self.base_offset = base_offset  # absolute index of token 0 of ``start`` (0 for a session saved from scratch)
        self.pend = [base_end] * num_layers  # per layer: absolute end of what the turn saved
        self.base_end = base_end  # rows before it are on disk already (or queued before the turn's writes)
        self.tasks: list[cf.Future] = []  # its worker tasks, in order
        self.writes: list[Any] = []  # commit futures of the chunk writes it issued (it owns them)
        self.dirty: dict[int, dict[int, np.ndarray]] = {}  # layer -> {block: data} partial, not written yet
        # (group, block) -> {layer: data}: blocks full in some layers of a disk chunk's layer group, written
        # once the group's last layer fills it
        self.full: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        self.snap: Manifest | None = None  # what its commit publishes
        self.done: cf.Future = cf.Future()  # resolves to the turn number once durable
        self.dead = False
        self.error: BaseException | None = None  # first error of its asynchronous part
        self.plan: tuple | None = None  # a "drop" turn's plan (`ranges.plan`)
        self.res = None  # a "drop" move's host reservation (for its new blocks)

    def kill(self, error: BaseException) -> None:
        self.dead = True
        if self.error is None:
            self.error = error

    @property
    def live(self) -> bool:
        return not self.dead and self.error is None


class Session:
    def __init__(self, sid: str, held: dict[str, Reservation]):
        self.sid = sid
        self.offset = 0  # absolute index of the first kept token
        self.end = 0  # absolute end of the committed (in-memory) history
        self.turn = 0
        self.token_ids = np.zeros(0, np.int32)
        self.kv_valid = True
        self.durable: Manifest | None = None
        self.epoch = 0
        self.open: Turn | None = None
        self.log: list[Turn] = []
        self.host = None  # BlockTable in pinned_host memory, or None (not in the host tier)
        self.device = None  # BlockTable on the device, or None
        self.held = held  # tier -> Reservation of the bytes this session's tables / disk array hold
        self.disk_blocks = 0  # end (in blocks) of what the disk budget holds for it (>= disk_cap)
        self.disk_cap = 0  # blocks the array on disk has (its shape)
        self.disk_lo = 0  # blocks before this one are deleted (dead front): held = disk_blocks - disk_lo
        self.reclaim: cf.Future | None = None  # the deletion of its dead front queued after a manifest
        self.dead_below = 0  # blocks before this one may be deleted (set before a reclaim deletes them)
        self.chunk_writes: dict[tuple[int, int], Any] = {}  # (layer group, block) -> commit of its last write
        self.layer_task: dict[int, cf.Future] = {}  # layer -> its last save task (read-your-writes)
        self.layer_ver: dict[int, int] = {}  # layer -> saves published (a device copy made before one is stale)
        self.failed_open: Turn | None = None  # an open turn killed by a failure, until commit/abort_turn
        self.last_task: cf.Future | None = None  # the session's last worker task
        self.promoting = None  # a Promotion in flight
        self.prefetch: cf.Future | None = None
        self.mlock = threading.Lock()  # orders a manifest write against the session's deletion
        self.gone = False
        self.freeing = 0  # disk bytes being removed after deletion
        self.trims: list[int] = []  # per queued tail drop: the block from which it will empty the tables

    # ---- the committed state -------------------------------------------------------------------
    def restore(self, m: Manifest) -> None:
        self.offset, self.end, self.turn = m.offset, m.end, m.turn
        self.token_ids, self.kv_valid = m.ids, m.kv_valid

    def manifest(self, layout, token_block: int) -> Manifest:
        return Manifest(layout.fingerprint, self.offset, self.end, self.turn,
                        tuple(int(t) for t in self.token_ids), self.kv_valid, token_block, layout.dtype)

    @property
    def num_tokens(self) -> int:
        return self.end - self.offset

    def stamp(self) -> tuple:
        """What the rows a load serves depend on: the rewinds, the kept run and every layer's published
        saves. A copy of the session's blocks taken outside the lock (a demotion device -> host) is
        installed only if the stamp did not change meanwhile; the span ``(offset // B, ceil(end / B))``
        alone misses a turn that added rows inside the last block and finished (found by the torture
        script: one row of a 5-row load served as zeros)."""
        return self.epoch, self.offset, self.end, self.kv_valid, tuple(sorted(self.layer_ver.items()))

    def pending(self) -> list[Turn]:
        return self.log + ([self.open] if self.open is not None else [])

    def busy(self) -> bool:
        """Work in flight that needs its tables: not evictable now."""
        if self.open is not None or self.log:
            return True
        if self.promoting is not None and not self.promoting.done.done():
            return True
        return self.last_task is not None and not self.last_task.done()

    # ---- transitions (under the store's lock) ----------------------------------------------------
    def open_turn(self, num_layers: int, restart: bool = False) -> Turn:
        """The open turn; a new one continues the committed history, or restarts at 0 (KV lost)."""
        if self.open is None:
            self.open = Turn(self.sid, num_layers, 0 if restart else self.end, base_offset=0 if restart else self.offset)
        return self.open

    def seal(self, snap_tokens: np.ndarray, end: int, layout, token_block: int) -> Turn:
        t, self.open = self.open, None
        self.offset, self.kv_valid = t.base_offset, True
        self.end, self.turn, self.token_ids = end, self.turn + 1, snap_tokens
        t.snap = self.manifest(layout, token_block)
        self.log.append(t)
        return t

    def add_meta(self, kind: str, layout, token_block: int) -> Turn:
        t = Turn(self.sid, layout.num_layers, self.end, kind)
        t.snap = self.manifest(layout, token_block)
        self.log.append(t)
        return t

    def kill_from(self, turn: Turn | None, error: BaseException) -> list[Turn]:
        """Kill ``turn`` and every later pending turn (all pending ones when ``turn`` is None)."""
        pend = self.pending()
        i = 0 if turn is None or turn not in pend else pend.index(turn)
        dead = pend[i:]
        for t in dead:
            t.kill(error)
        self.log = [t for t in self.log if t not in dead]
        if self.open in dead:
            self.failed_open, self.open = self.open, None
        self.epoch += 1
        return dead
