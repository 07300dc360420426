"""Per-system figures from the job records (warm-up jobs excluded).

Token hit rate: history tokens whose KV was reused / prompt tokens (history + new) over the measured
jobs; ``hit_rate_by_tier[t]``: the same with only the tokens served from tier ``t`` (they sum to the
token hit rate). Reuse upper bound: history tokens / prompt tokens (what a cache that never lost a
session would reuse). ``ttft_*``: engine time from the job's start to its first token (what
``cachedattn run --json`` reports as ``ttft_s``); ``ttft_e2e_*`` adds the time queued.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .driver import Record

TIERS = ("device", "host", "disk")


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(records: list[Record], *, wall_s: float, prices: dict | None = None, host_bytes: int = 0,
              disk_bytes: int = 0, trace_s: float | None = None, turn_buckets=(1, 2, 3, 5, 9, 17)) -> dict:
    recs = [r for r in records if not r.warmup and not r.outcome.compiled]
    if not recs:
        raise ValueError("no measured jobs: the warm-up (or compiling) took every job")
    o = [r.outcome for r in recs]
    ttft = np.array([x.ttft_s for x in o])
    e2e = np.array([r.queue_wait_s + r.outcome.ttft_s for r in recs])
    wait = np.array([r.queue_wait_s for r in recs])
    prompt = np.array([x.history_tokens + x.prompt_tokens for x in o], dtype=float)
    hist = np.array([x.history_tokens for x in o], dtype=float)
    reused = np.array([x.reused_tokens for x in o], dtype=float)
    computed = prompt - reused
    gen = np.array([x.generated_tokens for x in o], dtype=float)
    decode_s = np.array([max(0.0, x.service_s - x.ttft_s) for x in o])
    total_prompt = prompt.sum()
    by_tier = {t: float(sum(x.reused_tokens for x in o if x.source == t) / total_prompt) for t in TIERS}
    hit = float(reused.sum() / total_prompt)
    # by turn index (1-based), bucketed: 1, 2, 3-4, 5-8, 9-16, 17+
    edges = list(turn_buckets)
    by_turn = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in recs:
        k = r.turn + 1
        lab = _bucket(k, edges)
        by_turn[lab][0] += r.outcome.reused_tokens
        by_turn[lab][1] += r.outcome.history_tokens + r.outcome.prompt_tokens
        by_turn[lab][2] += r.outcome.history_tokens
    order = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    compute_s = float(sum(x.service_s for x in o))
    span = trace_s if trace_s is not None else float(max(r.start_s + r.outcome.service_s for r in recs)
                                                     - min(r.start_s for r in recs))
    out = {
        "jobs": len(recs),
        "jobs_excluded_compiling": sum(1 for r in records if not r.warmup and r.outcome.compiled),
        "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": _pct(ttft, 50), "ttft_p90_s": _pct(ttft, 90),
        "ttft_p99_s": _pct(ttft, 99),
        "ttft_samples_s": [float(x) for x in np.sort(ttft)[np.linspace(0, len(ttft) - 1, min(len(ttft), 500)).astype(int)]],
        "ttft_e2e_mean_s": float(e2e.mean()), "ttft_e2e_p50_s": _pct(e2e, 50), "ttft_e2e_p99_s": _pct(e2e, 99),
        "queue_wait_mean_s": float(wait.mean()),
        "tpot_s": float(decode_s.sum() / max(1.0, (gen - 1).clip(min=0).sum())),
        "prefill_tokens_per_s": float(total_prompt / ttft.sum()),
        # the same over the turns that have a history (the turns a cache can serve; a first turn
        # costs every system the same prefill)
        "ttft_mean_s_with_history": float(ttft[hist > 0].mean()) if (hist > 0).any() else float("nan"),
        "prefill_tokens_per_s_with_history": float(prompt[hist > 0].sum() / ttft[hist > 0].sum())
        if (hist > 0).any() else float("nan"),
        "jobs_with_history": int((hist > 0).sum()),
        "token_hit_rate": hit,
        "hit_rate_by_tier": by_tier,
        "reuse_upper_bound": float(hist.sum() / total_prompt),
        "hit_rate_by_turn": {k: {"hit_rate": by_turn[k][0] / by_turn[k][1], "upper_bound": by_turn[k][2] / by_turn[k][1],
                                 "jobs": sum(1 for r in recs if _bucket(r.turn + 1, edges) == k)}
                             for k in order if by_turn[k][1] > 0},
        "sources": {s: sum(1 for x in o if x.source == s) for s in ("new", "device", "host", "disk", "recompute")},
        "prompt_tokens": int(total_prompt), "computed_tokens": int(computed.sum()), "truncated_tokens":
            int(sum(x.truncated_tokens for x in o)),
        "compute_s": compute_s,
        "trace_s": span,
        "wall_s": float(wall_s),
    }
    if prices:
        # the accelerator is paid for the time it computes (its busy seconds), the memory and disk for
        # the whole trace (they hold the sessions between turns)
        hours, busy_h = span / 3600.0, compute_s / 3600.0
        gb = 1e9
        cost = (prices.get("gpu_per_h", 5.0) * busy_h + prices.get("dram_per_gb_h", 0.0088) * host_bytes / gb * hours
                + prices.get("ssd_per_gb_h", 0.000082) * disk_bytes / gb * hours)
        out["cost_usd"] = float(cost)
        out["cost_usd_per_1k_jobs"] = float(cost / len(recs) * 1000)
    return out


def _bucket(k: int, edges) -> str:
    for lo, hi in zip(edges, edges[1:]):
        if lo <= k < hi:
            return f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}"
    return f"{edges[-1]}+"
