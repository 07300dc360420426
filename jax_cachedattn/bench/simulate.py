"""``simulate`` mode: the cost model stands in for the engine, `SimStore` for the KV store.

No tensors move. A job's TTFT is the cost model's prefill over what must be computed plus the load
of what is reused (from the tier the store finds it in, less what a prefetch already moved); its
service time adds the decode of its output budget (and the save, for ``sync-save``).
"""

from __future__ import annotations

import math

from jax_cachedattn.scheduler import Job

from .costmodel import CostModel
from .driver import Outcome
from .simstore import SimStore
from .systems import System


def plan_truncation_count(history: int, new: int, reserve: int, max_context: int, ratio: float) -> int:
    """Oldest history tokens to drop so ``history + new + reserve`` fits the context: at least the
    overflow and at least ``ratio`` of the history (the engine's rule, counted in tokens)."""
    over = history + new + reserve - max_context
    if over <= 0:
        return 0
    if new + reserve > max_context:
        raise ValueError(f"a turn of {new} tokens (+{reserve} reserved) exceeds the context window {max_context}")
    return min(history, max(over, math.ceil(ratio * history)))


class SimExecutor:
    def __init__(self, system: System, store: SimStore | None, cost: CostModel, *, max_context: int,
                 truncation_ratio: float = 0.5, bytes_per_token: int):
        self.system, self.store, self.cost = system, store, cost
        self.max_context, self.ratio = max_context, truncation_ratio
        self.bytes_per_token = bytes_per_token

    def start(self, job: Job, now: float) -> Outcome:
        sys_, store = self.system, self.store
        hist, new, gen = job.history_tokens, job.new_tokens, job.max_new_tokens
        gen = min(gen, self.max_context // 4)  # the engine's reply budget fits the window with room
        new = min(new, self.max_context - gen - 2)  # a prompt longer than the window is cut (as a client must)
        n_drop = plan_truncation_count(hist, new, gen + 2, self.max_context, self.ratio)
        tier, cached, nbytes, disk_s = None, 0, 0, 0.0
        if store is not None:
            store.now = now
            tier, cached, nbytes, disk_s = store.begin(job.sid)
            if n_drop and tier is not None:
                if sys_.naive_truncation:
                    store.drop_kv(job.sid)  # post-RoPE keys: the truncated cache is wrong, recompute
                    tier, cached, nbytes = None, 0, 0
                else:
                    store.truncate_front(job.sid, n_drop)
                    cached -= n_drop
                    nbytes = store.kv_bytes(job.sid)
        hist -= n_drop
        if tier is not None and cached != hist:  # the store lost part of it: recompute everything
            store.drop_kv(job.sid)
            tier, cached, nbytes = None, 0, 0
        if tier is None:
            ttft = self.cost.prefill_s(hist + new, 0)
            source = "new" if hist == 0 else "recompute"
        else:
            ttft = self.cost.ttft_s(new, cached, tier, nbytes, overlap=sys_.overlap,
                                    load_s=disk_s if tier == "disk" else None)
            source = tier
        service = ttft + self.cost.decode_s(gen)
        if sys_.sync_save and store is not None:
            service += self.cost.save_s((new + gen) * self.bytes_per_token)
        return Outcome(ttft, service, source, cached, hist, new, gen, n_drop, hist + new + gen, nbytes)

    def complete(self, job: Job, outcome: Outcome, now: float) -> None:
        if self.store is not None:
            self.store.now = now
            self.store.end(job.sid, outcome.tokens_after)

    def sync(self, now: float) -> None:
        if self.store is not None:
            self.store.now = now

    def idle(self, gap_s: float) -> None:
        pass  # the simulator's store times its transfers on the trace clock
