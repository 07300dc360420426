"""`TieredStore`: device -> host (pinned_host) -> disk (TensorStore) session KV store; the public API.

This module is the facade: it builds the parts and hands each call to the one that does the work:
`turns` (save_layer, commit_turn, abort_turn), `reads` (load_layer, layer_blocks, prefetch,
assemble_blocks), `ranges` (drop_range, truncate_front), `lifecycle` (reservations, failures and
rewinds, deletion, lost KV, eviction); under them `session` (the record, its turns, the state
machine), `budget` (reservations), `memory` (host/device block tables, making room), `writeback`
(save worker, commit log), `promotion` (disk -> host), `disk` + `chunks` + `durable` (keys and
manifests, session arrays, durable files), `manifest` + `recovery` (the on-disk schema,
open/adopt/recover/quarantine), `rootlock` (one writer per root), `hooks` / `faults` (tests).

Representation: per session, per layer, token blocks ``[2, B, K, D]`` (B = ``token_block``) in the
device's memory or in ``pinned_host`` memory; block i holds absolute tokens ``[i*B, (i+1)*B)``; on disk
zarr3 chunks of ``disk_chunk`` tokens (a divisor of B) by ``disk_chunk_layers`` layers (`chunks`). Blocks before a session's durable front are
deleted from the disk (and the disk budget) once their manifest is durable. Tiers are inclusive: saves go to the host tier and on to disk; the device
tier is a cache filled by `load_layer`. A session with a turn in flight is pinned in the host tier.

Concurrency: the caller's thread validates and reserves; one save worker, one committer and an I/O
pool (promotions) do the rest. Metadata is guarded by one lock that is never held across I/O, device
transfers or deletes. Every error of queued work reaches the turn's future and `flush`.
"""

from __future__ import annotations

import concurrent.futures as cf

import jax

from . import recovery
from .core import TIERS, Core
from .disk import DiskTier
from .errors import BudgetError
from .faults import FaultInjector
from .layout import KVLayout, SessionInfo, StoreConfig, validate_session_id
from .lifecycle import Lifecycle
from .memory import Memory
from .policy import EvictionPolicy, LRUPolicy
from .promotion import Promoter
from .ranges import Dropper
from .reads import Reader, assemble_blocks
from .rootlock import RootLock
from .session import Session
from .turns import Turns
from .writeback import Writeback

