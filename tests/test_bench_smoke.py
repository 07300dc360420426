"""`cachedattn bench` end to end on configs/bench/smoke.yaml (real mode, tiny model), checked against
the results.json contract (DESIGN.md), plus its bad-input paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jax_cachedattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ("ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "prefill_tokens_per_s", "token_hit_rate",
            "hit_rate_by_tier", "jobs", "wall_s")


def test_smoke_config_end_to_end(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert main(["bench", "--config", str(ROOT / "configs/bench/smoke.yaml"), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "machine", "systems"}
    systems = res["systems"]
    want = {"recompute", "device-prefix", "cachedattn", "lru", "fifo", "lfu", "no-prefetch", "sync-load", "sync-save",
            "naive-truncation", "oracle"}
    assert set(systems) == want
    for name, r in systems.items():
        for key in CONTRACT:
            assert key in r, (name, key)
        assert set(r["hit_rate_by_tier"]) == {"device", "host", "disk"}
        assert r["jobs"] >= 1 and r["wall_s"] > 0
        assert r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"]
        assert sum(r["hit_rate_by_tier"].values()) == pytest.approx(r["token_hit_rate"])
        assert 0 <= r["token_hit_rate"] <= r["reuse_upper_bound"] + 1e-12
    assert systems["recompute"]["token_hit_rate"] == 0
    assert systems["cachedattn"]["token_hit_rate"] > 0
    # the oracle's budgets exceed the trace: every history served from memory, never read from disk
    assert systems["oracle"]["hit_rate_by_tier"]["disk"] == 0
    assert systems["oracle"]["token_hit_rate"] == pytest.approx(systems["oracle"]["reuse_upper_bound"])
    assert systems["cachedattn"]["evictions"]["host"] > 0  # the budgets force evictions to disk
    for png in ("ttft_cdf.png", "hit_rate_by_tier.png", "hit_rate_by_turn.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cachedattn bench" in capsys.readouterr().out  # the printed table


def test_simulate_mode_with_a_sweep_writes_the_capacity_plot(tmp_path):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text((ROOT / "configs/bench/sim-paper.yaml").read_text())
    out = tmp_path / "sim"
    rc = main(["bench", "--config", str(cfg), "--out", str(out), "--no-progress", "--sessions", "120",
               "--systems", "recompute,cachedattn,lru,belady"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["systems"]) == {"recompute", "cachedattn", "lru", "belady"}
    assert len(res["sweep"]["policies"]["cachedattn"]) == len(res["sweep"]["host_capacity"])
    assert (out / "hit_rate_vs_capacity.png").exists()


@pytest.mark.parametrize("args, msg", [
    (["--config", "no/such.yaml"], "no such config file"),
    (["--config", "SMOKE", "--workload", "nonsense"], "--workload must be"),
    (["--config", "SMOKE", "--systems", "cachedattn,bogus"], "unknown system"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, msg):
    args = [str(ROOT / "configs/bench/smoke.yaml") if a == "SMOKE" else a for a in args]
    assert main(["bench", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


@pytest.mark.slow  # spawns worker processes (each imports jax)
def test_simulate_jobs_in_worker_processes_give_the_same_results(tmp_path):
    cfg = ROOT / "configs/bench/sim-short-queue.yaml"
    res = []
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        assert main(["bench", "--config", str(cfg), "--out", str(out), "--no-progress", "--sessions", "60",
                     "--systems", "lru,cachedattn", "--jobs", str(jobs)]) == 0
        r = json.loads((out / "results.json").read_text())
        res.append(({k: (v["token_hit_rate"], v["hit_rate_by_tier"], v["ttft_mean_s"]) for k, v in r["systems"].items()},
                    r["sweep"]["policies"]))
    assert res[0] == res[1]
    # the sweep point at the config's own host capacity is the main run's (reused, not run again)
    at = res[0][1]["cachedattn"][[16.0, 32.0, 64.0].index(32.0)]
    assert at["token_hit_rate"] == res[0][0]["cachedattn"][0]
