"""The systems a benchmark compares, each a set of switches over one scheduler, store and engine."""

from __future__ import annotations

import dataclasses

from jax_cachedattn.bench.config import ConfigError


@dataclasses.dataclass(frozen=True)
class System:
    """reuse: keep KV across turns at all (False: recompute every history). policy: the eviction
    policy (`jax_cachedattn.scheduler.POLICIES`). prefetch: the scheduler prefetches its window disk ->
    host. overlap: layer-wise pre-loading (False: load the whole history, then compute). sync_save:
    the turn waits for its KV to be written. naive_truncation: keys stored after RoPE, so a truncated
    history must be recomputed. device_only: only a device-memory prefix cache of the device budget,
    nothing behind it. unbounded: that device cache has no limit (the oracle). predict: the
    short-queue ranking of the queue-aware policy; predicted_prefetch: its read-ahead of idle sessions
    (both only where the config's scheduler section leaves them on). sim_only / peer: runs only in simulation / is the
    Hugging Face transformers peer (real mode, when torch and transformers are installed)."""

    name: str
    reuse: bool = True
    policy: str = "cachedattn"
    prefetch: bool = True
    overlap: bool = True
    sync_save: bool = False
    naive_truncation: bool = False
    device_only: bool = False
    unbounded: bool = False
    predict: str = "short-queue"
    predicted_prefetch: bool = True
    sim_only: bool = False
    peer: bool = False


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("recompute", reuse=False, prefetch=False),
    System("device-prefix", policy="lru", prefetch=False, device_only=True),
    System("cachedattn"),
    System("cachedattn-paper", predict="never"),  # the pure queue policy (no short-queue ranking)
    System("cachedattn-rank-only", predicted_prefetch=False),  # the ranking without the predicted read-ahead
    System("lru", policy="lru"),
    System("fifo", policy="fifo"),
    System("lfu", policy="lfu"),
    System("no-prefetch", prefetch=False),
    System("sync-load", overlap=False),
    System("sync-save", sync_save=True),
    System("naive-truncation", naive_truncation=True),
    System("oracle", policy="lru", prefetch=False, device_only=True, unbounded=True),
    System("belady", policy="belady", sim_only=True),
    System("hf-recompute", reuse=False, prefetch=False, peer=True),
    System("hf-reuse", prefetch=False, peer=True),
)}


def get_systems(names) -> list[System]:
    out = []
    for n in names:
        if n not in SYSTEMS:
            raise ConfigError(f"unknown system {n!r}; expected some of {', '.join(SYSTEMS)}")
        out.append(SYSTEMS[n])
    return out


def policy_and_config(system: System, cfg: dict):
    """A fresh policy object and the scheduler config of ``system`` under ``cfg``."""
    from jax_cachedattn.scheduler import SchedulerConfig, make_policy

    kw = {"predict": system.predict} if system.policy == "cachedattn" else {}
    policy = make_policy(system.policy, **kw)
    sc = dict(cfg.get("scheduler", {}))
    sc["prefetch"] = system.prefetch and sc.get("prefetch", True)
    sc["predicted_prefetch"] = system.predicted_prefetch and sc.get("predicted_prefetch", True)
    return policy, SchedulerConfig(**sc)


class NoStore:
    """The StoreView of a system that keeps nothing (recompute)."""

    def tier_of(self, sid):
        return None

    def kv_bytes(self, sid):
        return 0

    def capacity(self, tier):
        return 0

    def used(self, tier):
        return 0

    def sessions_in(self, tier):
        return []

    def mean_kv_bytes(self):
        return 0

    def prefetch(self, sid):
        pass

    def evict(self, sid, tier):
        pass

    def busy(self, sid):
        return False
