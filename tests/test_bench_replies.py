"""The real executor's recorded-reply feeding (``workload.feed_replies``), its device tier (the engine's
page pool) and its prefetch accounting, on the tiny model."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np

from jax_cachedattn.bench import config as C
from jax_cachedattn.bench.real import RealBench, open_system
from jax_cachedattn.bench.real_exec import StoreAdapter
from jax_cachedattn.bench.systems import SYSTEMS, policy_and_config

CFG = {
    "mode": "real", "seed": 2, "warmup_turns": 0,
    "workload": {"kind": "synthetic", "preset": "sharegpt", "sessions": 3, "rate_per_s": 4.0, "think_median_s": 0.5,
                 "length_scale": 0.1, "min_turns": 3, "max_turns": 3, "max_user_tokens": 16, "max_reply_tokens": 24,
                 "feed_replies": True},
    "model": {"name": "tiny", "max_context": 256},
    "engine": {"max_new_tokens": 2, "prompt_bucket": 64},
    "store": {"kvstore": "memory", "token_block": 64, "device_kib": 192, "host_kib": 192, "disk_kib": None},
    "systems": ["cachedattn"],
}


def test_replies_are_fed_not_decoded(tmp_path):
    bench = RealBench(C.validate(CFG), tmp_path)
    assert bench.replies and all(len(ids) == bench.workload.sessions[0].turns[0].reply_tokens
                                 for (sid, k), ids in bench.replies.items() if (sid, k) == (bench.workload.sessions[0].sid, 0))
    res = bench.run_system(SYSTEMS["cachedattn"])
    recs = bench.last_records
    assert res["replies_fed"] is True and len(recs) == bench.workload.num_turns
    after: dict[str, int] = {}
    for r in sorted(recs, key=lambda r: (r.sid, r.turn)):
        o = r.outcome
        reply = bench.replies[(r.sid, r.turn)]
        assert 1 <= o.generated_tokens <= 2  # only a few tokens decoded, though the reply is longer
        assert len(reply) > 2
        assert o.history_tokens == after.get(r.sid, 0)  # the next turn meets prompt + decoded + recorded reply
        assert o.tokens_after == o.history_tokens + o.prompt_tokens + o.generated_tokens + len(reply)
        assert o.ttft_s < o.service_s  # the append is counted in the service time, not the TTFT
        after[r.sid] = o.tokens_after
    assert any(r.outcome.source == "device" for r in recs)  # the page pool kept a session between its turns


def test_the_device_tier_is_the_engines_page_pool(tmp_path):
    cfg = C.validate(CFG)
    bench = RealBench(cfg, tmp_path / "b")
    policy, _ = policy_and_config(SYSTEMS["cachedattn"], cfg)
    engine, _, store = open_system(SYSTEMS["cachedattn"], cfg, bench.model, tmp_path / "s", policy)
    adapter = StoreAdapter(store, engine)
    assert engine.config.keep_pages and store.budget["device"] == 0  # the store's own device tier holds nothing
    r = engine.turn("a", np.arange(20, 60, dtype=np.int32), max_new_tokens=2)
    assert adapter.tier_of("a") == "device" and adapter.used("device") > 0
    assert adapter.capacity("device") == engine.pool.capacity_bytes
    assert engine.turn("a", np.arange(70, 80, dtype=np.int32), max_new_tokens=2).source == "device"
    adapter.evict("a", "device")
    assert adapter.tier_of("a") == "host"
    assert engine.turn("a", np.arange(90, 95, dtype=np.int32), max_new_tokens=2).source == "host"
    assert r.source == "new"
    engine.close()
    # without a device budget nothing is kept on the device
    cfg0 = C.validate({**CFG, "store": {**CFG["store"], "device_kib": 0}})
    engine, _, store = open_system(SYSTEMS["cachedattn"], cfg0, bench.model, tmp_path / "s0", policy)
    assert not engine.config.keep_pages
    engine.turn("b", np.arange(20, 60, dtype=np.int32), max_new_tokens=2)
    assert StoreAdapter(store, engine).tier_of("b") == "host"
    engine.close()


def test_the_oracle_is_a_page_pool_that_holds_every_session(tmp_path):
    """The oracle's history lives in the engine's page pool (unbounded device memory), like cachedattn's
    device hits, with room for every session: every later turn is a device hit and nothing is evicted;
    its pool has another shape, so it is a program family of its own (its own compile pass)."""
    from jax_cachedattn.bench.real import program_family

    cfg = C.validate(CFG)
    bench = RealBench(cfg, tmp_path / "b")
    policy, _ = policy_and_config(SYSTEMS["oracle"], cfg)
    n = len(bench.workload.sessions)
    engine, _, store = open_system(SYSTEMS["oracle"], cfg, bench.model, tmp_path / "s", policy, n)
    assert engine.config.keep_pages and engine.config.pool_tokens == cfg["model"]["max_context"] * (n + 1)
    for k in range(3):
        for i in range(n):
            r = engine.turn(f"s{i}", np.arange(20 + k, 100 + k, dtype=np.int32), max_new_tokens=2)
            assert r.source == ("new" if k == 0 else "device")
    assert all(StoreAdapter(store, engine).tier_of(f"s{i}") == "device" for i in range(n))
    engine.close()
    assert program_family(SYSTEMS["oracle"]) != program_family(SYSTEMS["cachedattn"])
    assert program_family(SYSTEMS["lru"]) == program_family(SYSTEMS["cachedattn"])
    bench.run_system(SYSTEMS["oracle"])
    later = [r.outcome.source for r in bench.last_records if r.outcome.history_tokens]
    assert later and set(later) == {"device"}


class _Store:
    """A store whose prefetch futures the test resolves by hand."""

    def __init__(self):
        self.futures: dict[str, cf.Future] = {}

    def prefetch(self, sid):
        return self.futures.setdefault(sid, cf.Future())


def test_prefetches_are_counted_in_time_or_late_when_their_job_starts():
    ad = StoreAdapter.__new__(StoreAdapter)
    ad.store, ad.running, ad.inflight, ad.pool = _Store(), set(), {}, None
    ad.issued = ad.in_time = ad.late = 0
    ad._pending, ad.now, ad._issued_at = {}, 0.0, {}
    ad.prefetch("a")
    ad.prefetch("b")
    ad.prefetch("a")  # asked again while in flight: one prefetch
    assert ad.issued == 2 and ad.busy("a")
    ad.store.futures["a"].set_result(None)  # a lands, b is still reading when its job starts
    ad.job_starts("a")
    ad.job_starts("b")
    ad.job_starts("c")  # no prefetch: not counted
    assert (ad.issued, ad.in_time, ad.late) == (2, 1, 1)
    ad.job_starts("a")  # counted once
    assert (ad.in_time, ad.late) == (1, 1)
