"""A session's life in the store: lookups, reservations, failures and rewinds, deletion, lost KV, eviction.

`Lifecycle` owns the transitions that are not a save, a read or a drop: a failed turn rewinds its
session to the last durable turn (``on_fail``, called by the committer) and gets a one-line error;
a deleted session leaves the table at once and its files go on the save worker (``schedule_removal``);
a session whose chunk failed its checksum keeps its token ids only (``mark_lost``); ``take`` /
``reserve`` make room in a tier, evicting idle sessions, and wait for work that frees some.
Everything marked "under the lock" runs with ``core.lock`` held; nothing here does I/O under it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib

import jax

from .budget import Reservation
from .core import TIERS, Core, ceil_div
from .disk import is_enospc
from .errors import DiskFull, KVLost, StoreClosed, StoreError, TurnFailed, UnknownSession
from .layout import validate_session_id
from .memory import Memory
from .session import Session, Turn


def done_future(value=None) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_result(value)
    return f


def failed_future(err: BaseException) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_exception(err)
    return f


class Lifecycle:
    """``wb`` (the `Writeback`, which calls back ``on_fail``) is set once both exist."""

    def __init__(self, core: Core, mem: Memory):
        self.core, self.mem = core, mem
        self.wb = None

    def get(self, sid: str) -> Session:
        validate_session_id(sid)
        if self.core.closed:
            raise StoreClosed("the store is closed")
        s = self.core.sessions.get(sid)
        if s is None:
            raise UnknownSession(f"unknown session {sid!r}")
        return s

    @contextlib.contextmanager
    def reserve(self, tier: str, nbytes: int, owner: Session, required: bool = True):
        """A reservation of ``nbytes`` in ``tier`` (evicting idle sessions), released at exit unless its
        bytes were moved elsewhere; yields None if not required and no room."""
        res = self.take(tier, nbytes, owner, required)
        try:
            yield res
        finally:
            if res is not None:
                res.release()

    def take(self, tier: str, nbytes: int, owner: Session, required: bool) -> Reservation | None:
        core = self.core
        for attempt in range(3):
            with core.lock:
                res = self.mem.make_room(tier, nbytes, owner, self.schedule_removal, required=False)
                if res is not None:
                    return res
                waits = list(core.gates.values()) + [
                    f for o in core.sessions.values() if o is not owner
                    for f in [o.last_task] + [t.done for t in o.log] if f is not None and not f.done()] + [
                    f for o in core.sessions.values() for f in [o.reclaim] if f is not None and not f.done()] + [
                    f for f in core.holding if not f.done()]
            # deletions under way free disk bytes; finished work makes sessions evictable; a promotion's read
            # or a demotion's copy holds host room (a promotion pins its session) until it ends
            for f in waits:
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - reported by their own turns
                    pass
        with core.lock:
            return self.mem.make_room(tier, nbytes, owner, self.schedule_removal, required=required)

    def turn_error(self, s: Session, t: Turn, cause: BaseException, kept: int) -> BaseException:
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

    def open_error(self, s: Session, t: Turn) -> BaseException:
        """Under the lock: the one-line error for a save into turn ``t`` whose asynchronous part failed."""
        if isinstance(t.error, (DiskFull, TurnFailed, KVLost)):
            return t.error
        return self.turn_error(s, t, t.error, s.durable.turn if s.durable is not None else 0)

    def on_fail(self, s: Session, turn: Turn, cause: BaseException) -> BaseException:
        """A turn failed (committer): fail it and every later pending turn, rewind to the last durable turn."""
        core = self.core
        with core.lock:
            kept = s.durable.turn if s.durable is not None else 0
            if turn.dead:  # killed by an earlier failure / delete / lost KV / abort: reported there
                if not isinstance(turn.error, StoreError):  # its own save failed first: the raw cause
                    turn.error = self.turn_error(s, turn, turn.error, kept)
                return turn.error
            err = self.turn_error(s, turn, cause, kept)
            dead = s.kill_from(turn, err)
            for t in dead:
                t.error = err if t is turn else self.turn_error(s, t, err, kept)
            self.rewind(s)
            core.errors.append(err)
        return err

    def rewind(self, s: Session) -> None:
        """Under the lock: ``s`` back to its durable state (or forgotten if it has none)."""
        core, mem = self.core, self.mem
        m = s.durable
        if m is None:
            self.forget(s)
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

    def forget(self, s: Session) -> None:
        """Under the lock: remove ``s`` from the store and schedule the removal of its files."""
        self.schedule_removal(s)

    def schedule_removal(self, s: Session) -> cf.Future:
        """Under the lock: delete ``s`` (its queued work killed once, out of the table, its copies dropped)
        and queue the removal of its files on the save worker, after every task queued before it."""
        core = self.core
        if not s.gone:
            s.kill_from(None, StoreError(f"session {s.sid!r} was deleted"))
            s.gone = True
        if core.sessions.get(s.sid) is s:
            del core.sessions[s.sid]
        self.mem.drop(s, "device")
        self.mem.drop(s, "host")
        core.policy.forget(s.sid)
        s.freeing = s.held["disk"].nbytes  # counted as soon free by eviction (make_room) until removed
        core.freeing += s.freeing
        gate = self.wb.submit(s, None, self._remove_files)
        core.gates[s.sid] = gate
        gate.add_done_callback(lambda g, sid=s.sid: self._gate_done(sid, g))
        return gate

    def _gate_done(self, sid: str, gate: cf.Future) -> None:
        with self.core.lock:
            if self.core.gates.get(sid) is gate:
                del self.core.gates[sid]

    def _remove_files(self, s: Session, _turn) -> None:
        core = self.core
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
                s.disk_blocks = s.disk_cap = s.disk_lo = s.dead_below = 0
                core.freeing -= s.freeing
                s.freeing = 0

    def mark_lost(self, s: Session, cause: BaseException) -> KVLost:
        """A chunk of ``s`` failed its checksum (or is missing): keep its token ids, drop its KV everywhere."""
        core = self.core
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
            self.mem.drop(s, "device")
            self.mem.drop(s, "host")
            prev = s.log[-1].done if s.log else None
            t = s.add_meta("lost", self.core.layout, core.B)
            self.wb.submit(s, t, self._drop_data)
            self.wb.seal(s, t, prev)
        return err

    def _drop_data(self, s: Session, turn: Turn) -> None:
        core = self.core
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
            s.disk_blocks = s.disk_cap = s.disk_lo = s.dead_below = 0

    def give_up_open(self, s: Session) -> None:
        """Under the lock: kill the open turn (if any) and give back what it took."""
        core = self.core
        s.failed_open = None
        t = s.open
        if t is None:
            return
        t.kill(TurnFailed(f"the new turn of session {s.sid!r} was aborted"))
        s.open = None
        if s.durable is None and not s.log:  # nothing ever committed: the session never existed
            self.forget(s)
            return
        if s.host is not None:
            self.mem.trim(s, ceil_div(s.end, core.B))
        keep = max(s.disk_cap, ceil_div(s.end, core.B) if s.kv_valid else 0)
        if s.disk_blocks > keep:
            s.held["disk"].release(core.disk_bytes(s.disk_blocks - keep))
            s.disk_blocks = keep

    def settle(self, s: Session) -> None:
        """Wait for the session's queued work (errors are reported by their own futures)."""
        with self.core.lock:
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
            self.core.stats.add("evictions", tier="disk")
            return self.delete(sid)
        s = self.get(sid)
        core, mem = self.core, self.mem
        self.settle(s)
        if tier == "device":
            with core.lock:
                f, nb = mem.span(s)
                demote = s.host is None and s.device is not None and s.device.covers(f, nb) and s.kv_valid
                blocks = [s.device.get(layer, f, nb) for layer in range(core.L)] if demote else None
                stamp = s.stamp()
            if demote:  # a copy device -> host, outside the lock, when the host tier has room
                res = self.take("host", core.L * (nb - f) * self.core.block_bytes, s, False)
                if res is not None:
                    with core.holding_room(res):  # a save that finds the host tier full waits for it
                        host = [jax.device_put(bl, core.host_sharding) for bl in blocks]
                        core.hooks.point("evict.demote", sid)
                        with core.lock:
                            idle, now = s.host is None and not s.gone and not s.busy(), s.stamp()
                            if idle and now[0] == stamp[0] and now[4] != stamp[4] and mem.span(s) == (f, nb):
                                core.stats.add("stale_copies")  # saves changed its rows inside the same blocks
                            if idle and now == stamp:
                                mem.ensure_table(s, "host")
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
        s = self.get(sid)
        with self.core.lock:
            gate = self.schedule_removal(s)
        gate.result()
