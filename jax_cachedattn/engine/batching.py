"""The host loop of continuous batching: moves jobs between the queue and the decode slots.

Each round: pull jobs from the iterable (a look-ahead window beyond the free slots), tell the store
what comes next (eviction order, disk -> host prefetch), start jobs in free slots (while other slots
decode, prefills until the round's ``EngineConfig.prefill_budget`` new tokens are spent, at least one
chunk, so a burst of short jobs fills the slots at once and a long prefill runs one chunk of
``prefill_budget`` tokens per round between decode steps; every free slot at once when nothing
decodes), bring the host-memory histories of jobs still waiting into free pool pages (a bounded part
per round, engine/pool_preload.py), dispatch ``decode_steps`` steps of every active slot, and
finish the slots that are done (their turns commit and their results are yielded). Jobs of one
session never share the decode slots: the second waits for the first and runs against its history.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jax_cachedattn.engine import slots as SL
from jax_cachedattn.engine.pool import PoolFull
from jax_cachedattn.engine.pool_preload import PoolPreload
from jax_cachedattn.store import KVLost, UnknownSession


class Loop:
    def __init__(self, engine, jobs: Iterable[tuple[str, Any]], window: int, max_new: int, next_hint: str | None = None):
        self.e, self.window, self.max_new, self.next_hint = engine, window, max_new, next_hint
        self._it = iter(enumerate(jobs))
        self._done_reading = False
        self.pending: collections.deque = collections.deque()  # (index, sid, message, arrival time, max new tokens)
        self._preloaded: set[str] = set()
        self._starting: str | None = None  # the session of the job being started (given up on failure)
        self._chunking = None  # engine._Starting: a job whose prefill is part done (one chunk per round)
        self.pool_preload = PoolPreload(engine)  # queued jobs' host histories written into pool pages

    # ---- the queue ------------------------------------------------------------------------------
    def _fill(self) -> None:
        want = self.e.config.max_slots + self.window
        while not self._done_reading and len(self.pending) < want:
            try:
                i, job = next(self._it)
            except StopIteration:
                self._done_reading = True
                break
            # (session, message), (session, message, max_new_tokens) or (..., max_new_tokens, sample_name)
            sid, msg, *rest = job
            max_new = int(rest[0]) if rest and rest[0] is not None else self.max_new
            self.pending.append((i, sid, msg, time.perf_counter(), max_new, rest[1] if len(rest) > 1 else None))

    def _startable(self) -> Iterator[tuple]:
        """The pending jobs that could start next, in queue order: their sessions neither decoding, nor
        starting, nor queued earlier."""
        busy = {a.plan.sid for a in self.e._slots.values()}
        if self._chunking is not None:
            busy.add(self._chunking.plan.sid)
        for job in self.pending:
            if job[1] not in busy:
                yield job
            busy.add(job[1])

    def _ready(self) -> tuple | None:
        """The first pending job whose session is neither decoding nor queued earlier."""
        return next(self._startable(), None)

    def _hints(self) -> None:
        store = self.e.store
        if store is None or not self.e.config.use_cache:
            return
        upcoming = [j[1] for j in self.pending]
        policy = getattr(store, "policy", None)
        if policy is not None and hasattr(policy, "set_future"):
            policy.set_future([a.plan.sid for a in self.e._slots.values()] + upcoming)
        for sid in upcoming[: self.window]:
            if not isinstance(sid, str):
                continue
            try:
                info = store.lookup(sid)
                if info is not None and info.tier == "disk":
                    store.prefetch(sid)  # returns at once: the read runs on the store's I/O threads
            except (UnknownSession, KVLost, ValueError):  # gone, damaged or malformed: its own turn reports it
                pass

    # ---- the rounds -------------------------------------------------------------------------------
    def _start_jobs(self) -> None:
        """Start jobs in free slots. While other slots decode, the round prefills at most
        ``prefill_budget`` new tokens (at least one chunk): a job longer than that is prefilled one
        chunk per round (engine._resume) and joins the decode batch after its last chunk."""
        e = self.e
        decoding = bool(e._slots)
        spent = 0  # new tokens prefilled this round
        while True:
            if self._chunking is None:
                free = [s for s in range(e.config.max_slots) if s not in e._slots]
                job = self._ready() if free else None
                if job is None:
                    return
                i, sid, msg, t0, max_new, name = job
                self.pool_preload.finish(sid)  # a preload part done: its last layers now, then a device hit
                plan = e._plan(sid, msg, max_new)
                if name is not None:
                    plan = dataclasses.replace(plan, sample_name=name)
                self._starting = plan.sid
                try:
                    self._chunking = e._begin(i, plan, free[0], t0, time.perf_counter())
                except PoolFull:
                    self._starting = None
                    if not e._slots:
                        raise
                    return  # wait for a slot to finish and give its pages back
                self.pending.remove(job)
            s = self._chunking
            before = s.done
            a = e._resume(s)
            spent += max(1, s.done - before)
            if a is not None:
                a.slot = s.slot
                e._slots[s.slot] = a
                self._chunking = self._starting = None
            if decoding and spent >= e.config.prefill_budget:
                return  # the decoding slots wait for at most this round's budget of prefill

    def _waiting(self) -> list[tuple]:
        """``(sid, message, max_new)`` of the first ``max_slots`` startable jobs, in queue order."""
        jobs = itertools.islice(self._startable(), self.e.config.max_slots)
        return [(job[1], job[2], job[4]) for job in jobs]

    def _preload_next(self) -> None:
        """While slots decode: the waiting jobs' host histories into pool pages (bounded, engine/pool_preload.py);
        the read buffer's first layers for the next job the pool preload does not cover (``Engine.preload``)."""
        self.pool_preload.step(self._waiting())
        job = self._ready()
        sid = job[1] if job is not None else self.next_hint
        starting = self._chunking.plan.sid if self._chunking is not None else None
        if (sid is not None and sid != starting and sid not in self._preloaded
                and self.e.pool.entry(sid) is None
                and all(a.plan.sid != sid for a in self.e._slots.values())):
            self._preloaded.add(sid)
            try:
                self.e.preload(sid)
            except (UnknownSession, KVLost, ValueError):  # its own turn reports it
                pass

    def _step(self) -> Iterator[tuple[int, Any]]:
        e, ec = self.e, self.e.config
        for a in e._slots.values():  # pages for the rows this dispatch may write
            e._grow(a)
        active = SL.decode_bucket(max(e._slots) + 1, ec.max_slots)  # the busy slots' rows only
        t0 = time.perf_counter()
        st, pages, em, lg = SL.generate(e.params, e.layers, e.model_config, e.state, e.pool.pages, e._stop_ids,
                                        ec.decode_steps, ec.return_logits, ec.rope_mode == "naive", active=active)
        e.state, e.pool.pages = st, pages
        em, phase, lengths = np.asarray(em), np.asarray(st.phase), np.asarray(st.lengths)
        lg = np.asarray(lg) if ec.return_logits else None
        t1 = time.perf_counter()
        e.loop_time["decode_s"] += t1 - t0
        e.loop_time["decode_rounds"] += 1
        for slot, a in sorted(e._slots.items()):
            col = em[:, slot]
            mask = col >= 0
            a.generated += col[mask].tolist()
            if lg is not None:
                a.decode_logits += list(lg[mask, slot])
            a.length = int(lengths[slot])
            if phase[slot] == SL.DONE:
                del e._slots[slot]
                t = time.perf_counter()
                try:
                    res = e._finish(a)
                except BaseException:
                    e._abort(a)
                    raise
                e.loop_time["finish_s"] += time.perf_counter() - t
                yield a.index, res
            elif a.length - a.saved >= ec.save_every:
                t = time.perf_counter()
                e._save(a, a.length)
                e.loop_time["finish_s"] += time.perf_counter() - t

    def run(self) -> Iterator[tuple[int, Any]]:
        e = self.e
        spent = e.loop_time   # seconds by part of the round, summed over rounds (Engine.loop_time)
        clock = time.perf_counter
        try:
            while True:
                t0 = clock()
                self._fill()
                t1 = clock()
                self._hints()
                self._start_jobs()
                t2 = clock()
                spent["feed_s"] += t1 - t0
                spent["prefill_s"] += t2 - t1
                if not e._slots:
                    if self._done_reading and not self.pending:
                        return
                    continue
                self._preload_next()
                spent["preload_s"] += clock() - t2
                yield from self._step()
        except BaseException:
            self.pool_preload.cancel()
            if self._chunking is not None:
                e._give_back(self._chunking)
                self._chunking = None
            if self._starting is not None:
                e._abort_session(self._starting)
            for a in list(e._slots.values()):
                e._abort(a)
            e._slots.clear()
            raise
