"""The engine side of ``real`` mode: the scheduler's view of a real `TieredStore` (`StoreAdapter`)
and the executor that runs a job through `Engine.turn` (`RealExecutor`).

How the systems map onto the engine: ``recompute`` runs with ``use_cache=False``; ``sync-load``
with ``preload="upfront"``; ``sync-save`` waits for the store to flush after every turn (counted in
the job's time); ``device-prefix`` keeps KV only within the device budget (a session whose KV fell
out of it is recomputed from its token ids: its store entry is dropped and the whole context is sent
again); ``naive-truncation`` does the same when the context overflows (post-RoPE keys cannot be
truncated). ``cost``: replace the measured times by a cost model's (tests use it to compare the two
modes' decisions).
"""

from __future__ import annotations

import math
import time

import numpy as np

from jax_cachedattn.model import TRACE_COUNTS
from jax_cachedattn.scheduler import Job

from .driver import Outcome
from .systems import System


class StoreAdapter:
    """The scheduler's `StoreView` over a real `TieredStore`."""

    def __init__(self, store):
        self.store = store
        self.running: set[str] = set()
        self.inflight: dict[str, object] = {}  # sid -> the future of a prefetch issued by the scheduler
        lay = store.layout
        self._L, self._B, self._bb = lay.num_layers, store.cfg.token_block, store.block_bytes

    def _info(self, sid):
        try:
            return self.store.lookup(sid)
        except Exception:  # noqa: BLE001 - an id the store refuses is simply absent
            return None

    def tier_of(self, sid):
        info = self._info(sid)
        return None if info is None or info.num_tokens == 0 else info.tier

    def kv_bytes(self, sid):
        info = self._info(sid)
        return 0 if info is None else self._L * -(-info.num_tokens // self._B) * self._bb

    def capacity(self, tier):
        return self.store.budget[tier]

    def used(self, tier):
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
        self.inflight[sid] = self.store.prefetch(sid)

    def evict(self, sid, tier):
        self.store.evict(sid, tier)

    def busy(self, sid):
        f = self.inflight.get(sid)
        return sid in self.running or (f is not None and not f.done())

    def wait_prefetches(self, timeout_s: float) -> None:
        pending = [f for f in self.inflight.values() if not f.done()]
        if pending and timeout_s > 0:
            import concurrent.futures as cf

            cf.wait(pending, timeout=timeout_s)


class RealExecutor:
    def __init__(self, system: System, engine, recompute_engine, adapter: StoreAdapter, *, cost=None):
        self.system, self.engine, self.recompute_engine = system, engine, recompute_engine
        self.adapter, self.store = adapter, engine.store
        self.cost = cost  # clock="model": times from the cost model instead of the measurement

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
        self.adapter.running.add(sid)
        prompt = np.asarray(job.prompt_ids, np.int32)
        fresh = self._fresh_context(sid, job) if (self.system.device_only or self.system.naive_truncation) else None
        msg = prompt if fresh is None else np.concatenate([fresh, prompt])
        engine = self.engine if self.system.reuse else self.recompute_engine
        traced = sum(TRACE_COUNTS.values())
        r = engine.turn(sid, msg, max_new_tokens=job.max_new_tokens)
        compiled = sum(TRACE_COUNTS.values()) != traced
        service = r.total_s
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
        return Outcome(ttft, service, source, reused, hist, len(prompt), r.generated_tokens, r.truncated_tokens, after,
                       reused * self.store.layout.bytes_per_token, compiled=compiled and self.cost is None)

    def complete(self, job: Job, outcome: Outcome, now: float) -> None:
        self.adapter.running.discard(job.sid)
        if self.cost is not None:
            self.store.flush()  # a modelled clock: let async work settle, so the store's state is deterministic

    def sync(self, now: float) -> None:
        pass

    def idle(self, gap_s: float) -> None:
        """The engine would idle ``gap_s`` seconds (the trace's think times are not slept): the store's
        prefetches get that long in real time to land, as they would on a live server."""
        if self.cost is not None:
            self.store.flush()
        else:
            self.adapter.wait_prefetches(gap_s)
