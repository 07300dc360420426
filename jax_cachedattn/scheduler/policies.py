"""Eviction policies behind the store's `EvictionPolicy` interface (touch / forget / choose_victims /
set_future), the same objects in a real `TieredStore(policy=...)` and in the simulator's store.

* ``cachedattn`` (:class:`QueueAwarePolicy`, the default): the scheduler passes the whole queue
  (``set_future``, soonest first) and the eviction window (``set_windows``). Victims, first to last:
  sessions with no queued job (least recently used first; with a short queue, latest predicted next
  turn first, see :mod:`.predictor`), then queued sessions beyond the eviction window, then the
  window's own sessions, furthest in the queue first. A session inside the window is never chosen
  while another candidate exists.
* ``lru``, ``fifo`` (first stored in the tier, first out), ``lfu`` (fewest uses; LRU among equals):
  the queue is ignored.
* ``belady``: the whole future known (a simulation's oracle ``next_use(sid)``): furthest next use
  first, never-used-again first of all. The bound.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from jax_cachedattn.store.policy import EvictionPolicy

from .predictor import NextTurnPredictor

POLICIES = ("cachedattn", "lru", "fifo", "lfu", "belady")


class _Bookkeeping(EvictionPolicy):
    """Last use, first use and use counts per (session, tier), under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clock = itertools.count()
        self._last: dict[str, dict[str, int]] = {}  # sid -> tier -> logical time of the last use
        self._first: dict[str, dict[str, int]] = {}  # sid -> tier -> logical time of the first use
        self._uses: dict[str, int] = {}
        self.now = 0.0  # trace time, set by the scheduler

    def touch(self, sid: str, tier: str) -> None:
        with self._lock:
            t = next(self._clock)
            self._last.setdefault(sid, {})[tier] = t
            self._first.setdefault(sid, {}).setdefault(tier, t)

    def forget(self, sid: str, tier: str | None = None) -> None:
        with self._lock:
            for d in (self._last, self._first):
                if tier is None:
                    d.pop(sid, None)
                elif sid in d:
                    d[sid].pop(tier, None)
            if tier is None:
                self._uses.pop(sid, None)

    def last(self, sid: str, tier: str) -> int:
        return self._last.get(sid, {}).get(tier, -1)

    def used(self, sid: str) -> None:
        """One use of ``sid`` (a job started): what LFU counts (the store's per-layer touches are not)."""
        with self._lock:
            self._uses[sid] = self._uses.get(sid, 0) + 1

    # hooks the scheduler calls on every policy; policies that ignore them keep these no-ops
    def set_windows(self, prefetch: int, eviction: int, horizon_s: dict | None = None) -> None:
        pass

    def arrived(self, sid: str, now: float) -> None:
        pass

    def finished(self, sid: str, now: float) -> None:
        pass

    def choose_victims(self, candidates: Iterable[str], tier: str) -> list[str]:
        with self._lock:
            return sorted(candidates, key=self._keyfn(tier))

    def _keyfn(self, tier: str):
        return lambda sid: self._key(sid, tier)

    def _key(self, sid: str, tier: str):
        raise NotImplementedError


class LRU(_Bookkeeping):
    name = "lru"

    def _key(self, sid, tier):
        return self.last(sid, tier)

    def _keyfn(self, tier):
        last, empty = self._last.get, {}
        return lambda sid: last(sid, empty).get(tier, -1)


class FIFO(_Bookkeeping):
    name = "fifo"

    def _key(self, sid, tier):
        return self._first.get(sid, {}).get(tier, -1)


class LFU(_Bookkeeping):
    name = "lfu"

    def _key(self, sid, tier):
        return (self._uses.get(sid, 0), self.last(sid, tier))


class Belady(_Bookkeeping):
    """Furthest next use first; ``next_use(sid)`` (trace time, ``inf`` for never) is the oracle."""

    name = "belady"

    def __init__(self, next_use: Callable[[str], float] | None = None) -> None:
        super().__init__()
        self.next_use = next_use

    def _key(self, sid, tier):
        if self.next_use is None:
            raise RuntimeError("the belady policy needs an oracle: set policy.next_use")
        return (-self.next_use(sid), self.last(sid, tier))


