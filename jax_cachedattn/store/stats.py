"""Counters of the tiered store."""

from __future__ import annotations

import dataclasses
import threading

TIERS = ("device", "host", "disk")


def _per_tier() -> dict[str, int]:
    return {t: 0 for t in TIERS}


@dataclasses.dataclass
class StoreStats:
    """What the store did since it was opened. Per-tier counters are dicts keyed by tier name.

    hits/misses: `load_layer`/`lookup` found (or did not find) the session in that tier, counted once
    per load; bytes_read/bytes_written: payload bytes moved out of/into that tier; evictions: sessions
    that left the tier to make room or by `evict`; prefetches_issued/prefetches_in_time: disk->host
    prefetches started, and those that had completed when the session was next loaded;
    checksum_failures: chunks or manifests that failed verification (their KV was dropped);
    recoveries: sessions rolled back to their last committed turn, or orphans ignored, at open;
    quarantined: folders moved to ``quarantine/`` at open (bad id, bad manifest, another model's);
    bytes_reclaimed: disk bytes of blocks before a session's durable front deleted (at run time or at
    open); reclaim_failures: such deletions that failed (retried by the next one, or at the next open);
    stale_copies: copies of a session's blocks made outside the lock by a demotion device -> host that
    were not installed because saves changed the session's rows meanwhile inside the same blocks (the
    span check alone let such a copy in: it served rows of an older turn).
    """

    hits: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    misses: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    bytes_read: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    bytes_written: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    evictions: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    prefetches_issued: int = 0
    prefetches_in_time: int = 0
    checksum_failures: int = 0
    recoveries: int = 0
    quarantined: int = 0
    bytes_reclaimed: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    reclaim_failures: int = 0
    stale_copies: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, value: int = 1, tier: str | None = None) -> None:
        with self._lock:
            if tier is None:
                setattr(self, name, getattr(self, name) + value)
            else:
                getattr(self, name)[tier] += value

    def as_dict(self) -> dict:
        with self._lock:
            return {
                f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in dataclasses.fields(self)
                if not f.name.startswith("_")
            }
