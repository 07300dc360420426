"""`TieredStore`: device -> host (pinned_host) -> disk (TensorStore) session KV store; the public API.

This module is the facade: it validates arguments and moves sessions through their states; the
parts do the work: `session` (the record, its turns, the state machine), `budget` (reservations),
`memory` (host/device block tables, eviction), `writeback` (save worker, commit log), `promotion`
(disk -> host), `manifest` + `recovery` (the on-disk schema, open/adopt/recover/quarantine),
`rootlock` (one writer per root), `hooks` / `faults` (tests).

Representation: per session, per layer, token blocks ``[2, B, K, D]`` (B = ``token_block``) in the
device's memory or in ``pinned_host`` memory; block i holds absolute tokens ``[i*B, (i+1)*B)``; on disk
one zarr3 chunk per block. Tiers are inclusive: saves go to the host tier and on to disk; the device
tier is a cache filled by `load_layer`. A session with a turn in flight is pinned in the host tier.

Concurrency: the caller's thread validates and reserves; one save worker, one committer and an I/O
pool (promotions) do the rest. Metadata is guarded by one lock that is never held across I/O, device
transfers or deletes. Every error of queued work reaches the turn's future and `flush`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from . import ranges, recovery
from .budget import Reservation
from .core import TIERS, Core, ceil_div
from .disk import DiskTier, is_enospc
from .faults import FaultInjector
from .errors import (BudgetError, DiskFull, KVLost, LayoutMismatch, StoreClosed, StoreError, TurnFailed,
                     UnknownSession)
from .layout import KVLayout, SessionInfo, StoreConfig, validate_session_id
from .memory import Memory
from .policy import EvictionPolicy, LRUPolicy
from .promotion import Promoter
from .rootlock import RootLock
from .session import Session, Turn
from .writeback import Writeback


def assemble_blocks(blocks: tuple[jax.Array, ...], off: jax.Array, n: jax.Array, pad_to: int) -> jax.Array:
    """blocks: nb x [2, B, K, D] -> [2, pad_to, K, D]: rows off..off+n of the concatenation, zeros after.

    Traceable: usable inside another jitted program (all blocks in one memory space)."""
    zeros = jnp.zeros((2, pad_to) + blocks[0].shape[2:], blocks[0].dtype)
    x = jnp.concatenate(list(blocks) + [zeros], axis=1)
    y = jax.lax.dynamic_slice_in_dim(x, off, pad_to, axis=1)
    keep = jnp.arange(pad_to) < n
    return jnp.where(keep[None, :, None, None], y, jnp.zeros_like(y))


_assemble = jax.jit(assemble_blocks, static_argnames=("pad_to",))


class _Done(cf.Future):
    def __init__(self, value=None):
        super().__init__()
        self.set_result(value)


def _failed(err: BaseException) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_exception(err)
    return f


class TieredStore:
    """Session KV store over device, host and disk tiers. See the module docstring and docs/store.md."""

    def __init__(self, cfg: StoreConfig, layout: KVLayout, policy: EvictionPolicy | None = None, *, device=None,
                 faults: FaultInjector | None = None):
        """``faults``: a `FaultInjector` consulted by the disk tier from the first operation of the open
        on (tests; ``store.disk.faults`` is one by default)."""
        self.cfg, self.layout = cfg, layout
        self.policy: EvictionPolicy = policy or LRUPolicy()
        B = cfg.token_block
        self.block_bytes = B * layout.bytes_per_token_layer
        if cfg.host_bytes < layout.num_layers * self.block_bytes:
            raise BudgetError(
                f"host_bytes={cfg.host_bytes} is smaller than one session of one block "
                f"({layout.num_layers * self.block_bytes} bytes = {layout.num_layers} layers x {B} tokens)")
        if cfg.disk_bytes is not None and cfg.disk_bytes < layout.num_layers * self.block_bytes:
            raise BudgetError(f"disk_bytes={cfg.disk_bytes} is smaller than one session of one block")
        disk = DiskTier(cfg, layout)
        if faults is not None:
            disk.faults = faults
        self._rootlock = RootLock(disk.root) if disk.root is not None else None
        try:
            self._core = core = Core(cfg, layout, self.policy, device or jax.devices()[0], disk)
            self.stats, self.hooks, self.disk, self.device = core.stats, core.hooks, disk, core.device
            self._mem = Memory(core)
            self._wb = Writeback(core, self._mem, self._on_fail)
            self._promoter = Promoter(core, self._mem, self._reserve, self._mark_lost)
            self._io = cf.ThreadPoolExecutor(2, thread_name_prefix="kvstore-io")
            self._io_futs: list[cf.Future] = []
            recovery.open_store(core, self._mem, self._promoter, self._reserve)
        except BaseException:
            if self._rootlock is not None:
                self._rootlock.release()
            raise

    # ================================================================ properties
    @property
    def budget(self) -> dict[str, int | None]:
        return {t: b.limit for t, b in self._core.budgets.items()}

    @property
    def used(self) -> dict[str, int]:
        return self.usage()

    # ================================================================ helpers
    def _get(self, sid: str) -> Session:
        validate_session_id(sid)
        if self._core.closed:
            raise StoreClosed("the store is closed")
        s = self._core.sessions.get(sid)
        if s is None:
            raise UnknownSession(f"unknown session {sid!r}")
        return s

    @contextlib.contextmanager
    def _reserve(self, tier: str, nbytes: int, owner: Session, required: bool = True):
        """A reservation of ``nbytes`` in ``tier`` (evicting idle sessions), released at exit unless its
        bytes were moved elsewhere; yields None if not required and no room."""
        res = self._take(tier, nbytes, owner, required)
        try:
            yield res
        finally:
            if res is not None:
                res.release()

    def _take(self, tier: str, nbytes: int, owner: Session, required: bool) -> Reservation | None:
        core = self._core
        for attempt in range(3):
            with core.lock:
                res = self._mem.make_room(tier, nbytes, owner, self._schedule_removal, required=False)
                if res is not None:
                    return res
                waits = list(core.gates.values()) + [
                    f for o in core.sessions.values() if o is not owner
                    for f in [o.last_task] + [t.done for t in o.log] if f is not None and not f.done()]
            for f in waits:  # deletions under way free disk bytes; finished work makes sessions evictable
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - reported by their own turns
                    pass
        with core.lock:
            return self._mem.make_room(tier, nbytes, owner, self._schedule_removal, required=required)

    def _turn_error(self, s: Session, t: Turn, cause: BaseException, kept: int) -> BaseException:
        """The one-line error of turn ``t`` that ``cause`` made fail (a full disk: `DiskFull`)."""
        what = (f"turn {t.snap.turn}" if t.kind == "data" and t.snap is not None
                else "the new turn" if t.kind == "data" else f"the {t.kind} of the history")
        full = isinstance(cause, DiskFull) or is_enospc(cause) or (
            isinstance(cause, StoreError) and cause.__cause__ is not None and is_enospc(cause.__cause__))
        root = cause
        while isinstance(root, (TurnFailed,)) and root.__cause__ is not None:
            root = root.__cause__
        if full:
            err: BaseException = DiskFull(f"disk full: {what} of session {s.sid!r} was not saved; the session stays "
                                          f"at turn {kept} (free space and send it again)")
        else:
            reason = (str(root).splitlines()[0] if str(root) else type(root).__name__).split(" [", 1)[0]
            reason = reason if len(reason) <= 160 else reason[:157] + "..."  # TensorStore's text can be long
            err = TurnFailed(f"{what} of session {s.sid!r} was not saved ({reason}); the session stays at turn {kept}")
        err.__cause__ = root
        return err

    def _open_error(self, s: Session, t: Turn) -> BaseException:
        """Under the lock: the one-line error for a save into turn ``t`` whose asynchronous part failed."""
        if isinstance(t.error, (DiskFull, TurnFailed, KVLost)):
            return t.error
        return self._turn_error(s, t, t.error, s.durable.turn if s.durable is not None else 0)

    def _on_fail(self, s: Session, turn: Turn, cause: BaseException) -> BaseException:
        """A turn failed (committer): fail it and every later pending turn, rewind to the last durable turn."""
        core = self._core
        with core.lock:
            if turn.dead:
                return turn.error  # killed by an earlier failure / delete / lost KV: reported there
            kept = s.durable.turn if s.durable is not None else 0
            err = self._turn_error(s, turn, cause, kept)
            dead = s.kill_from(turn, err)
            for t in dead:
                t.error = err if t is turn else self._turn_error(s, t, err, kept)
            self._rewind(s)
            core.errors.append(err)
        return err

    def _rewind(self, s: Session) -> None:
        """Under the lock: ``s`` back to its durable state (or forgotten if it has none)."""
        core, mem = self._core, self._mem
        m = s.durable
        if m is None:
            self._forget(s)
            return
        s.restore(m)
        core.disk.forget(s.sid)  # the next write reopens the array (its metadata as on disk)
        f, nb = mem.span(s)
        mem.drop(s, "device")
        if s.host is not None and s.host.covers(f, nb):
            mem.trim(s, nb)
        else:
            mem.drop(s, "host")
        keep = max(s.disk_cap, nb if s.kv_valid else 0)
        if s.disk_blocks > keep:
            s.held["disk"].release(core.disk_bytes(s.disk_blocks - keep))
            s.disk_blocks = keep

    def _forget(self, s: Session) -> None:
        """Under the lock: remove ``s`` from the store and schedule the removal of its files."""
        self._schedule_removal(s)

    def _schedule_removal(self, s: Session) -> cf.Future:
        """Under the lock: delete ``s`` (its queued work killed once, out of the table, its copies dropped)
        and queue the removal of its files on the save worker, after every task queued before it."""
        core = self._core
        if not s.gone:
            s.kill_from(None, StoreError(f"session {s.sid!r} was deleted"))
            s.gone = True
        if core.sessions.get(s.sid) is s:
            del core.sessions[s.sid]
        self._mem.drop(s, "device")
        self._mem.drop(s, "host")
        core.policy.forget(s.sid)
        s.freeing = s.held["disk"].nbytes  # counted as soon free by eviction (make_room) until removed
        core.freeing += s.freeing
        gate = self._wb.submit(s, None, self._remove_files)
        core.gates[s.sid] = gate
        gate.add_done_callback(lambda g, sid=s.sid: self._gate_done(sid, g))
        return gate

    def _gate_done(self, sid: str, gate: cf.Future) -> None:
        with self._core.lock:
            if self._core.gates.get(sid) is gate:
                del self._core.gates[sid]

    def _remove_files(self, s: Session, _turn) -> None:
        core = self._core
        core.hooks.point("delete.disk", s.sid)
        with core.lock:
            writes = list(s.chunk_writes.values())
        for w in writes:
            try:
                w.result()
            except BaseException:  # noqa: BLE001 - the data is going anyway
                pass
        try:
            with s.mlock:
                core.disk.delete_session(s.sid)
        finally:
            with core.lock:
                s.held["disk"].release()
                s.disk_blocks = s.disk_cap = 0
                core.freeing -= s.freeing
                s.freeing = 0

    def _mark_lost(self, s: Session, cause: BaseException) -> KVLost:
        """A chunk of ``s`` failed its checksum (or is missing): keep its token ids, drop its KV everywhere."""
        core = self._core
        err = KVLost(f"session {s.sid!r}: KV unreadable or damaged on disk ({str(cause).splitlines()[0] if str(cause) else cause!r}); "
                     "recompute it from its token ids")
        with core.lock:
            if s.gone or not s.kv_valid:
                return err
            core.stats.add("checksum_failures")
            s.kill_from(None, err)
            s.failed_open = None
            s.kv_valid = False
            s.offset, s.end = 0, len(s.token_ids)
            self._mem.drop(s, "device")
            self._mem.drop(s, "host")
            prev = s.log[-1].done if s.log else None
            t = s.add_meta("lost", self.layout, core.B)
            self._wb.submit(s, t, self._drop_data)
            self._wb.seal(s, t, prev)
        return err

    def _drop_data(self, s: Session, turn: Turn) -> None:
        core = self._core
        with core.lock:
            writes = list(s.chunk_writes.values())
        for w in writes:
            try:
                w.result()
            except BaseException:  # noqa: BLE001
                pass
        core.disk.delete_data(s.sid)
        with core.lock:
            s.chunk_writes.clear()
            s.held["disk"].release()
            s.disk_blocks = s.disk_cap = 0

    def _tier_of(self, s: Session) -> str | None:
        if not s.kv_valid:
            return None
        if s.device is not None:  # a device copy (blocks a save touched may be in transfer: loads then use host)
            return "device"
        if s.host is not None:
            return "host"
        return "disk"

    # ================================================================ public API
    def sessions(self) -> list[str]:
        with self._core.lock:
            return sorted(self._core.sessions)

    def lookup(self, sid: str) -> SessionInfo | None:
        """The session's state, or None when it is not in the store."""
        validate_session_id(sid)
        with self._core.lock:
            s = self._core.sessions.get(sid)
            if s is None:
                return None
            m = s.durable
            durable = m is not None and not s.log and m.turn == s.turn and m.offset == s.offset
            return SessionInfo(sid, self._tier_of(s), s.num_tokens, s.turn, s.token_ids.copy(), s.kv_valid, durable)

    def save_layer(self, sid: str, layer: int, kv_new, start: int) -> None:
        """Save tokens ``[start, start+n)`` of ``layer`` (``kv_new``: [2, n, K, D]); returns at once.

        ``start`` is relative to the kept history and must continue what this layer already holds
        (``start == num_tokens`` at the first save of a turn, ``0`` for a new or KV-lost session).
        Errors of the asynchronous part surface in `commit_turn`'s future and in `flush`; after a
        failure, saves of the same turn raise its error until `commit_turn` or `abort_turn`.
        """
        validate_session_id(sid)
        core, lay = self._core, self.layout
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
                s.host = self._mem.ensure_table(s, "host")
            broken = s.open if s.open is not None and not s.open.live else s.failed_open
            if broken is not None:
                if start == broken.pend[layer] - broken.base_offset or start != (s.num_tokens if s.kv_valid else 0):
                    raise self._open_error(s, broken)  # a save that continues the failed turn gets its error
                self._give_up_open(s)  # a save from the committed end: a new attempt of the turn
            restart = not s.kv_valid and s.open is None
            if restart and start != 0:
                # KVLost, not LayoutMismatch: a reader may find the damage between a caller's successful
                # load of an earlier layer and its save; either way: recompute, save from 0.
                raise KVLost(f"session {sid!r} lost its KV (a chunk failed its checksum): recompute it from "
                             f"its token ids and save it again from start=0")
            turn = s.open_turn(lay.num_layers, restart=restart)
            if restart and s.host is None:
                s.host = self._mem.ensure_table(s, "host")
            need_host = s.host is None
        if need_host:
            self._ensure_host(s)  # saving on a session that left the host tier: read it back (pinned now)
        with core.lock:
            if not turn.live:
                raise self._open_error(s, turn)
            a0 = turn.base_offset + start
            if a0 != turn.pend[layer]:
                raise LayoutMismatch(f"session {sid!r} layer {layer}: save starts at token {start}, "
                                     f"expected {turn.pend[layer] - turn.base_offset}")
            if n == 0:
                return
            a1 = a0 + n
            b0, nb = a0 // B, ceil_div(a1, B)
            grow = sum(1 for b in range(b0, nb) if s.host is None or s.host.block(layer, b) is None)
            dgrow = max(0, nb - s.disk_blocks)
            turn.pend[layer] = a1
        try:
            host_res = self._take("host", grow * self.block_bytes, s, True)
            try:
                if dgrow:
                    with self._reserve("disk", core.disk_bytes(dgrow), s) as dres:
                        with core.lock:
                            if not turn.live or s.gone:
                                raise self._open_error(s, turn)
                            # another layer's save may have reserved some; never more than this reservation
                            more = min(dgrow, max(0, nb - s.disk_blocks))
                            s.held["disk"].absorb(dres, core.disk_bytes(more))
                            s.disk_blocks += more
                with core.lock:
                    if not turn.live:
                        raise self._open_error(s, turn)
                    self._wb.submit_save(s, turn, layer, kv_new, a0, a1, host_res)
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
                    self._forget(s)  # a new session whose first save failed: forget it
            raise
        core.policy.touch(sid, "host")

    def commit_turn(self, sid: str, token_ids) -> cf.Future:
        """Publish the turn: every layer saved up to ``len(token_ids)``; manifest written last.

        Returns a future that resolves (to the turn number) once the manifest is durable. On failure it
        raises `DiskFull` (a full disk) or `TurnFailed` with a one-line message, the session goes back
        to its last durable turn (later turns already committed in memory fail too), and `flush`
        raises the same error. The session is readable at once (read-your-writes).
        """
        s = self._get(sid)
        core = self._core
        tok = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        with core.lock:
            if s.open is None:
                if s.failed_open is not None:  # killed by an earlier turn's failure (reported there)
                    t, s.failed_open = s.failed_open, None
                    return _failed(t.error)
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
            t = s.seal(tok, want, self.layout, core.B)
            self._wb.seal(s, t, prev)
        return t.done

    def abort_turn(self, sid: str) -> None:
        """Give up the turn being saved (the saves since the last `commit_turn`): the session stays at its
        last committed turn, in memory and on disk; queued saves of the turn do nothing; a session
        whose first turn is aborted is forgotten. Also clears a turn that failed. No-op otherwise."""
        s = self._get(sid)
        with self._core.lock:
            self._give_up_open(s)

    def _give_up_open(self, s: Session) -> None:
        """Under the lock: kill the open turn (if any) and give back what it took."""
        core = self._core
        s.failed_open = None
        t = s.open
        if t is None:
            return
        t.kill(TurnFailed(f"the new turn of session {s.sid!r} was aborted"))
        s.open = None
        if s.durable is None and not s.log:  # nothing ever committed: the session never existed
            self._forget(s)
            return
        if s.host is not None:
            self._mem.trim(s, ceil_div(s.end, core.B))
        keep = max(s.disk_cap, ceil_div(s.end, core.B) if s.kv_valid else 0)
        if s.disk_blocks > keep:
            s.held["disk"].release(core.disk_bytes(s.disk_blocks - keep))
            s.disk_blocks = keep

    def truncate_front(self, sid: str, n_drop: int) -> cf.Future:
        """Drop the oldest ``n_drop`` tokens; the rest stays bit-identical. Returns a future (manifest);
        if that fails the session goes back to its last durable state (like a failed turn).
        The same as ``drop_range(sid, 0, n_drop)``."""
        s = self._get(sid)
        with self._core.lock:
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
        """Remove tokens ``[start, stop)`` of the session's committed history: the tokens before
        ``start`` and from ``stop`` on stay bit-identical, the later ones move down by ``stop - start``
        (keys are stored before RoPE). ``drop_range(sid, 0, n)`` is `truncate_front`; ``(sid, sink,
        sink + n)`` keeps ``sink`` attention-sink tokens; ``(sid, k, num_tokens)`` drops the tail.

        Refused (`LayoutMismatch`) while a turn is open. Returns a future that resolves once the new
        manifest is durable; if it fails, the session goes back to its last durable state (like a
        failed turn). A kill at any point leaves the old or the new history on disk. Dropping a middle
        range copies the kept rows to fresh blocks (the session must fit twice in the host budget
        for that moment: else `BudgetError`, nothing changed); front and tail drops are metadata only."""
        s = self._get(sid)
        core = self._core
        with core.lock:
            self._check_drop(s, start, stop)
            start, stop = int(start), int(stop)
            self._give_up_open(s)  # a failed turn left behind: its error was reported
            if start == stop:
                return s.log[-1].done if s.log else _Done(s.turn)
            p = ranges.plan(s.offset, s.end, start, stop)
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
                return self._seal_meta(s, "drop", p)
            n = s.num_tokens
        # A move: the session's rows must be in the host tier (pinned there once the turn is queued).
        kept = n - (stop - start)
        for attempt in range(3):
            self._ensure_host(s)
            with core.lock:
                dst = s.end
                d0, d1 = dst // core.B, ceil_div(dst + kept, core.B)
            res = self._take("host", core.L * (d1 - d0) * self.block_bytes, s, True)
            try:
                dgrow = max(0, d1 - s.disk_blocks)
                with self._reserve("disk", core.disk_bytes(dgrow), s) as dres:
                    with core.lock:
                        self._check_drop(s, start, stop)
                        if s.num_tokens != n or s.end != dst or not s.kv_valid:
                            raise LayoutMismatch(f"session {sid!r} changed while tokens were dropped from it")
                        if s.host is None:
                            continue  # evicted meanwhile: bring it back
                        more = min(dgrow, max(0, d1 - s.disk_blocks))
                        s.held["disk"].absorb(dres, core.disk_bytes(more))
                        s.disk_blocks += more
                        p = ranges.plan(s.offset, s.end, start, stop)
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
        t = s.add_meta(kind, self.layout, self._core.B)
        t.plan, t.res = plan, res
        self._wb.seal(s, t, prev)
        return t.done

    def _ensure_host(self, s: Session) -> None:
        """Bring ``s`` into the host tier (blocking)."""
        for attempt in range(3):
            with self._core.lock:
                if s.host is not None:
                    return
                if not s.kv_valid:
                    raise KVLost(f"session {s.sid!r} has no valid KV; recompute from its token ids")
                if s.gone:
                    raise UnknownSession(f"session {s.sid!r} was deleted")
                mine, p = self._promoter.claim(s)
            if mine:
                self._promoter.run(s, p)
            p.done.exception()  # wait
            if p.error is not None:
                raise p.error
        raise StoreError(f"session {s.sid!r} kept changing while it was read from disk")

    def _resolve_layer(self, sid: str, layer: int, pad_to: int | None):
        """``(s, src, blocks, off, n, pad, f, ver)``: src "device" (device blocks), "host"/"disk"
        (pinned_host blocks; "disk" = just promoted) or "empty"."""
        s = self._get(sid)
        core = self._core
        if not 0 <= layer < self.layout.num_layers:
            raise LayoutMismatch(f"layer {layer} out of range [0, {self.layout.num_layers})")
        with core.lock:
            task = s.layer_task.get(layer)
        if task is not None and not task.done():
            task.exception()  # read-your-writes: this layer's queued saves first (other layers run on)
        for attempt in range(3):
            with core.lock:
                if s.gone:
                    raise UnknownSession(f"unknown session {sid!r}")
                if not s.kv_valid:
                    raise KVLost(f"session {sid!r} has no valid KV; recompute from its token ids")
                n = s.num_tokens
                pad = n if pad_to is None else pad_to
                if pad < n:
                    raise LayoutMismatch(f"pad_to={pad_to} < num_tokens={n}")
                f, nb = self._mem.span(s)
                off = s.offset - f * core.B
                ver = s.layer_ver.get(layer, 0)
                pf, s.prefetch = s.prefetch, None
                if pf is not None and pf.done():
                    core.stats.add("prefetches_in_time")
                if nb <= f:
                    return s, "empty", (), off, n, pad, f, ver
                if s.device is not None:
                    dl = s.device.get(layer, f, nb)
                    if dl is not None:
                        return s, "device", dl, off, n, pad, f, ver
                if s.host is not None:
                    hl = s.host.get(layer, f, nb)
                    if hl is None:
                        # A turn committed in memory whose saves failed (or died) published nothing: its
                        # commit fails and rewinds the session. Wait for that, then look again.
                        waits = [t.done for t in s.log]
                        if not waits:
                            raise StoreError(f"session {sid!r} layer {layer}: the host tier misses blocks of the "
                                             "committed history (a bug)")
                        p = None
                    else:
                        core.stats.add("hits", tier="host")
                        came, blocks = "host", hl
                        break
                else:
                    mine, p = self._promoter.claim(s)
            if p is None:
                for w in waits:
                    w.exception()
                continue
            if mine:
                core.stats.add("prefetches_issued")
                self._track(self._io.submit(self._promoter.run, s, p))
            part = p.wait_layer(layer, sid)
            with core.lock:
                if p.epoch != s.epoch or s.gone or not s.kv_valid or self._mem.span(s)[1] != nb:
                    continue  # the session moved meanwhile: look again
            blocks = part[f:nb]
            core.stats.add("misses", tier="host")
            core.stats.add("hits", tier="disk")
            came = "disk"
            break
        else:
            raise StoreError(f"session {sid!r} kept changing while it was loaded")
        core.stats.add("bytes_read", len(blocks) * self.block_bytes, tier="host")
        core.policy.touch(sid, "host")
        return s, came, blocks, off, n, pad, f, ver

    def load_layer(self, sid: str, layer: int, pad_to: int | None = None) -> jax.Array:
        """``[2, pad_to or num_tokens, K, D]`` on the device; rows >= num_tokens are zeros.

        From the device or host tier the transfer is dispatched asynchronously. From disk, the first
        load starts a background promotion that reads every layer concurrently and verifies them in
        order; a load waits for its own layer only, and raises `KVLost` at the first layer whose
        checksum fails (layers verified before it were correct).
        """
        s, src, blocks, off, n, pad, f, ver = self._resolve_layer(sid, layer, pad_to)
        core = self._core
        if src == "empty":
            return jnp.zeros((2, pad, self.layout.kv_heads, self.layout.head_dim), self.layout.np_dtype, device=self.device)
        if src == "device":
            core.stats.add("hits", tier="device")
            core.stats.add("bytes_read", len(blocks) * self.block_bytes, tier="device")
            core.policy.touch(sid, "device")
        else:
            blocks = jax.device_put(list(blocks), core.dev_sharding)  # one batched transfer, outside the lock
            if self.budget["device"] > 0:
                self._cache_on_device(s, layer, f, blocks, ver)
        return _assemble(tuple(blocks), jnp.int32(off), jnp.int32(n), pad)

    def _cache_on_device(self, s: Session, layer: int, f: int, blocks: list, ver: int) -> None:
        core = self._core
        res = self._take("device", len(blocks) * self.block_bytes, s, False)
        if res is None:
            return
        with res, core.lock:
            if s.gone or s.layer_ver.get(layer, 0) != ver or s.offset // core.B != f:
                return  # a save or truncation changed the layer meanwhile: this copy is stale
            t = self._mem.ensure_table(s, "device")
            self._mem.free(s, "device", t.drop_layer(layer))
            for i, blk in enumerate(blocks):
                self._mem.put(s, "device", layer, f + i, blk, res)
            core.stats.add("bytes_written", len(blocks) * self.block_bytes, tier="device")
        core.policy.touch(s.sid, "device")

    def layer_blocks(self, sid: str, layer: int) -> tuple[tuple[jax.Array, ...], int, int, str]:
        """``(blocks, offset, num_tokens, tier)``: the blocks ``[2, B, K, D]`` that hold ``layer``,
        where they are (``device`` or ``pinned_host`` memory for "host"/"disk"), the row of the first
        kept token in their concatenation, and the token count — for a jitted program that moves
        host blocks to the device itself (``store.assemble_blocks`` pads them). Waits like
        `load_layer` (own layer only); the device tier is not filled by this path."""
        s, src, blocks, off, n, pad, f, ver = self._resolve_layer(sid, layer, None)
        if src == "device":
            self._core.stats.add("hits", tier="device")
            self._core.policy.touch(sid, "device")
        return tuple(blocks), off, n, src

    def prefetch(self, sid: str) -> cf.Future:
        """Start reading the session disk -> host; returns a future at once."""
        s = self._get(sid)
        core = self._core
        with core.lock:
            if s.host is not None or not s.kv_valid:
                return _Done(None)
            if s.prefetch is not None and not s.prefetch.done():
                return s.prefetch
            mine, p = self._promoter.claim(s)
            s.prefetch = p.done
            if not mine:
                return p.done
            core.stats.add("prefetches_issued")
        self._track(self._io.submit(self._promoter.run, s, p))
        return p.done

    def _track(self, fut: cf.Future) -> None:
        """Remember a promotion running on the I/O pool (flush waits for it, even if its session goes)."""
        with self._core.lock:
            self._io_futs = [f for f in self._io_futs if not f.done()] + [fut]

    def _settle(self, s: Session) -> None:
        """Wait for the session's queued work (errors are reported by their own futures)."""
        with self._core.lock:
            futs = [f for f in [s.last_task] + [t.done for t in s.log] if f is not None]
            if s.promoting is not None:
                futs.append(s.promoting.done)
        for f in futs:
            try:
                f.result()
            except BaseException:  # noqa: BLE001
                pass

    def evict(self, sid: str, tier: str) -> None:
        """"device": drop the device copy (to host); "host": drop the host copy (disk keeps it);
        "disk": delete the session everywhere. Waits for the session's work in flight first; a session
        that started a new turn meanwhile keeps its host copy."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        if tier == "disk":
            self._core.stats.add("evictions", tier="disk")
            return self.delete(sid)
        s = self._get(sid)
        core, mem = self._core, self._mem
        self._settle(s)
        if tier == "device":
            with core.lock:
                f, nb = mem.span(s)
                demote = s.host is None and s.device is not None and s.device.covers(f, nb) and s.kv_valid
                blocks = [s.device.get(layer, f, nb) for layer in range(core.L)] if demote else None
                epoch = s.epoch
            if demote:  # a copy device -> host, outside the lock, when the host tier has room
                res = self._take("host", core.L * (nb - f) * self.block_bytes, s, False)
                if res is not None:
                    with res:
                        host = [jax.device_put(bl, core.host_sharding) for bl in blocks]
                        with core.lock:
                            if s.host is None and s.epoch == epoch and not s.busy() and mem.span(s) == (f, nb):
                                t = mem.ensure_table(s, "host")
                                for layer, bl in enumerate(host):
                                    for i, blk in enumerate(bl):
                                        mem.put(s, "host", layer, f + i, blk, res)
        with core.lock:
            if s.gone or (tier == "host" and s.busy()):
                return
            if (tier == "device" and s.device is not None) or (tier == "host" and s.host is not None):
                core.stats.add("evictions", tier=tier)
                mem.drop(s, tier)

    def delete(self, sid: str) -> None:
        """Remove the session from every tier (its files too, before this returns)."""
        s = self._get(sid)
        with self._core.lock:
            gate = self._schedule_removal(s)
        gate.result()

    def flush(self) -> None:
        """Wait for every save, commit and prefetch in flight; raise the first error of a turn that failed
        since the last flush (each commit's future also carries its own error)."""
        core = self._core
        with core.lock:
            sessions = list(core.sessions.values())
            gates = list(core.gates.values())
        for s in sessions:
            self._settle(s)
            with core.lock:
                pf = s.prefetch
            if pf is not None:
                try:
                    pf.result()
                except BaseException:  # noqa: BLE001 - a prefetch is a hint; its load reports
                    pass
        with core.lock:
            ios = list(self._io_futs)
        for g in gates + ios:  # file removals; promotions (a deleted session's still holds its reservation)
            try:
                g.result()
            except BaseException:  # noqa: BLE001
                pass
        with core.lock:
            errors, core.errors = core.errors, []
        if errors:
            raise errors[0]

    def usage(self) -> dict[str, int]:
        """Bytes held per tier (what the budgets count)."""
        with self._core.lock:
            return {t: b.used for t, b in self._core.budgets.items()}

    def accounting(self) -> dict[str, int]:
        """Per tier, bytes the budget counts minus bytes the tables hold (0 everywhere once quiet:
        anything else is a leak). Call after `flush`."""
        core = self._core
        with core.lock:
            held = {t: 0 for t in TIERS}
            for s in core.sessions.values():
                held["host"] += (s.host.count() if s.host is not None else 0) * self.block_bytes
                held["device"] += (s.device.count() if s.device is not None else 0) * self.block_bytes
                held["disk"] += core.disk_bytes(s.disk_blocks)
            return {t: core.budgets[t].used - held[t] for t in TIERS}

    def close(self) -> None:
        """Wait for the work in flight, stop the threads, release the root; raises like `flush`."""
        if self._core.closed:
            return
        try:
            self.flush()
        finally:
            self._core.closed = True
            self._core.hooks.release_all()
            self._io.shutdown(wait=True)
            self._wb.shutdown()
            if self._rootlock is not None:
                self._rootlock.release()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
