"""Scheduler logic against the simulator's store and a cost model whose timings are computable by hand."""

from __future__ import annotations

import itertools
import math

import pytest

from jax_cachedattn.bench.costmodel import CostModel
from jax_cachedattn.bench.driver import Driver
from jax_cachedattn.bench.simstore import SimStore
from jax_cachedattn.bench.simulate import SimExecutor
from jax_cachedattn.bench.systems import SYSTEMS
from jax_cachedattn.scheduler import (
    FIFO, LFU, LRU, Belady, Job, NextTurnPredictor, QueueAwarePolicy, Scheduler, SchedulerConfig,
)
from jax_cachedattn.workload import Session, Turn, Workload

# A session of up to 16 tokens is one block per layer: L=1, 16 tokens x 1 byte = 16 bytes per session.
BLOCK = 16


def _store(policy, host_sessions, disk_sessions=None, bw=float("inf")):
    return SimStore(policy, num_layers=1, bytes_per_token_layer=1, token_block=BLOCK, host_bytes=host_sessions * BLOCK,
                    disk_bytes=None if disk_sessions is None else disk_sessions * BLOCK, disk_read_bw=bw)


def _cost(c0=1.0, disk_gbs=None):
    # every prefill costs c0 seconds, decoding nothing, loads from host free, from disk bytes/bw
    return CostModel(num_layers=1, bytes_per_token=1, c0=c0, a=0.0, b=0.0, decode_s_per_token=0.0,
                     bandwidth={"device": math.inf, "host": math.inf, "disk": disk_gbs or math.inf},
                     write_bandwidth={})


def _fill(store, sids, tokens=10):
    for sid in sids:
        store.begin(sid)
        store.end(sid, tokens)


