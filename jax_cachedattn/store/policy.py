"""Eviction policies: which sessions leave a tier first.

The store asks ``policy.choose_victims(candidates, tier)`` for an ordering of the sessions that may
leave ``tier`` and takes victims from the front until the new data fits. It tells the policy about
uses through ``touch`` and about deletions through ``forget``. A scheduler passes its look-ahead
window with ``set_future(order)``: the listed sessions come next, in that order.

Rules every policy here follows: a session in the future window is never chosen while a session
outside it is a candidate; among window sessions, the one used furthest in the future goes first
(Belady's rule over the window); outside the window, least recently used first.
"""

from __future__ import annotations

import abc
import itertools
import threading
from typing import Iterable, Sequence


class EvictionPolicy(abc.ABC):
    """Interface the store calls; implementations must be thread-safe."""

    @abc.abstractmethod
    def touch(self, sid: str, tier: str) -> None:
        """``sid`` was used (saved, loaded, promoted) in ``tier``."""

    @abc.abstractmethod
    def forget(self, sid: str, tier: str | None = None) -> None:
        """``sid`` left ``tier`` (every tier when ``tier`` is None)."""

    @abc.abstractmethod
    def choose_victims(self, candidates: Iterable[str], tier: str) -> list[str]:
        """Return ``candidates`` ordered best victim first (all of them, no filtering)."""

    def set_future(self, order: Sequence[str]) -> None:
        """Next-use hints: ``order`` lists the sessions needed soon, soonest first."""


class LRUPolicy(EvictionPolicy):
    """Least recently used, overridden by the future window set with `set_future`.

    With an empty window this is plain LRU; with the full future of a trace it is Belady's optimum.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self._last: dict[tuple[str, str], int] = {}
        self._future: dict[str, int] = {}

    def touch(self, sid: str, tier: str) -> None:
        with self._lock:
            self._last[(sid, tier)] = next(self._clock)

    def forget(self, sid: str, tier: str | None = None) -> None:
        with self._lock:
            for key in [k for k in self._last if k[0] == sid and (tier is None or k[1] == tier)]:
                del self._last[key]

    def set_future(self, order: Sequence[str]) -> None:
        with self._lock:
            self._future = {}
            for i, sid in enumerate(order):
                self._future.setdefault(sid, i)

    @property
    def future(self) -> dict[str, int]:
        with self._lock:
            return dict(self._future)

    def choose_victims(self, candidates: Iterable[str], tier: str) -> list[str]:
        with self._lock:
            fut, last = self._future, self._last

            def key(sid: str) -> tuple[int, int]:
                if sid in fut:  # in the window: after every outsider, furthest next use first
                    return (1, -fut[sid])
                return (0, last.get((sid, tier), -1))  # outsiders: least recently used first

            return sorted(candidates, key=key)
