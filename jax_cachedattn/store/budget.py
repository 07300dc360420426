"""Byte budgets of the tiers, and reservations that cannot leak.

``budget.take(n)`` (under the store's lock, after checking ``fits``) returns a `Reservation`: a handle
on ``n`` bytes of the tier. Every path gives the bytes back: a handle used as a context manager
releases what is left in it when the block exits, error or not, and bytes move between handles
(``owner.absorb(r)``) without touching the tier's total. A session holds one handle per tier for the
blocks its tables hold; work in flight holds its own until it publishes or gives up.
"""

from __future__ import annotations

import threading


class Budget:
    def __init__(self, tier: str, limit: int | None, lock: threading.RLock):
        self.tier, self.limit, self.used = tier, limit, 0
        self._lock = lock

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self.used + nbytes <= self.limit

    def take(self, nbytes: int) -> "Reservation":
        """Reserve ``nbytes`` (the caller checked `fits`, or the budget is advisory: recovery)."""
        with self._lock:
            self.used += nbytes
        return Reservation(self, nbytes)

    def empty(self) -> "Reservation":
        return Reservation(self, 0)


class Reservation:
    __slots__ = ("budget", "nbytes")

    def __init__(self, budget: Budget, nbytes: int):
        self.budget, self.nbytes = budget, nbytes

    def release(self, nbytes: int | None = None) -> None:
        """Give back ``nbytes`` (all by default) to the tier."""
        with self.budget._lock:
            n = self.nbytes if nbytes is None else nbytes
            if not 0 <= n <= self.nbytes:
                raise AssertionError(f"releasing {n} of a {self.nbytes}-byte reservation of {self.budget.tier}")
            self.nbytes -= n
            self.budget.used -= n

    def absorb(self, other: "Reservation", nbytes: int | None = None) -> None:
        """Move ``nbytes`` (all by default) of ``other`` into this handle; the tier's total is unchanged."""
        if other.budget is not self.budget:
            raise AssertionError("reservations of different tiers")
        with self.budget._lock:
            n = other.nbytes if nbytes is None else nbytes
            if not 0 <= n <= other.nbytes:
                raise AssertionError(f"moving {n} of a {other.nbytes}-byte reservation")
            other.nbytes -= n
            self.nbytes += n

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({self.budget.tier}, {self.nbytes})"