def test_windows_from_capacity_and_mean_session_size():
    pol = QueueAwarePolicy()
    store = _store(pol, host_sessions=4, disk_sessions=8)
    _fill(store, ["a", "b"])  # 2 sessions of one 16-byte block each: S_kv = 16
    s = Scheduler(store, pol)
    assert s.windows() == (4, 12)  # C_mem / S_kv = 64/16; (C_mem + C_disk) / S_kv = (64+128)/16
    _fill(store, ["c"], tokens=40)  # a 3-block session: S_kv = (16+16+48)/3 = 26
    assert s.windows() == (64 // 26, 192 // 26)


def test_queue_aware_eviction_order():
    pol = QueueAwarePolicy(predict="never")
    for sid in ["x", "y", "a", "b", "c"]:  # x least recently used, then y
        pol.touch(sid, "host")
    pol.set_future(["a", "b", "c"])
    pol.set_windows(prefetch=1, eviction=2)
    # no queued job first (LRU among them), then beyond the window, then the window's tail first
    assert pol.choose_victims(["a", "b", "c", "x", "y"], "host") == ["x", "y", "c", "b", "a"]
    pol.set_windows(prefetch=1, eviction=10)
    assert pol.choose_victims(["c", "a", "y", "b"], "disk") == ["y", "c", "b", "a"]


def test_plain_policies_ignore_the_queue():
    for cls, want in ((LRU, ["b", "c", "a"]), (FIFO, ["a", "b", "c"]), (LFU, ["c", "b", "a"])):
        p = cls()
        p.touch("a", "host"); p.touch("b", "host"); p.touch("c", "host"); p.touch("a", "host")
        p.used("a"); p.used("a"); p.used("b")
        p.set_future(["b"])
        assert p.choose_victims(["a", "b", "c"], "host") == want, cls.__name__


def test_a_window_session_is_never_evicted_while_an_outsider_fits():
    pol = QueueAwarePolicy(predict="never")
    store = _store(pol, host_sessions=3)
    _fill(store, ["a", "b", "c"])
    pol.set_future(["a"])
    pol.set_windows(1, 1)
    _fill(store, ["d"])  # needs one block: the victim is the LRU outsider b, not the queued a
    assert store.tier_of("a") == "host" and store.tier_of("b") == "disk"


def _workload():
    # s0 arrives at 0 and again 2.3 s after its first reply; s1..s3 at 0.1, 0.2, 0.3; s4 at 3.2
    turns = lambda k, think=0.0: tuple(Turn(4, 4, 0.0 if i == 0 else think) for i in range(k))  # noqa: E731
    return Workload("hand", [Session("s0", 0.0, turns(2, 2.3))] + [Session(f"s{i}", 0.1 * i, turns(1)) for i in (1, 2, 3)]
                    + [Session("s4", 3.2, turns(1))])


def test_prefetch_is_issued_before_the_job_starts_and_lands_in_time():
    # Every job takes 1 s (hand-computed); the host holds 2 sessions of 16 bytes.
    # s0 runs 0-1, s1 1-2, s2 2-3 (saving s2 evicts the least recently used s0 to disk), s3 3-4.
    # s4 (3.2) and s0's second turn (1 + 2.3 = 3.3) wait; at t=4 the plan finds s0 on disk in the
    # prefetch window and prefetches it (16 bytes at 16 B/s: lands at 5) while s4 runs 4-5; s0 starts
    # at 5 and finds its KV in host memory.
    pol = QueueAwarePolicy(predict="never")
    store = _store(pol, host_sessions=2, bw=16.0)
    sched = Scheduler(store, pol, SchedulerConfig(high_watermark=1.0))
    ex = SimExecutor(SYSTEMS["cachedattn"], store, _cost(), max_context=1024, bytes_per_token=1)
    recs = Driver(_workload(), sched, ex).run()
    assert [(r.sid, r.turn, r.start_s) for r in recs] == [("s0", 0, 0.0), ("s1", 0, 1.0), ("s2", 0, 2.0),
                                                          ("s3", 0, 3.0), ("s4", 0, 4.0), ("s0", 1, 5.0)]
    d = sched.decisions
    assert d.index(("prefetch", "s0")) == d.index(("start", "s4", 0)) - 1 < d.index(("start", "s0", 1))
    assert recs[-1].outcome.source == "host" and recs[-1].outcome.reused_tokens == 8
    assert recs[-1].outcome.ttft_s == pytest.approx(1.0)
    assert store.stats["prefetches_in_time"] == 1


def test_no_prefetch_reads_from_disk_on_the_critical_path():
    pol = QueueAwarePolicy(predict="never")
    store = _store(pol, host_sessions=2, bw=16.0)
    sched = Scheduler(store, pol, SchedulerConfig(prefetch=False, high_watermark=1.0))
    ex = SimExecutor(SYSTEMS["no-prefetch"], store, _cost(), max_context=1024, bytes_per_token=1)
    recs = Driver(_workload(), sched, ex).run()
    last = recs[-1].outcome
    assert last.source == "disk"
    # TTFT = max(compute 1 s, load 1 s) + load / L (1 layer: 1 s) = 2 s
    assert last.ttft_s == pytest.approx(2.0)
    assert not any(x[0] == "prefetch" for x in sched.decisions)


def test_high_watermark_evicts_ahead_of_need_but_not_the_window():
    pol = QueueAwarePolicy(predict="never")
    store = _store(pol, host_sessions=10)
    _fill(store, [f"s{i}" for i in range(10)])  # full: 160 of 160 bytes
    sched = Scheduler(store, pol, SchedulerConfig(high_watermark=0.9, low_watermark=0.6))
    sched.submit(Job("s0", 0.0, 4, 4))
    sched.submit(Job("s1", 0.0, 4, 4))
    sched.plan(0.0)
    assert store.used("host") <= 0.6 * 160
    evicted = [x[1] for x in sched.decisions if x[0] == "evict"]
    assert len(evicted) == 4 and "s0" not in evicted and "s1" not in evicted
    assert evicted == ["s2", "s3", "s4", "s5"]  # least recently used outsiders first


def test_predictor_weighs_the_chance_that_a_conversation_ended():
    p = NextTurnPredictor(min_samples=5)
    t = 0.0
    # history: sessions come back after ~10 s, except those that stop after their 3rd turn
    for i in range(40):
        sid = f"h{i}"
        for k in range(3 if i % 2 else 6):
            p.arrived(sid, t)
            p.finished(sid, t + 1)
            t += 11
    p.update_ended(t + 10_000)
    assert p.p_continue(3) < 0.6 < p.p_continue(1)
    now = 1e6
    p.arrived("fresh", now - 12); p.finished("fresh", now - 2)  # finished 2 s ago, 1 turn
    p.arrived("old", now - 400); p.finished("old", now - 300)  # silent for 300 s: probably ended
    h = 10.0
    assert p.return_prob("fresh", now, h) > 10 * p.return_prob("old", now, h)


def test_short_queue_ranking_uses_predictions_only_when_the_queue_is_short():
    pred = NextTurnPredictor(min_samples=1)
    pol = QueueAwarePolicy(predict="short-queue", predictor=pred)
    for i in range(5):  # think time ~10 s
        pred.arrived("h", 11.0 * i)
        pred.finished("h", 11.0 * i + 1)
    pred.arrived("ended", 0.0); pred.finished("ended", 1.0)  # silent since t=1
    pred.arrived("soon", 990.0); pred.finished("soon", 995.0)  # finished 5 s ago
    pol.touch("soon", "host"); pol.touch("ended", "host")  # LRU would evict "soon" first
    pol.now = 1000.0
    pol.set_future(["q"])
    pol.set_windows(1, 8)  # 1 queued job < window of 8: a short queue
    assert pol.choose_victims(["soon", "ended"], "host") == ["ended", "soon"]
    pol.set_future([f"q{i}" for i in range(8)])  # a long queue: the paper's LRU among the unqueued
    assert pol.choose_victims(["soon", "ended"], "host") == ["soon", "ended"]


def _misses(trace, capacity, policy_for):
    """Unit-size cache of ``capacity`` sessions over ``trace``; victims by the policy."""
    cache, misses = [], 0
    pol = policy_for()
    for t, sid in enumerate(trace):
        if isinstance(pol, Belady):
            nxt = {s: next((u for u in range(t + 1, len(trace)) if trace[u] == s), math.inf) for s in set(trace)}
            pol.next_use = nxt.__getitem__
        if sid in cache:
            pol.touch(sid, "host")
            continue
        misses += 1
        if len(cache) >= capacity:
            victim = pol.choose_victims([s for s in cache], "host")[0]
            cache.remove(victim)
            pol.forget(victim, "host")
        cache.append(sid)
        pol.touch(sid, "host")
    return misses


def _brute_force(trace, capacity):
    best = math.inf

    def go(t, cache, misses):
        nonlocal best
        if misses >= best:
            return
        if t == len(trace):
            best = misses
            return
        sid = trace[t]
        if sid in cache:
            go(t + 1, cache, misses)
        elif len(cache) < capacity:
            go(t + 1, cache | {sid}, misses + 1)
        else:
            for v in cache:
                go(t + 1, (cache - {v}) | {sid}, misses + 1)

    go(0, frozenset(), 0)
    return best


def test_belady_equals_brute_force_on_small_traces():
    import random

    rng = random.Random(0)
    for _ in range(25):
        trace = [rng.choice("abcde") for _ in range(rng.randint(6, 11))]
        cap = rng.randint(1, 3)
        assert _misses(trace, cap, Belady) == _brute_force(trace, cap), (trace, cap)
    # and LRU is not optimal on a cyclic trace where Belady is
    trace = list("abcabcabc")
    assert _misses(trace, 2, LRU) > _misses(trace, 2, Belady) == _brute_force(trace, 2)


def test_belady_without_an_oracle_raises():
    with pytest.raises(RuntimeError, match="oracle"):
        Belady().choose_victims(["a", "b"], "host")


def test_scheduler_config_is_validated():
    with pytest.raises(ValueError):
        SchedulerConfig(high_watermark=0.5, low_watermark=0.8)


def test_job_queue_refuses_out_of_order_arrivals():
    # the job queue refuses arrivals out of order (the driver feeds it in trace time)
    from jax_cachedattn.scheduler import JobQueue

    q = JobQueue()
    q.push(Job("a", 2.0, 1, 1))
    with pytest.raises(ValueError):
        q.push(Job("b", 1.0, 1, 1))
    assert list(itertools.islice(q, 1))[0].sid == "a"


def _predicting_setup(host_sessions):
    """A trained predictor (think ~10 s), a session that ended long ago and one that finished 5 s ago."""
    pred = NextTurnPredictor(min_samples=1)
    pol = QueueAwarePolicy(predictor=pred)
    store = _store(pol, host_sessions=host_sessions)  # disk unbounded
    sched = Scheduler(store, pol, SchedulerConfig(high_watermark=1.0, low_watermark=1.0))
    for i in range(5):
        pred.arrived("h", 11.0 * i)
        pred.finished("h", 11.0 * i + 1)
    for k, t in enumerate((0.0, 10.0)):  # two arrivals: one job per 10 s (the horizon's rate)
        sched.submit(Job(f"j{k}", t, 1, 1))
        sched.next_job(t)
    pred.arrived("ended", 0.0); pred.finished("ended", 1.0)
    pred.arrived("soon", 990.0); pred.finished("soon", 995.0)
    store.now = 1000.0
    return pred, pol, store, sched


def test_predicted_prefetch_reads_an_idle_session_back_before_its_turn_is_queued():
    _, _, store, sched = _predicting_setup(host_sessions=2)
    _fill(store, ["soon", "ended"])
    store.evict("soon", "host")  # only on disk now; the host has room for it
    assert store.tier_of("soon") == "disk" and not len(sched.queue)
    sched.idle(1000.0)
    assert sched.decisions[-1] == ("predict-prefetch", "soon")
    assert store.tier_of("soon") == "host" and store.tier_of("ended") == "host"


def test_predicted_prefetch_swaps_out_a_less_likely_idle_session():
    _, _, store, sched = _predicting_setup(host_sessions=1)
    _fill(store, ["soon", "ended"])  # the host holds one: "soon" was pushed to disk by "ended"
    assert store.tier_of("soon") == "disk" and store.tier_of("ended") == "host"
    sched.idle(1000.0)
    assert sched.decisions[-2:] == [("evict", "ended", "host"), ("predict-prefetch", "soon")]
    assert store.tier_of("soon") == "host" and store.tier_of("ended") == "disk"


def test_predicted_prefetch_keeps_an_equally_likely_session_and_obeys_its_switches():
    pred, pol, store, sched = _predicting_setup(host_sessions=1)
    pred.arrived("also", 990.0); pred.finished("also", 995.0)  # as likely back as "soon"
    _fill(store, ["soon", "also"])
    assert store.tier_of("soon") == "disk"
    sched.idle(1000.0)
    assert not any(d[0] == "predict-prefetch" for d in sched.decisions)  # within the swap margin
    # the switches: no read-ahead without the scheduler flag, nor with the pure queue policy
    for cfg, predict in ((SchedulerConfig(predicted_prefetch=False), "short-queue"), (SchedulerConfig(), "never")):
        _, pol2, store2, sched2 = _predicting_setup(host_sessions=2)
        pol2.predict = predict
        sched2.config = cfg
        _fill(store2, ["soon", "ended"])
        store2.evict("soon", "host")
        sched2.idle(1000.0)
        assert store2.tier_of("soon") == "disk"


def test_predictor_separates_within_and_between_session_spread():
    import numpy as np

    rng = np.random.default_rng(0)
    p = NextTurnPredictor()
    t = 0.0
    for i in range(400):  # session scale: log-normal spread 0.5; think around it: spread 0.8
        mu = np.log(30.0) + rng.normal(0.0, 0.5)
        t = 1000.0 * i
        for _ in range(6):
            p.arrived(f"s{i}", t)
            p.finished(f"s{i}", t)
            t += float(np.exp(mu + rng.normal(0.0, 0.8)))
    mu0, within, between = p._components()
    assert abs(mu0 - np.log(30.0)) < 0.1
    assert abs(within - 0.64) < 0.08 and abs(between - 0.25) < 0.08


def test_lfu_is_least_frequently_used_with_recency_among_equals():
    p = LFU()
    for sid in ("a", "b", "c", "d"):
        p.touch(sid, "disk")
    p.used("a"); p.used("a"); p.used("b"); p.used("c"); p.used("d")
    p.touch("c", "disk")  # c used as often as b and d, but more recently
    assert p.choose_victims(["a", "b", "c", "d"], "disk") == ["b", "d", "c", "a"]
    p.forget("a")  # a session deleted from the store loses its count (in-cache LFU)
    p.touch("a", "disk"); p.used("a")
    assert p.choose_victims(["a", "b"], "disk") == ["b", "a"]


def test_gap_oracles_rank_by_the_truth_they_are_given():
    """bench/gap.py's diagnostic predictors: the end oracle zeroes the sessions that have no next turn
    (and keeps the think-time model for the others); the arrival oracle makes the queue-aware policy
    evict idle sessions furthest next arrival first, as Belady does."""
    from jax_cachedattn.bench.gap import ArrivalOracle, EndOracle

    end = EndOracle(lambda sid: sid != "done")
    t = 0.0
    for i in range(30):  # thinks of ~10 s
        end.arrived(f"h{i}", t)
        end.finished(f"h{i}", t + 1)
        end.arrived(f"h{i}", t + 11)
        t += 20
    for sid in ("done", "live"):
        end.arrived(sid, t)
        end.finished(sid, t + 1)
    probs = end.return_probs(["done", "live"], t + 3, 30.0)
    assert probs[0] == 0.0 and probs[1] > 0.5

    nxt = {"a": 50.0, "b": math.inf, "c": 20.0, "d": 35.0}
    pol = QueueAwarePolicy(predict="always", predictor=ArrivalOracle(nxt.get))
    for sid in nxt:
        pol.predictor.arrived(sid, 0.0)
        pol.predictor.finished(sid, 1.0)
        pol.touch(sid, "host")
    pol.set_windows(1, 4)
    pol.set_future(["q"])
    pol.now = 10.0
    assert pol.choose_victims(list(nxt) + ["q"], "host") == ["b", "a", "d", "c", "q"]