__all__ = ["TieredStore", "assemble_blocks"]


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
            self._mem = mem = Memory(core)
            self._life = life = Lifecycle(core, mem)
            self._wb = life.wb = Writeback(core, mem, life.on_fail)
            self._promoter = Promoter(core, mem, life.reserve, life.mark_lost)
            self._reader = Reader(core, mem, life, self._promoter)
            self._turns = Turns(core, mem, self._wb, life, self._reader)
            self._dropper = Dropper(core, self._wb, life, self._reader)
            recovery.open_store(core, mem, self._promoter, life.reserve)
        except BaseException:
            if self._rootlock is not None:
                self._rootlock.release()
            raise

    @property
    def budget(self) -> dict[str, int | None]:
        return {t: b.limit for t, b in self._core.budgets.items()}

    @property
    def used(self) -> dict[str, int]:
        return self.usage()

    # ================================================================ sessions
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
            return SessionInfo(sid, _tier_of(s), s.num_tokens, s.turn, s.token_ids.copy(), s.kv_valid, durable)

    # ================================================================ turns (turns.py)
    def save_layer(self, sid: str, layer: int, kv_new, start: int) -> None:
        """Save tokens ``[start, start+n)`` of ``layer`` (``kv_new``: [2, n, K, D]); returns at once.

        ``start`` is relative to the kept history and must continue what this layer already holds
        (``start == num_tokens`` at the first save of a turn, ``0`` for a new or KV-lost session).
        Errors of the asynchronous part surface in `commit_turn`'s future and in `flush`; after a
        failure, saves of the same turn raise its error until `commit_turn` or `abort_turn`.
        """
        self._turns.save_layer(sid, layer, kv_new, start)

    def commit_turn(self, sid: str, token_ids) -> cf.Future:
        """Publish the turn: every layer saved up to ``len(token_ids)``; manifest written last.

        Returns a future that resolves (to the turn number) once the manifest is durable. On failure it
        raises `DiskFull` (a full disk) or `TurnFailed` with a one-line message, the session goes back
        to its last durable turn (later turns already committed in memory fail too), and `flush`
        raises the same error. The session is readable at once (read-your-writes).
        """
        return self._turns.commit_turn(sid, token_ids)

    def abort_turn(self, sid: str) -> None:
        """Give up the turn being saved (the saves since the last `commit_turn`): the session stays at its
        last committed turn, in memory and on disk; queued saves of the turn do nothing; a session
        whose first turn is aborted is forgotten. Also clears a turn that failed. No-op otherwise."""
        self._turns.abort_turn(sid)

    # ================================================================ the history (ranges.py)
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
        return self._dropper.drop_range(sid, start, stop)

    def truncate_front(self, sid: str, n_drop: int) -> cf.Future:
        """Drop the oldest ``n_drop`` tokens; the rest stays bit-identical. Returns a future (manifest);
        if that fails the session goes back to its last durable state (like a failed turn).
        The same as ``drop_range(sid, 0, n_drop)``."""
        return self._dropper.truncate_front(sid, n_drop)

    # ================================================================ reads (reads.py)
    def load_layer(self, sid: str, layer: int, pad_to: int | None = None) -> jax.Array:
        """``[2, pad_to or num_tokens, K, D]`` on the device; rows >= num_tokens are zeros.

        From the device or host tier the transfer is dispatched asynchronously. From disk, the first
        load starts a background promotion that reads every layer concurrently and verifies them in
        order; a load waits for its own layer only, and raises `KVLost` at the first layer whose
        checksum fails (layers verified before it were correct).
        """
        return self._reader.load_layer(sid, layer, pad_to)

    def layer_blocks(self, sid: str, layer: int) -> tuple[tuple[jax.Array, ...], int, int, str]:
        """``(blocks, offset, num_tokens, tier)``: the blocks ``[2, B, K, D]`` that hold ``layer``,
        where they are (``device`` or ``pinned_host`` memory for "host"/"disk"), the row of the first
        kept token in their concatenation, and the token count — for a jitted program that moves
        host blocks to the device itself (``store.assemble_blocks`` pads them). Waits like
        `load_layer` (own layer only); the device tier is not filled by this path."""
        return self._reader.layer_blocks(sid, layer)

    def prefetch(self, sid: str) -> cf.Future:
        """Start reading the session disk -> host; returns a future at once."""
        return self._reader.prefetch(sid)

    # ================================================================ eviction and deletion (lifecycle.py)
    def evict(self, sid: str, tier: str) -> None:
        """"device": drop the device copy (to host); "host": drop the host copy (disk keeps it);
        "disk": delete the session everywhere. Waits for the session's work in flight first; a session
        that started a new turn meanwhile keeps its host copy."""
        self._life.evict(sid, tier)

    def delete(self, sid: str) -> None:
        """Remove the session from every tier (its files too, before this returns)."""
        self._life.delete(sid)

    # ================================================================ the whole store
    def flush(self) -> None:
        """Wait for every save, commit and prefetch in flight; raise the first error of a turn that failed
        since the last flush (each commit's future also carries its own error)."""
        core = self._core
        with core.lock:
            sessions = list(core.sessions.values())
            gates = list(core.gates.values())
        for s in sessions:
            self._life.settle(s)
            with core.lock:
                pf = s.prefetch
            if pf is not None:
                try:
                    pf.result()
                except BaseException:  # noqa: BLE001 - a prefetch is a hint; its load reports
                    pass
        with core.lock:
            ios = list(self._reader.io_futs)
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
                held["disk"] += core.disk_bytes(s.disk_blocks - s.disk_lo)
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
            self._reader.io.shutdown(wait=True)
            self._wb.shutdown()
            if self._rootlock is not None:
                self._rootlock.release()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tier_of(s: Session) -> str | None:
    if not s.kv_valid:
        return None
    if s.device is not None:  # a device copy (blocks a save touched may be in transfer: loads then use host)
        return "device"
    if s.host is not None:
        return "host"
    return "disk"
