"""The trace clock: closed-loop sessions feeding one scheduler, for both modes.

Events are turn arrivals and job completions, in trace time. A session's first turn arrives at its
start time; each later turn arrives a think time after the previous reply finished (closed loop).
Whenever an engine slot is free and the queue is not empty, the scheduler plans and hands out the
head job; the executor runs it (`SimExecutor`: the cost model; `RealExecutor`: the engine, timed) and
says how long it took, which advances the trace clock. The same `Scheduler` and policy objects run
in both modes: only the executor differs.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable
from typing import Protocol

from jax_cachedattn.scheduler import Job, Scheduler
from jax_cachedattn.workload import Workload


@dataclasses.dataclass
class Outcome:
    """What one job did (seconds are engine time; tokens are counts)."""

    ttft_s: float
    service_s: float
    source: str  # new | device | host | disk | recompute
    reused_tokens: int
    history_tokens: int  # the history the turn attended to (after truncation)
    prompt_tokens: int
    generated_tokens: int
    truncated_tokens: int
    tokens_after: int  # the session's context after the turn
    load_bytes: int = 0
    compiled: bool = False  # the engine traced/compiled a program during this job: its times are not measured


@dataclasses.dataclass
class Record:
    sid: str
    turn: int
    arrival_s: float
    start_s: float
    outcome: Outcome
    warmup: bool

    @property
    def queue_wait_s(self) -> float:
        return self.start_s - self.arrival_s


class Executor(Protocol):
    def start(self, job: Job, now: float) -> Outcome: ...

    def complete(self, job: Job, outcome: Outcome, now: float) -> None: ...

    def sync(self, now: float) -> None: ...  # the trace clock is at ``now`` (before the scheduler plans)

    def idle(self, gap_s: float) -> None: ...  # no job starts for ``gap_s`` trace seconds


class Driver:
    """Replays ``workload`` through ``scheduler`` and ``executor``; see the module docstring.

    warmup_turns: the first this many jobs to start fill the cache and are not measured.
    slots: jobs run at once (the engine's decode slots; 1 until the engine batches).
    max_context: the model's context window (the driver keeps each session's context length).
    on_job: called after each job with the record (progress bars).
    """

    def __init__(self, workload: Workload, scheduler: Scheduler, executor: Executor, *, warmup_turns: int = 0,
                 slots: int = 1, on_job: Callable[[Record], None] | None = None):
        self.workload, self.scheduler, self.executor = workload, scheduler, executor
        self.warmup_turns, self.slots, self.on_job = warmup_turns, slots, on_job
        self._next_use: dict[str, float] = {}
        self.clock = 0.0
        self.records: list[Record] = []

    def next_use(self, sid: str) -> float:
        """The oracle (Belady): trace time of ``sid``'s next turn, ``inf`` when it has none."""
        return self._next_use.get(sid, math.inf)

    def run(self) -> list[Record]:
        sessions = {s.sid: s for s in self.workload.sessions}
        ctx = {sid: 0 for sid in sessions}
        seq = itertools.count()
        events: list = []  # (time, order, seq, kind, payload); finishes before arrivals at equal times

        def arrive(sid: str, k: int, t: float) -> None:
            self._next_use[sid] = t
            heapq.heappush(events, (t, 1, next(seq), "arrive", (sid, k)))

        for s in self.workload.sessions:
            arrive(s.sid, 0, s.start_s)
        records: list[Record] = self.records
        free, started = self.slots, 0
        while events:
            t = events[0][0]
            while events and events[0][0] == t:
                _, _, _, kind, payload = heapq.heappop(events)
                if kind == "arrive":
                    sid, k = payload
                    turn = sessions[sid].turns[k]
                    self.scheduler.submit(Job(sid, t, turn.user_tokens, turn.reply_tokens, k, turn.prompt_ids,
                                              history_tokens=ctx[sid]))
                else:
                    job, out, rec = payload
                    self.executor.complete(job, out, t)
                    self.scheduler.finished(job, t)
                    ctx[job.sid] = out.tokens_after
                    free += 1
                    turns = sessions[job.sid].turns
                    if job.turn + 1 < len(turns):
                        arrive(job.sid, job.turn + 1, t + turns[job.turn + 1].think_s)
                    else:
                        self._next_use[job.sid] = math.inf
                    if self.on_job is not None:
                        self.on_job(rec)
            while free and len(self.scheduler.queue):
                self.executor.sync(t)
                job = self.scheduler.next_job(t)
                job.history_tokens = ctx[job.sid]
                out = self.executor.start(job, t)
                rec = Record(job.sid, job.turn, job.arrival_s, t, out, started < self.warmup_turns)
                records.append(rec)
                started += 1
                free -= 1
                heapq.heappush(events, (t + out.service_s, 0, next(seq), "finish", (job, out, rec)))
            if not free and len(self.scheduler.queue):
                # jobs wait behind busy slots: the scheduler prefetches for them, the head included
                self.executor.sync(t)
                self.scheduler.waiting(t)
            if free and not len(self.scheduler.queue) and events:
                # a slot idles until the next event: the scheduler may read ahead what it predicts, and
                # a real store's transfers get the idle time they would have had
                self.executor.sync(t)
                self.scheduler.idle(t)
                self.executor.idle(events[0][0] - t)
            self.clock = t
        return records