class QueueAwarePolicy(_Bookkeeping):
    """CachedAttention's scheduler-aware eviction; see the module docstring.

    predict: ``"short-queue"`` (default) ranks the sessions with no queued job by predicted next-turn
    time when the queue holds fewer jobs than the eviction window, LRU otherwise (the paper);
    ``"always"`` and ``"never"`` for comparison. predict_tiers: the tiers where that ranking applies;
    on disk (where an eviction deletes the session) the idle sessions go least recently used first:
    on the paper trace every horizon tried for the disk ranking lost to LRU there (docs/benchmarks.md).
    """

    name = "cachedattn"

    def __init__(self, predict: str = "short-queue", predictor: NextTurnPredictor | None = None,
                 predict_tiers: tuple[str, ...] = ("device", "host")) -> None:
        super().__init__()
        self.predict_tiers = tuple(predict_tiers)
        if predict not in ("short-queue", "always", "never"):
            raise ValueError(f"predict must be 'short-queue', 'always' or 'never', got {predict!r}")
        self.predict = predict
        self.predictor = predictor or NextTurnPredictor()
        self._pos: dict[str, int] = {}
        self._evict_window = 0
        self._queue_len = 0
        self.horizon_s = {"device": 30.0, "host": 30.0, "disk": 300.0}

    def set_future(self, order: Sequence[str]) -> None:
        with self._lock:
            self._pos = {}
            for i, sid in enumerate(order):
                self._pos.setdefault(sid, i)
            self._queue_len = len(order)

    def set_windows(self, prefetch: int, eviction: int, horizon_s: dict | None = None) -> None:
        """Window sizes in jobs; ``horizon_s[tier]``: about how long a session kept in that tier stays
        there (the tier's window over the job rate), the horizon the short-queue ranking uses."""
        with self._lock:
            self._evict_window = max(0, int(eviction))
            if horizon_s:
                self.horizon_s.update(horizon_s)

    def arrived(self, sid: str, now: float) -> None:
        self.predictor.arrived(sid, now)

    def finished(self, sid: str, now: float) -> None:
        self.predictor.finished(sid, now)

    def _use_prediction(self) -> bool:
        if self.predict == "never" or not self.predictor.ready:
            return False
        return self.predict == "always" or self._queue_len < self._evict_window

    def predicting(self) -> bool:
        """Whether sessions with no queued job are ranked by predicted next turn now (the scheduler's
        predicted prefetch follows the same switch)."""
        with self._lock:
            return self._use_prediction()

    def choose_victims(self, candidates: Iterable[str], tier: str) -> list[str]:
        cands = list(candidates)
        if not cands:
            return []
        with self._lock:
            predict = tier in self.predict_tiers and self._use_prediction()
            pos, w = self._pos, self._evict_window
            p = np.fromiter((pos.get(sid, -1) for sid in cands), np.int64, len(cands))
            last = np.fromiter((self.last(sid, tier) for sid in cands), np.int64, len(cands))
            idle = p < 0
            score = np.full(len(cands), -np.inf)
            if predict and idle.any():
                self.predictor.update_ended(self.now)
                ids = [sid for sid, i in zip(cands, idle) if i]
                probs = self.predictor.return_probs(ids, self.now, self.horizon_s.get(tier, self.horizon_s["host"]))
                score[idle] = np.where(np.isnan(probs), -np.inf, probs)
            # classes: 0 no queued job (least likely back soon first, then LRU), 1 queued beyond the
            # eviction window (furthest first), 2 in the window (its tail first)
            cls = np.where(idle, 0, np.where(p >= w, 1, 2))
            second = np.where(idle, score, -p.astype(float))
            order = np.lexsort((np.where(idle, last, 0), second, cls))
            return [cands[i] for i in order]


def make_policy(name: str, **kw) -> _Bookkeeping:
    """A fresh policy by name (one of POLICIES)."""
    if name == "cachedattn":
        return QueueAwarePolicy(**kw)
    if name == "lru":
        return LRU()
    if name == "fifo":
        return FIFO()
    if name == "lfu":
        return LFU()
    if name == "belady":
        return Belady(**kw)
    raise ValueError(f"unknown policy {name!r}; expected one of {POLICIES}")
