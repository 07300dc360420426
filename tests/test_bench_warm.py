"""``engine.warmup: programs``: every program a real replay's turns may run is compiled before it, from
every tier, so no measured job is left out as compiling (the cpu.yaml run of 2026-12-02 02:25 left 5
of cachedattn's 22 jobs out after a whole-trace compile pass)."""

from __future__ import annotations

import pytest

from jax_cachedattn.bench import config as C
from jax_cachedattn.bench.real import RealBench
from jax_cachedattn.bench.systems import SYSTEMS
from jax_cachedattn.bench.warm import trace_shapes
from jax_cachedattn.engine.warmup import TurnShape
from jax_cachedattn.workload import Session, Turn, Workload

CFG = {
    "mode": "real", "seed": 5, "warmup_turns": 0,
    "workload": {"kind": "synthetic", "preset": "sharegpt", "sessions": 4, "rate_per_s": 4.0, "think_median_s": 0.5,
                 "length_scale": 0.2, "min_turns": 3, "max_turns": 3, "max_user_tokens": 24, "max_reply_tokens": 40,
                 "feed_replies": True},
    "model": {"name": "tiny", "max_context": 256},
    "engine": {"max_new_tokens": 4, "prompt_bucket": 64, "warmup": "programs"},
    "store": {"kvstore": "memory", "token_block": 64, "device_kib": 64, "host_kib": 160, "disk_kib": None},
    "scheduler": {"high_watermark": 0.9, "low_watermark": 0.7},
    "systems": ["cachedattn"],
}


def test_trace_shapes_follow_prompts_decodes_and_replies():
    t = lambda p, r: Turn(p, r, 0.0, prompt_ids=tuple(range(p)), reply_ids=tuple(range(r)))  # noqa: E731
    wl = Workload("w", [Session("a", 0.0, (t(5, 30), t(7, 20)))])
    replies = {("a", 0): tuple(range(30)), ("a", 1): tuple(range(20))}
    turns, appends = trace_shapes(wl, replies, gen_tokens=4, max_new=8)
    # turn 0: no history; its append after 5 prompt + 1..4 decoded tokens; turn 1 after the 30-token reply
    assert turns == [TurnShape((0, 0), (5, 5)), TurnShape((35, 39), (7, 7))]
    assert appends == [TurnShape((5, 9), (30, 30)), TurnShape((42, 50), (20, 20))]


@pytest.mark.slow
def test_no_measured_turn_compiles_after_the_program_warmup(tmp_path):
    cfg = C.validate(CFG)
    bench = RealBench(cfg, tmp_path)
    res = bench.run_system(SYSTEMS["cachedattn"])
    assert res["warmup"]["programs"] > 0
    # the trace met the tiers the warm-up had to cover
    assert res["sources"]["device"] + res["sources"]["host"] + res["sources"]["disk"] > 0
    assert res["jobs_excluded_compiling"] == 0, res["compiled_during_replay"]
    assert not [c for c in res["compiled_during_replay"] if c["turn_traced"]]
