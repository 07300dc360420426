"""The engine side of ``real`` mode: the scheduler's view of a real `TieredStore` (`StoreAdapter`)
and the executor that runs a job through `Engine.turn` (`RealExecutor`).

How the systems map onto the engine: ``recompute`` runs with ``use_cache=False``; ``sync-load``
with ``preload="upfront"``; ``sync-save`` waits for the store to flush after every turn (counted in
the job's time); ``device-prefix`` keeps KV only within the device budget (a session whose KV fell
out of it is recomputed from its token ids: its store entry is dropped and the whole context is sent
again); ``naive-truncation`` does the same when the context overflows (post-RoPE keys cannot be
truncated). ``cost``: replace the measured times by a cost model's (tests use it to compare the two
modes' decisions).

``replies`` (the config's ``workload.feed_replies``): a turn decodes only ``gen_tokens`` tokens (its
TTFT is what is measured), then the turn's recorded reply goes into the history with `Engine.append`
(prefill + save + commit, no decode) on the caching engine, in every system alike (recompute's own
turns still recompute everything): the history the next turn meets is prompt + decoded tokens +
recorded reply, as a live server's would be after decoding that reply. The append's time is added to
the job's service time (it stands for the reply's decode, which it undercuts), never to its TTFT.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from jax_cachedattn.model import TRACE_COUNTS
from jax_cachedattn.scheduler import Job

from .driver import Outcome
from .systems import System


class StoreAdapter:
    """The scheduler's `StoreView` over a real `TieredStore`; with ``engine``, the engine's page pool
    (``EngineConfig.keep_pages``: a finished turn's pages kept as the session's device copy) is the
    device tier: the engine's prefill reads host blocks inside its programs (``in_program``), a path
    that never fills the store's own device tier, so a store device budget would hold nothing."""

    def __init__(self, store, engine=None):
        self.store = store
        self.pool = engine.pool if engine is not None and engine.config.keep_pages else None
        self.running: set[str] = set()
        self.inflight: dict[str, object] = {}  # sid -> the future of a prefetch issued by the scheduler
        # the scheduler's prefetches: issued; landed before their session's job started; not yet landed then
        self.issued = self.in_time = self.late = 0
        self._pending: dict[str, object] = {}  # sid -> the future of its latest prefetch, until its job starts
        self.now = 0.0  # the trace clock (RealExecutor.sync), when the scheduler plans
        self._issued_at: dict[str, float] = {}  # sid -> trace time its pending prefetch was issued
        lay = store.layout
        self._L, self._B, self._bb = lay.num_layers, store.cfg.token_block, store.block_bytes

    def _info(self, sid):
        try:
            return self.store.lookup(sid)
        except Exception:  # noqa: BLE001 - an id the store refuses is simply absent
            return None

    def tier_of(self, sid):
        info = self._info(sid)
        if info is None or info.num_tokens == 0:
            return None
        if self.pool is not None and self.pool.holds(sid, info.turn, info.num_tokens):
            return "device"
        return info.tier

    def kv_bytes(self, sid):
        info = self._info(sid)
        return 0 if info is None else self._L * -(-info.num_tokens // self._B) * self._bb

    def capacity(self, tier):
        if tier == "device" and self.pool is not None:
            return self.pool.capacity_bytes
        return self.store.budget[tier]

    def used(self, tier):
        if tier == "device" and self.pool is not None:
            return self.pool.used_bytes()
        return self.store.usage()[tier]

    def sessions_in(self, tier):
        want = {"device": ("device",), "host": ("device", "host"), "disk": ("device", "host", "disk")}[tier]
        return [s for s in self.store.sessions() if self.tier_of(s) in want]

    def mean_kv_bytes(self):
        sizes = [self.kv_bytes(s) for s in self.store.sessions()]
        sizes = [b for b in sizes if b]
        return int(sum(sizes) / len(sizes)) if sizes else 0

    def prefetch(self, sid):
        self.inflight = {s: f for s, f in self.inflight.items() if not f.done()}
        fut = self.store.prefetch(sid)
        self.inflight[sid] = fut
        if sid not in self._pending:
            self.issued += 1
            self._issued_at[sid] = self.now
        self._pending[sid] = fut

    def wait_prefetch(self, sid: str, now: float, whole: bool = False) -> None:
        """A job of ``sid`` starts at trace time ``now``: its pending prefetch gets, in real time, the
        trace time that passed since it was issued (``whole``: as long as it takes). The engine runs one
        job at a time, synchronously: a prefetch issued while a job "ran" in trace time starts in real
        time only when that job has returned, so without this wait it would never have the time the
        running job gives it on a live server (as `wait_prefetches` does for idle gaps). The wait is
        neither TTFT nor service time."""
        fut = self._pending.get(sid)
        if fut is None or fut.done():
            return
        import concurrent.futures as cf

        budget = None if whole else max(0.0, now - self._issued_at.get(sid, now))
        if budget is None or budget > 0:
            cf.wait([fut], timeout=budget)

    def job_starts(self, sid) -> None:
        """A job of ``sid`` starts: count its session's pending prefetch as in time or late."""
        fut = self._pending.pop(sid, None)
        self._issued_at.pop(sid, None)
        if fut is not None:
            if fut.done():
                self.in_time += 1
            else:
                self.late += 1

    def evict(self, sid, tier):
        if self.pool is not None and tier in ("device", "disk"):
            self.pool.drop(sid)
        self.store.evict(sid, tier)

    def busy(self, sid):
        f = self.inflight.get(sid)
        return sid in self.running or (f is not None and not f.done())

    def wait_prefetches(self, timeout_s: float) -> None:
        pending = [f for f in self.inflight.values() if not f.done()]
        if pending and timeout_s > 0:
            import concurrent.futures as cf

            cf.wait(pending, timeout=timeout_s)


def _traced_since(before: dict) -> list[str]:
    """The programs (by name) traced since ``before`` (a copy of ``TRACE_COUNTS``)."""
    return sorted(k for k, v in TRACE_COUNTS.items() if v != before.get(k, 0))


class RealExecutor:
    def __init__(self, system: System, engine, recompute_engine, adapter: StoreAdapter, *, cost=None,
                 replies: dict | None = None, gen_tokens: int | None = None):
        self.system, self.engine, self.recompute_engine = system, engine, recompute_engine
        self.adapter, self.store = adapter, engine.store
        self.cost = cost  # clock="model": times from the cost model instead of the measurement
        self.replies = replies or {}  # (sid, turn) -> recorded reply ids (see the module docstring)
        self.gen_tokens = gen_tokens
        self.compiles: list[tuple] = []  # (sid, turn, programs traced by the turn, by its append)

    def _fresh_context(self, sid: str, job: Job) -> np.ndarray | None:
        """device-prefix / naive-truncation: the context to recompute as a new session, or None."""
        sys_ = self.system
        info = self.store.lookup(sid)
        if info is None:
            return None
        hist = np.asarray(info.token_ids, np.int32)
        mc = self.engine.model_config
        if sys_.device_only and info.tier == "disk":
            pass  # fell out of the device budget: nothing behind it
        elif sys_.naive_truncation and len(hist) + job.new_tokens + job.max_new_tokens + 2 > mc.max_context:
            keep = mc.max_context - job.new_tokens - job.max_new_tokens - 2
            drop = max(len(hist) - keep, math.ceil(self.engine.config.truncation_ratio * len(hist)))
            hist = hist[drop:]
        else:
            return None
        self.store.delete(sid)
        return hist

    def start(self, job: Job, now: float) -> Outcome:
        sid = job.sid
        self.adapter.wait_prefetch(sid, now, whole=self.cost is not None)
        self.adapter.job_starts(sid)
        self.adapter.running.add(sid)
        reply = self.replies.get((sid, job.turn))
        max_new = job.max_new_tokens if reply is None or self.gen_tokens is None else min(job.max_new_tokens,
                                                                                            self.gen_tokens)
        prompt = np.asarray(job.prompt_ids, np.int32)
        fresh = self._fresh_context(sid, job) if (self.system.device_only or self.system.naive_truncation) else None
        msg = prompt if fresh is None else np.concatenate([fresh, prompt])
        engine = self.engine if self.system.reuse else self.recompute_engine
        traced = dict(TRACE_COUNTS)
        r = engine.turn(sid, msg, max_new_tokens=max_new)
        compiled = _traced_since(traced)
        service = r.total_s
        traced = dict(TRACE_COUNTS)
        if reply is not None:
            t0 = time.perf_counter()
            self.engine.append(sid, np.asarray(reply, np.int32))
            # the append's page writes are dispatched, not waited for: wait here, or the next turn's
            # TTFT would pay for them
            jax.block_until_ready(self.engine.pool.pages)
            service += time.perf_counter() - t0
        # the append's compiles are service time only (the trace clock), never this turn's TTFT
        append_compiled = _traced_since(traced)
        if compiled or append_compiled:
            self.compiles.append((sid, job.turn, compiled, append_compiled))
        if self.system.sync_save:
            t0 = time.perf_counter()
            self.store.flush()
            service += time.perf_counter() - t0
        hist = r.history_tokens if fresh is None else len(fresh)
        source = r.source if fresh is None else ("recompute" if len(fresh) else "new")
        if self.system.device_only and source in ("host", "disk"):
            source = "device"  # device-prefix: the store's first tier stands for the device budget
        reused = r.reused_tokens
        info = self.store.lookup(sid)
        after = info.num_tokens if info is not None else hist + len(prompt) + r.generated_tokens
        ttft = r.ttft_s
        if self.cost is not None:
            tier = source if source in ("device", "host", "disk") else None
            ttft = (self.cost.ttft_s(len(prompt), reused, tier, reused * self.cost.bytes_per_token) if tier
                    else self.cost.prefill_s(hist + len(prompt), 0))
            service = ttft + self.cost.decode_s(r.generated_tokens)
            if reply is not None:
                service += self.cost.prefill_s(len(reply), 0)
        return Outcome(ttft, service, source, reused, hist, len(prompt), r.generated_tokens, r.truncated_tokens, after,
                       reused * self.store.layout.bytes_per_token, compiled=bool(compiled) and self.cost is None)

    def complete(self, job: Job, outcome: Outcome, now: float) -> None:
        self.adapter.running.discard(job.sid)
        if self.cost is not None:
            self.store.flush()  # a modelled clock: let async work settle, so the store's state is deterministic

    def sync(self, now: float) -> None:
        self.adapter.now = now

    def idle(self, gap_s: float) -> None:
        """The engine would idle ``gap_s`` seconds (the trace's think times are not slept): the store's
        prefetches get that long in real time to land, as they would on a live server."""
        if self.cost is not None:
            self.store.flush()
        else:
            self.adapter.wait_prefetches(gap_s)
