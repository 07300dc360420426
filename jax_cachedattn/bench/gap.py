"""Where Belady's lead over the queue-aware policy comes from (a simulation diagnostic).

``python -m jax_cachedattn.bench.gap --config configs/bench/sim-paper.yaml --sessions 1500 --out gap.json``
replays one trace with five policies and records, for every eviction from the device and host tiers,
how long the victim's next turn was still away (the replay's own arrival times, known to the driver):

* ``lru``; ``cachedattn`` (the queue window, idle sessions ranked by the predicted chance of a next
  turn within the tier's horizon);
* ``cachedattn+law-oracle``: the same, but the predictor is handed each session's think-time law
  instead of estimating it (the median the generator drew for the session, the generator's
  within-session spread, the trace's continuation chance): the most an online policy could learn
  about the trace, since the draws themselves (and whether a conversation goes on: the paper trace's
  turn counts are geometric, memoryless) are not observable;
* ``cachedattn+end-oracle``: the same, but told which conversations have another turn (the
  predictor's continuation chance replaced by the truth, 0 or 1); the think time still predicted;
* ``cachedattn+arrival-oracle``: the same queue policy with idle sessions ranked by their true next
  arrival (furthest first): what the queue policy would do if every think time were known;
* ``belady``: furthest next use first over every session (queued ones included).

The two oracles split the gap between an online policy and Belady into what not knowing *whether*
a conversation goes on costs and what not knowing *when* its next turn comes costs. They are
diagnostics only (``next_use`` is the future); no benchmark system uses them.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from jax_cachedattn.scheduler import make_policy
from jax_cachedattn.scheduler.policies import QueueAwarePolicy
from jax_cachedattn.scheduler.predictor import NextTurnPredictor

from . import config as C
from .simrun import run_sim_system
from .systems import SYSTEMS
from .trace import build_workload

BUCKETS_S = (10, 30, 60, 120, 300, 900)  # victims' time to their next turn, histogram edges


class EndOracle(NextTurnPredictor):
    """Knows whether each idle session has another turn (``has_next(sid)``), not when."""

    def __init__(self, has_next):
        super().__init__()
        self.has_next = has_next

    def continue_probs(self, sids, turns, pooled):
        return np.asarray([1.0 if self.has_next(s) else 0.0 for s in sids])


class LawOracle(NextTurnPredictor):
    """Each session's think-time law given (``mu[sid]``, ``sigma``), continuation chance ``p``."""

    def __init__(self, mu: dict, sigma: float, p: float):
        super().__init__(min_samples=0)
        self.mu, self.sigma, self.p = mu, sigma, p

    def update_ended(self, now: float) -> None:
        pass

    def return_probs(self, sids, now, horizon_s):
        from scipy.special import ndtr

        out = np.full(len(sids), np.nan)
        idx = [i for i, sid in enumerate(sids) if sid in self._s and self._s[sid].last_finish is not None]
        if not idx:
            return out
        fin = np.asarray([self._s[sids[i]].last_finish for i in idx])
        mu = np.asarray([self.mu[sids[i]] for i in idx])
        e = np.maximum(1e-3, now - fin)
        surv = np.maximum(1e-12, ndtr(-(np.log(e) - mu) / self.sigma))
        surv_h = ndtr(-(np.log(e + horizon_s) - mu) / self.sigma)
        q = self.p * surv / (self.p * surv + 1.0 - self.p)
        out[np.asarray(idx)] = q * np.maximum(0.0, 1.0 - surv_h / surv)
        return out


def _law(wl, cfg: dict) -> tuple[dict, float, float]:
    """Each session's mean log think time as the generator drew it, the within-session spread, and
    the trace's continuation chance (turns that have a next one over all turns)."""
    mu = {s.sid: math.log(s.think_median_s) for s in wl.sessions if s.think_median_s}
    if len(mu) < len(wl.sessions):
        raise ValueError("the law oracle needs a generated trace (sessions that carry their think-time law)")
    conts = sum(len(s.turns) - 1 for s in wl.sessions)
    return mu, float(cfg["workload"].get("think_sigma", 0.8)), conts / max(1, conts + len(wl.sessions))


