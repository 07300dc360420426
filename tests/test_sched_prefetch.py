"""The look-ahead prefetch reaches a job that waits alone behind a running one (the head of the queue).

Before `Scheduler.waiting` the scheduler planned only when it handed a job out, and the head job it was
about to hand out was never prefetched; in a closed-loop trace whose queue seldom holds two jobs, the
one waiting job was always that head, so its KV on disk was read on the critical path (the cpu.yaml run
of 2026-12-02 02:25: 0 prefetches issued, one reused turn from disk)."""

from __future__ import annotations

import math

from jax_cachedattn.bench.costmodel import CostModel
from jax_cachedattn.bench.driver import Driver
from jax_cachedattn.bench.simstore import SimStore
from jax_cachedattn.bench.simulate import SimExecutor
from jax_cachedattn.bench.systems import SYSTEMS
from jax_cachedattn.scheduler import Job, QueueAwarePolicy, Scheduler, SchedulerConfig
from jax_cachedattn.workload import Session, Turn, Workload

BLOCK = 16  # a session of up to 16 tokens: one 16-byte block (1 layer, 1 byte per token)


class _Checked(SimStore):
    """A SimStore that records every prefetch with the trace time and checks the budgets after it."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.log: list[tuple[float, str]] = []

    def prefetch(self, sid):
        super().prefetch(sid)
        self.log.append((self.now, sid))
        for t in ("host", "disk"):
            cap = self.capacity(t)
            assert cap is None or self.used(t) <= cap, (t, self.used(t), cap)


def _run(bw: float):
    # s0 runs 0-1, s1 1-2, s2 2-3 (saving s2 pushes the least recently used s0 to disk), s3 3-4; s0's
    # second turn arrives at 1 + 2.3 = 3.3 while s3 runs and waits alone: the head of the queue.
    turns = lambda k, think=0.0: tuple(Turn(4, 4, 0.0 if i == 0 else think) for i in range(k))  # noqa: E731
    wl = Workload("hand", [Session("s0", 0.0, turns(2, 2.3))]
                  + [Session(f"s{i}", 0.1 * i, turns(1)) for i in (1, 2, 3)])
    pol = QueueAwarePolicy(predict="never")
    store = _Checked(pol, num_layers=1, bytes_per_token_layer=1, token_block=BLOCK, host_bytes=2 * BLOCK,
                     disk_bytes=None, disk_read_bw=bw)
    sched = Scheduler(store, pol, SchedulerConfig(high_watermark=1.0))
    cost = CostModel(num_layers=1, bytes_per_token=1, c0=1.0, a=0.0, b=0.0, decode_s_per_token=0.0,
                     bandwidth={"device": math.inf, "host": math.inf, "disk": bw}, write_bandwidth={})
    recs = Driver(wl, sched, SimExecutor(SYSTEMS["cachedattn"], store, cost, max_context=1024,
                                         bytes_per_token=1)).run()
    return recs, sched, store


def test_a_lone_waiting_head_on_disk_is_prefetched_before_its_turn():
    recs, sched, store = _run(bw=32.0)  # 16 bytes at 32 B/s: a read takes 0.5 s
    assert [(r.sid, r.turn, r.start_s) for r in recs][-2:] == [("s3", 0, 3.0), ("s0", 1, 4.0)]
    # issued when the turn arrived (3.3), while s3 ran, not when s0 was handed out (4.0)
    assert store.log == [(3.3, "s0")]
    d = sched.decisions
    assert d.index(("start", "s3", 0)) < d.index(("prefetch", "s0")) < d.index(("start", "s0", 1))
    last = recs[-1].outcome
    assert last.source == "host" and last.reused_tokens == 8  # landed at 3.8: served from memory
    assert last.ttft_s == 1.0  # compute only, no load on the critical path
    assert store.stats["prefetches_in_time"] == 1


def test_a_prefetch_too_slow_to_land_is_still_issued_and_shortens_the_wait():
    recs, sched, store = _run(bw=8.0)  # 2 s a read: issued at 3.3, lands at 5.3, the job starts at 4.0
    assert store.log == [(3.3, "s0")]
    last = recs[-1].outcome
    assert last.source == "disk"
    # the load waits only for the rest of the prefetch (1.3 s), not a whole read (2 s): TTFT = max(1, 1.3) + 1.3
    assert abs(last.ttft_s - 2.6) < 1e-9


def test_the_head_that_starts_now_is_left_to_the_layer_wise_load():
    pol = QueueAwarePolicy(predict="never")
    store = SimStore(pol, num_layers=1, bytes_per_token_layer=1, token_block=BLOCK, host_bytes=BLOCK, disk_bytes=None)
    for sid in ("a", "b"):  # a, then b: a goes to disk
        store.begin(sid)
        store.end(sid, 10)
    assert store.tier_of("a") == "disk"
    for waits in (False, True):
        sched = Scheduler(store, pol, SchedulerConfig(high_watermark=1.0))
        sched.submit(Job("a", 0.0, 4, 4))
        if waits:  # every slot busy: the head waits, so it is prefetched
            sched.waiting(0.0)
            assert sched.decisions == [("prefetch", "a")]
        else:  # handed out now: no prefetch
            assert sched.next_job(0.0).sid == "a" and sched.decisions == [("start", "a", 0)]


def test_a_landed_prefetch_pushed_back_to_disk_is_issued_again():
    pol = QueueAwarePolicy(predict="never")
    store = SimStore(pol, num_layers=1, bytes_per_token_layer=1, token_block=BLOCK, host_bytes=2 * BLOCK, disk_bytes=None)
    for sid in ("a", "b", "c"):  # a ends on disk
        store.begin(sid)
        store.end(sid, 10)
    assert store.tier_of("a") == "disk"
    sched = Scheduler(store, pol, SchedulerConfig(high_watermark=1.0))
    sched.submit(Job("a", 0.0, 4, 4))
    sched.waiting(0.0)
    assert store.tier_of("a") == "host"  # landed (infinite bandwidth)
    store.now = 1.0
    store.evict("a", "host")  # a running job's save made room with it
    sched.waiting(1.0)
    assert sched.decisions == [("prefetch", "a"), ("prefetch", "a")] and store.tier_of("a") == "host"
