"""Host and device block tables, their accounting, and eviction to make room in a tier.

A `BlockTable` holds, per layer, the session's token blocks ``[2, B, K, D]`` indexed by absolute
block number (None: not held, e.g. dropped by front truncation). The bytes of the blocks a table
holds are exactly its session's reservation for that tier (``s.held[tier]``): every change to a table
goes with the matching `Reservation` move, here and nowhere else.
"""

from __future__ import annotations

from typing import Any

from .budget import Reservation
from .core import Core, ceil_div
from .errors import BudgetError, DiskFull
from .session import Session


class BlockTable:
    def __init__(self, num_layers: int):
        self.layers: list[list[Any]] = [[] for _ in range(num_layers)]

    def count(self) -> int:
        return sum(1 for bl in self.layers for b in bl if b is not None)

    def get(self, layer: int, f: int, nb: int) -> list | None:
        bl = self.layers[layer]
        if nb > len(bl) or any(b is None for b in bl[f:nb]):
            return None
        return bl[f:nb]

    def block(self, layer: int, b: int):
        bl = self.layers[layer]
        return bl[b] if b < len(bl) else None

    def put(self, layer: int, b: int, arr) -> int:
        """Set block ``b``; returns 1 if the table holds one more block than before."""
        bl = self.layers[layer]
        while len(bl) <= b:
            bl.append(None)
        added = bl[b] is None
        bl[b] = arr
        return int(added)

    def covers(self, f: int, nb: int) -> bool:
        return all(self.get(layer, f, nb) is not None for layer in range(len(self.layers))) if nb > f else True

    def drop_front(self, f: int) -> int:
        n = 0
        for bl in self.layers:
            for b in range(min(f, len(bl))):
                if bl[b] is not None:
                    bl[b] = None
                    n += 1
        return n

    def drop_layer(self, layer: int) -> int:
        n = sum(1 for b in self.layers[layer] if b is not None)
        self.layers[layer] = []
        return n

    def trim(self, nb: int) -> int:
        n = 0
        for bl in self.layers:
            while len(bl) > nb:
                if bl.pop() is not None:
                    n += 1
        return n


class Memory:
    """Host/device tables of every session and the eviction that makes room (all under ``core.lock``)."""

    def __init__(self, core: Core):
        self.core = core

    # ---- tables and their reservations --------------------------------------------------------
    def table(self, s: Session, tier: str) -> BlockTable | None:
        return s.host if tier == "host" else s.device

    def ensure_table(self, s: Session, tier: str) -> BlockTable:
        t = self.table(s, tier)
        if t is None:
            t = BlockTable(self.core.L)
            if tier == "host":
                s.host = t
            else:
                s.device = t
        return t

    def put(self, s: Session, tier: str, layer: int, b: int, arr, res: Reservation) -> None:
        """Put a block, its bytes taken from ``res`` when the table grows."""
        if self.ensure_table(s, tier).put(layer, b, arr):
            s.held[tier].absorb(res, self.core.block_bytes)

    def free(self, s: Session, tier: str, nblocks: int) -> None:
        if nblocks:
            s.held[tier].release(nblocks * self.core.block_bytes)

    def drop(self, s: Session, tier: str) -> None:
        """Drop the session's copy in ``tier`` (host/device) and give its bytes back."""
        t = self.table(s, tier)
        if t is None:
            return
        if tier == "host":
            s.host = None
        else:
            s.device = None
        s.held[tier].release()
        self.core.policy.forget(s.sid, tier)

    def trim(self, s: Session, nb: int) -> None:
        """Drop blocks >= ``nb`` from both memory tiers."""
        for tier in ("host", "device"):
            t = self.table(s, tier)
            if t is not None:
                self.free(s, tier, t.trim(nb))

    def drop_front(self, s: Session, f: int) -> None:
        for tier in ("host", "device"):
            t = self.table(s, tier)
            if t is not None:
                self.free(s, tier, t.drop_front(f))

    def span(self, s: Session) -> tuple[int, int]:
        """Blocks [f, nb) that hold the committed history."""
        return s.offset // self.core.B, ceil_div(s.end, self.core.B)

    def holds(self, s: Session, tier: str) -> bool:
        if tier == "disk":
            return s.disk_blocks > 0 or s.durable is not None
        t = self.table(s, tier)
        return t is not None and t.covers(*self.span(s))

    # ---- making room ----------------------------------------------------------------------------
    def make_room(self, tier: str, nbytes: int, owner: Session, evict_disk, *, required: bool) -> Reservation | None:
        """Reserve ``nbytes`` in ``tier``, evicting idle sessions the policy ranks first. Under the lock.

        Returns the reservation, or None when it does not fit and ``required`` is False; raises
        `BudgetError` / `DiskFull` when required. Disk eviction deletes a session (``evict_disk``)."""
        core = self.core
        bud = core.budgets[tier]
        if bud.fits(nbytes):
            return bud.take(nbytes)
        err = DiskFull if tier == "disk" else BudgetError
        if owner.held[tier].nbytes + nbytes > bud.limit:
            if required:
                raise err(f"{'disk full: ' if tier == 'disk' else ''}session {owner.sid!r} needs "
                          f"{owner.held[tier].nbytes + nbytes} bytes, more than the {tier} budget ({bud.limit})")
            return None
        cands = [sid for sid, o in core.sessions.items()
                 if o is not owner and not o.busy() and (o.held[tier].nbytes > 0)]
        soon = (lambda: bud.limit is None or bud.used - core.freeing + nbytes <= bud.limit) if tier == "disk" else (
            lambda: bud.fits(nbytes))
        for sid in core.policy.choose_victims(cands, tier):
            if soon():
                break
            victim = core.sessions[sid]
            core.stats.add("evictions", tier=tier)
            if tier == "disk":
                evict_disk(victim)
            else:
                self.drop(victim, tier)
        if bud.fits(nbytes):
            return bud.take(nbytes)
        if required:
            raise err(f"{'disk full: ' if tier == 'disk' else ''}no room in the {tier} tier for {nbytes} more bytes "
                      f"of session {owner.sid!r} (budget {bud.limit}, used {bud.used}, nothing evictable now)")
        return None
