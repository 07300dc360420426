"""The simulator's KV store: the `TieredStore`'s byte accounting and eviction rules, no tensors.

It follows what the real store does (``jax_cachedattn/store/tiered.py``): a session's bytes are its
allocated token blocks in every layer (``L x ceil(end / B) - offset // B`` blocks of ``B`` tokens);
every save passes through the host tier and writes through to disk (a host copy can be dropped for
free, the disk keeps it); a disk eviction deletes the session (its next turn recomputes); a load from
disk promotes the session to the host tier; a device budget > 0 keeps device copies of loaded
sessions. Room is made by asking the same policy object (``choose_victims``) over the same candidates
(sessions not busy and holding the tier); ``evict_slack`` (a share of the budget) makes a full
tier free that much more than it needs at once, so the victims are sorted once per batch instead of
at every save (paper-scale replays: the sort over ~1,500 disk sessions was most of the time). ``device_only`` models an engine with a device-memory
prefix cache and nothing behind it (the ``device-prefix`` system).
"""

from __future__ import annotations

import dataclasses
import math

TIERS = ("device", "host", "disk")


@dataclasses.dataclass
class _S:
    offset: int = 0
    end: int = 0
    device: bool = False
    host: bool = False
    disk: bool = False
    ready_at: float = 0.0  # a prefetch lands in the host tier at this time
    running: bool = False


