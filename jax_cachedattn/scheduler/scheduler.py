"""The scheduler: a job queue in front of the engine that tells the KV store what comes next.

The engine (real or simulated) asks `Scheduler.next_job(now)` for work. Before handing out the head
of the queue the scheduler plans (`plan`):

* **look-ahead prefetch window** ``L_pw = C_mem / S_kv`` jobs (host capacity over the mean session KV
  size, recomputed at every plan as sessions grow; also cut where the window's distinct sessions stop
  fitting in the host tier): every session in it whose KV is only on disk is prefetched disk -> host,
  so the job finds it in memory when it starts (the head job excepted when it starts now: the engine
  reads its KV layer by layer behind compute). The engine plans when it takes a job (`next_job`) and
  whenever jobs wait with every slot busy (`waiting`: a job arrived behind a running one; prefetch
  only, the watermark runs at the next hand-out); there the head waits too and is prefetched like the rest. Without that second call a closed-loop trace whose
  queue rarely holds two jobs never prefetched at all: its one waiting job was always the head when
  the plan ran, so it was read from disk on the critical path;
* **look-ahead eviction window** ``(C_mem + C_disk) / S_kv`` jobs: the policy gets the queue order
  (``set_future``) and the window (``set_windows``) and evicts from host to disk first the sessions
  with no queued job, then the window's tail; from disk the sessions outside the window, furthest
  next use first (:mod:`.policies`);
* **high watermark**: when the host tier is fuller than ``high_watermark`` of its capacity, host copies
  of sessions outside the prefetch window are dropped (the disk keeps them: saves write through), in
  the policy's order, down to ``low_watermark``, so a prefetch finds room without waiting;
* **predicted prefetch** (beyond the paper, for short queues): when the queue holds fewer jobs than the
  prefetch window and the policy predicts next turns (`QueueAwarePolicy.predicting`), the window's
  empty places go to sessions with no queued job whose KV is only on disk, most likely to send their
  next turn within the host horizon first (:mod:`.predictor`). One is read into free host room (below
  ``low_watermark``) or in place of an idle host session whose chance is lower by ``swap_margin``; at
  most ``max_predicted_inflight`` such reads at once. It runs at every plan and whenever an engine
  slot idles (`idle`), so a session can be back in memory before its turn is even queued.

The store is reached through the small `StoreView` protocol; `jax_cachedattn.bench` adapts both the
real `TieredStore` and the simulator's store to it, so both modes run this code. Every decision is
appended to ``decisions`` (for tests and for comparing modes).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Protocol

from .queue import Job, JobQueue


class StoreView(Protocol):
    """What the scheduler needs from a store (real or simulated)."""

    def tier_of(self, sid: str) -> str | None: ...  # "device" | "host" | "disk" | None (absent)

    def kv_bytes(self, sid: str) -> int: ...  # bytes the session's KV takes in a tier (0 when absent)

    def capacity(self, tier: str) -> int | None: ...  # budget in bytes (None: unlimited)

    def used(self, tier: str) -> int: ...

    def sessions_in(self, tier: str) -> list[str]: ...

    def mean_kv_bytes(self) -> int: ...  # mean KV bytes of the sessions held (0 when none)

    def prefetch(self, sid: str) -> None: ...  # start disk -> host, return at once

    def evict(self, sid: str, tier: str) -> None: ...

    def busy(self, sid: str) -> bool: ...  # running or in flight: may not be evicted now


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """prefetch: issue disk -> host prefetches for the prefetch window (off for the no-prefetch
    ablation). high_watermark / low_watermark: fractions of the host capacity between which eviction
    runs ahead of need (``high_watermark`` 1.0 turns it off). max_prefetch_window: an upper bound on
    ``L_pw`` (None: none). min_session_bytes: ``S_kv`` before any session is known.
    predicted_prefetch: prefetch idle sessions by predicted next turn when the queue is short (only
    with a policy that predicts); swap_margin: how much likelier a disk session must be than an idle
    host session it replaces; min_predicted_prob: below this chance nothing is read ahead;
    max_predicted_inflight: predicted reads in flight at once; predicted_candidates: the most
    recently finished idle sessions considered; predict_interval_s: trace seconds between two such
    read-ahead passes."""

    prefetch: bool = True
    high_watermark: float = 0.9
    low_watermark: float = 0.8
    max_prefetch_window: int | None = None
    min_session_bytes: int = 1
    predicted_prefetch: bool = True
    swap_margin: float = 0.05
    min_predicted_prob: float = 0.1
    max_predicted_inflight: int = 2
    predicted_candidates: int = 128
    predict_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError("need 0 < low_watermark <= high_watermark <= 1")


class Scheduler:
    """Queue + windows + hints; see the module docstring. ``policy`` is the store's policy object."""

    def __init__(self, store: StoreView, policy, config: SchedulerConfig | None = None):
        self.store, self.policy = store, policy
        self.config = config or SchedulerConfig()
        self.queue = JobQueue()
        self.decisions: list[tuple] = []
        self.prefetch_window = 0
        self.eviction_window = 0
        self._prefetched: set[str] = set()
        self._predicted: set[str] = set()
        self._last_predict = -math.inf
        self._arrivals: collections.deque[float] = collections.deque(maxlen=256)

    # ---- the engine's side ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """A turn arrives (``job.arrival_s`` is the trace time)."""
        self.queue.push(job)
        self._arrivals.append(job.arrival_s)
        self.policy.arrived(job.sid, job.arrival_s)

    def next_job(self, now: float) -> Job | None:
        """Plan, then hand out the head of the queue (None when empty)."""
        if not len(self.queue):
            return None
        self.plan(now)
        job = self.queue.pop()
        self.policy.used(job.sid)
        self._prefetched.discard(job.sid)
        self.decisions.append(("start", job.sid, job.turn))
        return job  # the policy's future still lists it first: it is busy, never a candidate

    def waiting(self, now: float) -> None:
        """Every engine slot is busy and jobs wait at ``now`` (one just arrived): plan for them. No job
        starts now, so the head's KV is prefetched too (it has the running jobs' time to land)."""
        if len(self.queue):
            self.plan(now, head_starts=False, evict=False)

    def finished(self, job: Job, now: float) -> None:
        """The job's reply is out at ``now`` (its KV is saved)."""
        self.policy.finished(job.sid, now)

    # ---- planning ------------------------------------------------------------------------------
    def mean_session_bytes(self) -> int:
        return max(self.config.min_session_bytes, int(self.store.mean_kv_bytes()))

    def windows(self) -> tuple[int, int]:
        """``(L_pw, L_ew)`` in jobs from the current capacities and mean session size."""
        s_kv = self.mean_session_bytes()
        c_mem = self.store.capacity("host") or 0
        c_disk = self.store.capacity("disk")
        l_pw = c_mem // s_kv
        if self.config.max_prefetch_window is not None:
            l_pw = min(l_pw, self.config.max_prefetch_window)
        l_ew = math.inf if c_disk is None else (c_mem + c_disk) // s_kv
        return int(l_pw), (len(self.queue) + 1 if l_ew == math.inf else int(l_ew))

    def horizon_s(self, jobs: int) -> float | None:
        """Trace seconds that ``jobs`` jobs take to arrive at the recent arrival rate (None: unknown)."""
        a = self._arrivals
        if len(a) < 2 or a[-1] <= a[0]:
            return None
        return max(1, jobs) * (a[-1] - a[0]) / (len(a) - 1)

    def plan(self, now: float, head_starts: bool = True, evict: bool = True) -> None:
        """Recompute the windows, hand the queue to the policy, prefetch, evict above the watermark.
        ``head_starts``: the head job is handed out right after (its KV is then not prefetched).
        ``evict=False`` (`waiting`): prefetch only; the watermark and the predicted read-ahead wait for
        the next hand-out, when the running jobs' KV is saved (a prefetch that needs room makes it
        through the store, which asks the same policy, queue-aware)."""
        self.policy.now = now
        l_pw, l_ew = self.windows()
        self.prefetch_window, self.eviction_window = l_pw, l_ew
        h_mem, h_all = self.horizon_s(l_pw), self.horizon_s(l_ew)
        self.policy.set_windows(l_pw, l_ew, None if h_mem is None else {"device": h_mem, "host": h_mem, "disk": h_all})
        self.policy.set_future(self.queue.sessions())
        # a prefetch that landed, or whose session left the disk tier, is done with; one that landed and
        # was pushed back to disk since (a running job's save made room) is issued again
        self._prefetched = {s for s in self._prefetched if self.store.tier_of(s) == "disk" and self.store.busy(s)}
        # the prefetch window: the head's distinct sessions while they fit in the host tier
        window, room = {}, self.store.capacity("host") or 0
        for job in self.queue.peek(l_pw):
            if job.sid in window:
                continue
            need = self.store.kv_bytes(job.sid)
            if need > room:
                break
            room -= need
            window[job.sid] = None
        if evict:
            self._watermark(set(window))
        if self.config.prefetch:
            head = self.queue.peek(1)[0].sid if len(self.queue) and head_starts else None
            for sid in window:
                if sid == head:
                    continue  # starts now: the engine reads it layer by layer behind compute
                if self.store.tier_of(sid) == "disk" and sid not in self._prefetched and not self.store.busy(sid):
                    self.store.prefetch(sid)
                    self._prefetched.add(sid)
                    self.decisions.append(("prefetch", sid))
        if evict and len(self.queue) < l_pw:
            self._predicted_prefetch(now, set(window), h_mem)

    def idle(self, now: float) -> None:
        """An engine slot is free and the queue is empty at ``now``: read ahead what is predicted."""
        if len(self.queue) or not self._predicts():
            return
        self.policy.now = now
        self.policy.set_future([])
        self._prefetched = {s for s in self._prefetched if self.store.tier_of(s) == "disk"}
        self._predicted_prefetch(now, set(), self.horizon_s(self.prefetch_window))

    def _predicts(self) -> bool:
        cfg = self.config
        return cfg.prefetch and cfg.predicted_prefetch and bool(getattr(self.policy, "predicting", lambda: False)())

    def _predicted_prefetch(self, now: float, keep: set[str], horizon: float | None) -> None:
        """See the module docstring (predicted prefetch)."""
        cfg, store = self.config, self.store
        cap = store.capacity("host")
        if not cap or horizon is None or now - self._last_predict < cfg.predict_interval_s or not self._predicts():
            return
        self._last_predict = now
        self._predicted = {s for s in self._predicted if store.busy(s) and store.tier_of(s) in ("host", "disk")}
        room_for = cfg.max_predicted_inflight - len(self._predicted)
        if room_for <= 0:
            return
        pred = self.policy.predictor
        queued = set(self.queue.sessions())
        cands = [s for s in pred.recent_idle(cfg.predicted_candidates)
                 if s not in queued and s not in self._prefetched and store.tier_of(s) == "disk" and not store.busy(s)]
        if not cands:
            return
        p = pred.return_probs(cands, now, horizon)
        order = [i for i in sorted(range(len(cands)), key=lambda i: -p[i]) if p[i] >= cfg.min_predicted_prob]
        if not order:
            return
        victims = None
        for i in order[:room_for]:
            sid, need = cands[i], store.kv_bytes(cands[i])
            free = int(cfg.low_watermark * cap) - store.used("host")
            if free < need:
                if victims is None:  # idle host sessions, least likely back first
                    hs = [s for s in store.sessions_in("host") if s not in queued and s not in keep
                          and s not in self._predicted and not store.busy(s) and store.tier_of(s) == "host"]
                    hp = pred.return_probs(hs, now, horizon)
                    victims = sorted(((x, s) for x, s in zip(hp, hs) if not math.isnan(x)), reverse=True)
                chosen = []
                while free < need and victims and victims[-1][0] + cfg.swap_margin <= p[i]:
                    pv, v = victims.pop()
                    chosen.append(v)
                    free += store.kv_bytes(v)
                if free < need:
                    break  # nothing likely enough to give way: stop (the rest are less likely still)
                for v in chosen:
                    store.evict(v, "host")
                    self.decisions.append(("evict", v, "host"))
            store.prefetch(sid)
            self._predicted.add(sid)
            self.decisions.append(("predict-prefetch", sid))

    def _watermark(self, keep: set[str]) -> None:
        cap = self.store.capacity("host")
        cfg = self.config
        if not cap or cfg.high_watermark >= 1.0 or self.store.used("host") <= cfg.high_watermark * cap:
            return
        cands = [s for s in self.store.sessions_in("host") if s not in keep and not self.store.busy(s)]
        for sid in self.policy.choose_victims(cands, "host"):
            if self.store.used("host") <= cfg.low_watermark * cap:
                break
            self.store.evict(sid, "host")
            self._prefetched.discard(sid)
            self.decisions.append(("evict", sid, "host"))