class ArrivalOracle(NextTurnPredictor):
    """Ranks idle sessions by their true next arrival: the score is minus the time until it."""

    def __init__(self, next_use):
        super().__init__(min_samples=0)
        self.next_use = next_use
        self.now = 0.0

    def update_ended(self, now: float) -> None:
        self.now = now

    def return_probs(self, sids, now, horizon_s):
        return np.asarray([-min(self.next_use(s) - now, 1e18) for s in sids], float)


def _victim_log(drv, store, log: list) -> None:
    inner = store.evict

    def evict(sid: str, tier: str) -> None:
        if tier in ("device", "host") and store.tier_of(sid) is not None:
            log.append((tier, drv.next_use(sid) - store.now))
        inner(sid, tier)

    store.evict = evict


def _hist(deltas: list[float]) -> dict:
    n = max(1, len(deltas))
    out, prev = {}, 0.0
    d = np.asarray(deltas, float)
    for edge in BUCKETS_S:
        out[f"<{edge}s"] = float(np.sum((d >= prev) & (d < edge)) / n)
        prev = edge
    out["later"] = float(np.sum(np.isfinite(d) & (d >= prev)) / n)
    out["never"] = float(np.sum(~np.isfinite(d)) / n)
    return out


def run(cfg: dict, names: list[str]) -> dict:
    wl = build_workload(cfg)
    out = {"sessions": len(wl.sessions), "turns": wl.num_turns, "policies": {}}
    for name in names:
        holder: dict = {}
        log: list = []
        base = "belady" if name == "belady" else ("lru" if name == "lru" else "cachedattn-rank-only")
        policy = None
        if name == "cachedattn+end-oracle":
            policy = QueueAwarePolicy(predictor=EndOracle(lambda s: math.isfinite(holder["drv"].next_use(s))))
        elif name == "cachedattn+law-oracle":
            policy = QueueAwarePolicy(predictor=LawOracle(*_law(wl, cfg)))
        elif name == "cachedattn+arrival-oracle":
            policy = QueueAwarePolicy(predictor=ArrivalOracle(lambda s: holder["drv"].next_use(s)))
        elif name == "cachedattn":
            policy = make_policy("cachedattn")

        def on_driver(drv, store, holder=holder, log=log):
            holder["drv"] = drv
            _victim_log(drv, store, log)

        t0 = time.perf_counter()
        res, _ = run_sim_system(SYSTEMS[base], cfg, wl, policy=policy, on_driver=on_driver)
        tiers = res["hit_rate_by_tier"]
        out["policies"][name] = {
            "token_hit_rate": res["token_hit_rate"], "hit_rate_by_tier": tiers,
            "memory_hit_rate": tiers["device"] + tiers["host"], "reuse_upper_bound": res["reuse_upper_bound"],
            "ttft_mean_s": res["ttft_mean_s"], "seconds": round(time.perf_counter() - t0, 1),
            "victims": {t: {"count": sum(1 for x in log if x[0] == t), "time_to_next_turn": _hist([d for x, d in log if x == t])}
                        for t in ("device", "host")}}
        print(name, json.dumps(out["policies"][name]), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sessions", type=int, default=None, help="a shorter trace (the warm-up keeps its share)")
    ap.add_argument("--host-gb", type=float, default=None)
    ap.add_argument("--policies", default="lru,cachedattn,cachedattn+law-oracle,cachedattn+end-oracle,cachedattn+arrival-oracle,belady")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    cfg = C.load(a.config)
    if a.sessions:
        old = int(cfg["workload"]["sessions"])
        cfg["workload"]["sessions"] = a.sessions
        cfg["warmup_turns"] = int(cfg["warmup_turns"] * a.sessions / old)
    if a.host_gb is not None:
        cfg["store"] = {k: v for k, v in cfg["store"].items() if not k.startswith("host_")}
        cfg["store"]["host_gb"] = a.host_gb
    res = run(cfg, a.policies.split(","))
    res["config"] = {"path": a.config, "sessions": cfg["workload"]["sessions"], "host": cfg["store"]}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