class SimStore:
    def __init__(self, policy, *, num_layers: int, bytes_per_token_layer: int, token_block: int,
                 device_bytes: int = 0, host_bytes: int, disk_bytes: int | None = None, device_only: bool = False,
                 disk_read_bw: float = math.inf, evict_slack: float = 0.0):
        self.policy = policy
        self.L, self.B = num_layers, token_block
        self.block_bytes = token_block * bytes_per_token_layer
        self.budget = {"device": device_bytes, "host": host_bytes, "disk": disk_bytes}
        self.device_only = device_only
        self._used = {t: 0 for t in TIERS}
        self._members: dict[str, dict[str, None]] = {t: {} for t in TIERS}  # tier -> sessions (ordered)
        self._s: dict[str, _S] = {}
        self.now = 0.0
        self.disk_read_bw = disk_read_bw
        self.evict_slack = evict_slack  # a full tier frees this share of its budget beyond the need
        self._io_free = 0.0  # the disk's read channel is busy until then (prefetches queue on it)
        self.stats = {"evictions": {t: 0 for t in TIERS}, "bytes_read": {t: 0 for t in TIERS},
                      "bytes_written": {t: 0 for t in TIERS}, "prefetches_issued": 0, "prefetches_in_time": 0}

    # ---- sizes ---------------------------------------------------------------------------------
    def _bytes(self, s: _S, end: int | None = None) -> int:
        end = s.end if end is None else end
        nb = -(-end // self.B) - s.offset // self.B
        return self.L * max(0, nb) * self.block_bytes

    # ---- StoreView -----------------------------------------------------------------------------
    def tier_of(self, sid: str) -> str | None:
        s = self._s.get(sid)
        if s is None or s.end - s.offset <= 0:
            return None
        for t in TIERS:
            if getattr(s, t):
                return t
        return None

    def kv_bytes(self, sid: str) -> int:
        s = self._s.get(sid)
        return 0 if s is None else self._bytes(s)

    def capacity(self, tier: str) -> int | None:
        return self.budget[tier]

    def used(self, tier: str) -> int:
        return self._used[tier]

    def sessions_in(self, tier: str) -> list[str]:
        return list(self._members[tier])

    def mean_kv_bytes(self) -> int:
        """Mean KV bytes of the sessions the store holds (disk holds every session when it exists)."""
        tier = "device" if self.device_only else ("disk" if self.budget["disk"] != 0 else "host")
        n = len(self._members[tier])
        return self._used[tier] // n if n else 0

    def _set(self, sid: str, s: _S, tier: str, held: bool) -> None:
        setattr(s, tier, held)
        if held:
            self._members[tier][sid] = None
        else:
            self._members[tier].pop(sid, None)

    def busy(self, sid: str) -> bool:
        s = self._s.get(sid)
        return s is not None and (s.running or s.ready_at > self.now)

    def evict(self, sid: str, tier: str) -> None:
        s = self._s.get(sid)
        if s is None or not getattr(s, tier):
            return
        self.stats["evictions"][tier] += 1
        if tier == "disk" or (self.device_only and tier == "device"):
            for t in TIERS:
                self._drop(sid, s, t)
            del self._s[sid]
            self.policy.forget(sid)
        else:
            self._drop(sid, s, tier)

    def prefetch(self, sid: str) -> None:
        s = self._s.get(sid)
        if s is None or s.host or not s.disk or s.running:
            return
        nb = self._bytes(s)
        if not self._reserve("host", nb, sid):
            return
        self._set(sid, s, "host", True)
        start = max(self.now, self._io_free)
        s.ready_at = self._io_free = start + nb / self.disk_read_bw
        self.stats["prefetches_issued"] += 1
        self.stats["bytes_read"]["disk"] += nb
        self.stats["bytes_written"]["host"] += nb
        self.policy.touch(sid, "host")

    # ---- the engine's side ---------------------------------------------------------------------
    def begin(self, sid: str) -> tuple[str | None, int, int, float]:
        """A job of ``sid`` starts: ``(tier, cached_tokens, bytes, disk_s)``; ``disk_s`` is how long
        until the KV is in host memory when it comes from disk: the rest of a prefetch in flight or a
        read of its own, whichever is sooner (a demand read goes before queued prefetches and delays
        them by its length). The session is busy until `end`."""
        s = self._s.setdefault(sid, _S())
        tier = self.tier_of(sid)
        nb = self._bytes(s)
        s.running = True
        disk_s = 0.0
        if tier is None:
            return None, 0, 0, 0.0
        read = nb / self.disk_read_bw
        if tier == "host" and s.ready_at > self.now:
            tier, disk_s = "disk", min(s.ready_at - self.now, read)  # the prefetch has not landed
            if disk_s == read:
                self._io_free = max(self._io_free, self.now) + read
        elif tier == "host" and s.ready_at > 0:
            self.stats["prefetches_in_time"] += 1
        elif tier == "disk":
            disk_s = read
            self._io_free = max(self._io_free, self.now) + read
        s.ready_at = 0.0
        if tier == "disk" and not s.host:
            if not self._reserve("host", nb, sid):
                self._drop_all(sid, s)
                return None, 0, 0, 0.0
            self._set(sid, s, "host", True)
            self.stats["bytes_written"]["host"] += nb
            self.stats["bytes_read"]["disk"] += nb
        self.stats["bytes_read"][tier if tier != "disk" else "host"] += nb
        if tier != "device" and self.budget["device"] > 0 and not s.device:
            if self._reserve("device", nb, sid):
                self._set(sid, s, "device", True)
                self.stats["bytes_written"]["device"] += nb
        for t in TIERS:
            if getattr(s, t):
                self.policy.touch(sid, t)
        return tier, s.end - s.offset, nb, disk_s

    def end(self, sid: str, num_tokens: int) -> None:
        """The job's KV is saved: the session now holds ``num_tokens`` (after any truncation)."""
        s = self._s.setdefault(sid, _S())
        s.running = False
        old = self._bytes(s)
        had_device = s.device
        held = {t for t in TIERS if getattr(s, t)}
        for t in TIERS:  # re-placed at the new size below
            if getattr(s, t):
                self._used[t] -= old
                self._set(sid, s, t, False)
        s.end = s.offset + num_tokens
        new = self._bytes(s)
        if self.device_only:
            place = [("device", True)]
        else:
            place = [("host", True)] + ([("disk", True)] if self.budget["disk"] != 0 else [])
            place += [("device", False)] if had_device else []
        for tier, required in place:
            if self._reserve(tier, new, sid):
                self._set(sid, s, tier, True)
                self.stats["bytes_written"][tier] += new - old if tier in held else new
                self.policy.touch(sid, tier)
            elif required:  # the session alone does not fit: it cannot be kept (the real store raises)
                self._drop_all(sid, s)
                return
            else:
                self.policy.forget(sid, tier)

    def truncate_front(self, sid: str, n_drop: int) -> None:
        s = self._s.get(sid)
        if s is None:
            return
        before = self._bytes(s)
        s.offset += n_drop
        freed = before - self._bytes(s)
        for t in TIERS:
            if getattr(s, t):
                self._used[t] -= freed

    def drop_kv(self, sid: str) -> None:
        """Forget the session's KV (its next turn recomputes), e.g. a naive cache made invalid."""
        s = self._s.get(sid)
        if s is not None:
            self._drop_all(sid, s)

    # ---- internals -----------------------------------------------------------------------------
    def _drop(self, sid: str, s: _S, tier: str) -> None:
        if getattr(s, tier):
            self._used[tier] -= self._bytes(s)
            self._set(sid, s, tier, False)
            if tier == "host":
                s.ready_at = 0.0
            self.policy.forget(sid, tier)

    def _drop_all(self, sid: str, s: _S) -> None:
        running = s.running
        for t in TIERS:
            self._drop(sid, s, t)
        self._s[sid] = _S(running=running)
        self.policy.forget(sid)

    def _reserve(self, tier: str, nbytes: int, owner: str) -> bool:
        budget = self.budget[tier]
        if budget is None:
            self._used[tier] += nbytes
            return True
        if self._used[tier] + nbytes > budget:
            now, ss = self.now, self._s
            cands = [sid for sid in self._members[tier]
                     if sid != owner and not ss[sid].running and not ss[sid].ready_at > now]
            target = budget - int(self.evict_slack * budget)
            for sid in self.policy.choose_victims(cands, tier):
                if self._used[tier] + nbytes <= target:
                    break
                self.evict(sid, tier)
        if self._used[tier] + nbytes <= budget:
            self._used[tier] += nbytes
            return True
        return False
