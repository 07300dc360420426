"""Saving a turn: `save_layer` (returns at once; the save worker does the rest), `commit_turn` (publishes
the turn: its manifest is written last, by the committer) and `abort_turn`.

The caller's thread validates and reserves (host blocks the save adds, disk blocks the array grows
by), then queues the save with its reservation; a save that fails gives its bytes back and its error
reaches the turn's commit. A session with a turn open is pinned in the host tier.
"""

from __future__ import annotations

import concurrent.futures as cf

import jax
import numpy as np

from .core import Core, ceil_div
from .errors import KVLost, LayoutMismatch, StoreClosed, UnknownSession
from .layout import validate_session_id
from .lifecycle import Lifecycle, failed_future
from .memory import Memory
from .reads import Reader
from .writeback import Writeback


class Turns:
    def __init__(self, core: Core, mem: Memory, wb: Writeback, life: Lifecycle, reader: Reader):
        self.core, self.mem, self.wb, self.life, self.reader = core, mem, wb, life, reader

    def save_layer(self, sid: str, layer: int, kv_new, start: int) -> None:
        """Save tokens ``[start, start+n)`` of ``layer`` (``kv_new``: [2, n, K, D]); returns at once.

        ``start`` is relative to the kept history and must continue what this layer already holds
        (``start == num_tokens`` at the first save of a turn, ``0`` for a new or KV-lost session).
        Errors of the asynchronous part surface in `commit_turn`'s future and in `flush`; after a
        failure, saves of the same turn raise its error until `commit_turn` or `abort_turn`.
        """
        validate_session_id(sid)
        core, lay = self.core, self.core.layout
        if not 0 <= layer < lay.num_layers:
            raise LayoutMismatch(f"layer {layer} out of range [0, {lay.num_layers})")
        shape = tuple(kv_new.shape)
        if len(shape) != 4 or shape[0] != 2 or shape[2:] != (lay.kv_heads, lay.head_dim):
            raise LayoutMismatch(f"kv_new has shape {shape}, expected [2, n, {lay.kv_heads}, {lay.head_dim}]")
        if np.dtype(kv_new.dtype) != lay.np_dtype:
            raise LayoutMismatch(f"kv_new has dtype {kv_new.dtype}, expected {lay.dtype}")
        if not isinstance(start, (int, np.integer)) or start < 0:
            raise LayoutMismatch(f"start must be an int >= 0, got {start!r}")
        n = shape[1]
        if isinstance(kv_new, jax.Array):
            try:
                kv_new.copy_to_host_async()
            except Exception:  # noqa: BLE001 - already on host / not supported: np.asarray copes
                pass
        B = core.B
        with core.lock:
            if core.closed:
                raise StoreClosed("the store is closed")
            s = core.sessions.get(sid)
            if s is None:
                if start != 0:
                    raise UnknownSession(f"unknown session {sid!r} (a new session starts at 0, got {start})")
                s = core.new_session(sid)
                s.host = self.mem.ensure_table(s, "host")
            broken = s.open if s.open is not None and not s.open.live else s.failed_open
            if broken is not None:
                if start == broken.pend[layer] - broken.base_offset or start != (s.num_tokens if s.kv_valid else 0):
                    raise self.life.open_error(s, broken)  # a save that continues the failed turn gets its error
                self.life.give_up_open(s)  # a save from the committed end: a new attempt of the turn
            restart = not s.kv_valid and s.open is None
            if restart and start != 0:
                # KVLost, not LayoutMismatch: a reader may find the damage between a caller's successful
                # load of an earlier layer and its save; either way: recompute, save from 0.
                raise KVLost(f"session {sid!r} lost its KV (a chunk failed its checksum): recompute it from "
                             f"its token ids and save it again from start=0")
            turn = s.open_turn(lay.num_layers, restart=restart)
            if restart and s.host is None:
                s.host = self.mem.ensure_table(s, "host")
            need_host = s.host is None
        if need_host:
            self.reader.ensure_host(s)  # saving on a session that left the host tier: read it back (pinned now)
        with core.lock:
            if not turn.live:
                raise self.life.open_error(s, turn)
            a0 = turn.base_offset + start
            if a0 != turn.pend[layer]:
                raise LayoutMismatch(f"session {sid!r} layer {layer}: save starts at token {start}, "
                                     f"expected {turn.pend[layer] - turn.base_offset}")
            if n == 0:
                return
            a1 = a0 + n
            b0, nb = a0 // B, ceil_div(a1, B)
            gone = min(s.trims, default=nb)  # blocks a queued tail drop will take out of the table first
            grow = sum(1 for b in range(b0, nb) if s.host is None or s.host.block(layer, b) is None or b >= gone)
            dgrow = max(0, nb - s.disk_blocks)
            turn.pend[layer] = a1
        try:
            host_res = self.life.take("host", grow * self.core.block_bytes, s, True)
            try:
                if dgrow:
                    with self.life.reserve("disk", core.disk_bytes(dgrow), s) as dres:
                        with core.lock:
                            if not turn.live or s.gone:
                                raise self.life.open_error(s, turn)
                            # another layer's save may have reserved some; never more than this reservation
                            more = min(dgrow, max(0, nb - s.disk_blocks))
                            s.held["disk"].absorb(dres, core.disk_bytes(more))
                            s.disk_blocks += more
                with core.lock:
                    if not turn.live:
                        raise self.life.open_error(s, turn)
                    self.wb.submit_save(s, turn, layer, kv_new, a0, a1, host_res)
            except BaseException:
                host_res.release()
                raise
        except BaseException:
            with core.lock:
                if turn.pend[layer] == a1:
                    turn.pend[layer] = a0
                if s.durable is None and s.end == 0 and not s.log and s.open is turn and not any(turn.tasks) \
                        and all(p == turn.base_offset for p in turn.pend):
                    s.open = None
                    self.life.forget(s)  # a new session whose first save failed: forget it
            raise
        core.policy.touch(sid, "host")

    def commit_turn(self, sid: str, token_ids) -> cf.Future:
        """Publish the turn: every layer saved up to ``len(token_ids)``; manifest written last.

        Returns a future that resolves (to the turn number) once the manifest is durable. On failure it
        raises `DiskFull` (a full disk) or `TurnFailed` with a one-line message, the session goes back
        to its last durable turn (later turns already committed in memory fail too), and `flush`
        raises the same error. The session is readable at once (read-your-writes).
        """
        s = self.life.get(sid)
        core = self.core
        tok = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        with core.lock:
            if s.open is None:
                if s.failed_open is not None:  # killed by an earlier turn's failure (reported there)
                    t, s.failed_open = s.failed_open, None
                    return failed_future(t.error)
                raise LayoutMismatch(f"session {sid!r}: nothing saved since the last commit")
            t = s.open
            want = t.base_offset + len(tok)
            bad = [i for i, p in enumerate(t.pend) if p != want]
            if bad:
                raise LayoutMismatch(f"session {sid!r}: {len(tok)} token ids but layers {bad[:5]} hold "
                                     f"{[t.pend[i] - t.base_offset for i in bad[:5]]} tokens")
            if t.base_offset == s.offset and s.kv_valid and not np.array_equal(tok[: len(s.token_ids)], s.token_ids):
                # The turn was saved onto this history: its ids must continue it (a caller that looked
                # up the history before an earlier turn failed and rewound it would otherwise publish
                # ids that do not match the KV).
                raise LayoutMismatch(f"session {sid!r}: the token ids do not continue the session's history "
                                     f"of {len(s.token_ids)} tokens (turn {s.turn})")
            prev = s.log[-1].done if s.log else None
            t = s.seal(tok, want, self.core.layout, core.B)
            self.wb.seal(s, t, prev)
        return t.done

    def abort_turn(self, sid: str) -> None:
        """Give up the turn being saved (the saves since the last `commit_turn`): the session stays at its
        last committed turn, in memory and on disk; queued saves of the turn do nothing; a session
        whose first turn is aborted is forgotten. Also clears a turn that failed. No-op otherwise."""
        s = self.life.get(sid)
        with self.core.lock:
            self.life.give_up_open(s)
