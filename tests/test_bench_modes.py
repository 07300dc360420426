"""`simulate` and `real` run one scheduler and one policy code path: given the same timings (the
real run's clock driven by the same cost model) they make the same decisions on the same trace."""

from __future__ import annotations

import pytest

from jax_cachedattn.bench import config as C
from jax_cachedattn.bench.costmodel import from_config
from jax_cachedattn.bench.real import RealBench
from jax_cachedattn.bench.simrun import model_shape, run_sim_system
from jax_cachedattn.bench.systems import SYSTEMS

CFG = {
    "mode": "real", "seed": 3, "warmup_turns": 0,
    "workload": {"kind": "synthetic", "preset": "sharegpt", "sessions": 10, "rate_per_s": 8.0, "think_median_s": 1.5,
                 "length_scale": 0.2, "max_turns": 3, "max_user_tokens": 24, "max_reply_tokens": 8},
    "model": {"name": "tiny", "max_context": 128},
    "engine": {"max_new_tokens": 8, "prompt_bucket": 64},
    "store": {"kvstore": "memory", "token_block": 64, "device_kib": 0, "host_kib": 160, "disk_kib": None},
    "scheduler": {"high_watermark": 0.9, "low_watermark": 0.7},
    "cost_model": {"c0": 0.05, "a": 0.002, "b": 0.0, "decode_s_per_token": 0.01,
                   "bandwidth_gbs": {"device": "inf", "host": "inf", "disk": "inf"}},
    "systems": ["cachedattn"],
}


@pytest.mark.parametrize("system", ["cachedattn"])
def test_simulate_and_real_make_the_same_decisions(tmp_path, system):
    cfg = C.validate(CFG)
    mc = model_shape(cfg)
    bpt = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * 4
    cost = from_config(cfg["cost_model"], num_layers=mc.num_layers, bytes_per_token=bpt)
    bench = RealBench(cfg, tmp_path)
    real = bench.run_system(SYSTEMS[system], cost=cost)
    real_sched, real_recs = bench.last_scheduler, bench.last_records
    sim, drv = run_sim_system(SYSTEMS[system], cfg, bench.workload)
    sim_recs = drv.records
    assert [(r.sid, r.turn, round(r.start_s, 9)) for r in real_recs] == [
        (r.sid, r.turn, round(r.start_s, 9)) for r in sim_recs]
    assert [r.outcome.source for r in real_recs] == [r.outcome.source for r in sim_recs]
    assert [r.outcome.reused_tokens for r in real_recs] == [r.outcome.reused_tokens for r in sim_recs]
    assert real_sched.decisions == drv.scheduler.decisions
    # the trace exercised what matters: evictions to disk, reuse from host and from disk
    kinds = {r.outcome.source for r in sim_recs}
    assert "host" in kinds and ("disk" in kinds or any(d[0] == "prefetch" for d in drv.scheduler.decisions)), kinds
    assert sim["evictions"]["host"] > 0 and real["evictions"]["host"] > 0
