"""What the store's parts share: configuration, the one metadata lock, sessions, budgets, counters.

No I/O is done while holding ``lock``: it guards metadata only (tables, budgets, session state).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading

import jax

from .budget import Budget, Reservation
from .disk import DiskTier
from .hooks import Hooks
from .layout import KVLayout, StoreConfig
from .policy import EvictionPolicy
from .session import Session
from .stats import StoreStats

TIERS = ("device", "host", "disk")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Core:
    def __init__(self, cfg: StoreConfig, layout: KVLayout, policy: EvictionPolicy, device, disk: DiskTier):
        self.cfg, self.layout, self.policy, self.disk = cfg, layout, policy, disk
        self.stats = StoreStats()
        self.hooks = Hooks()
        self.lock = threading.RLock()
        self.sessions: dict[str, Session] = {}
        self.B = cfg.token_block
        self.L = layout.num_layers
        self.block_bytes = self.B * layout.bytes_per_token_layer
        limits = {"device": cfg.device_bytes, "host": cfg.host_bytes, "disk": cfg.disk_bytes}
        self.budgets = {t: Budget(t, limits[t], self.lock) for t in TIERS}
        self.device = device
        self.dev_sharding = jax.sharding.SingleDeviceSharding(device)
        self.host_sharding = jax.sharding.SingleDeviceSharding(device, memory_kind=cfg.memory_kind)
        self.gates: dict[str, cf.Future] = {}  # sid -> removal of its files in progress (wait before writing)
        # work that holds host room while it copies and waits for nothing meanwhile (a promotion's read, a
        # demotion's copy): a save that finds the host tier full waits for it (`Lifecycle.take`)
        self.holding: set[cf.Future] = set()
        self.freeing = 0  # disk bytes of deleted sessions whose files are being removed
        self.errors: list[BaseException] = []  # failed turns not yet reported by flush
        self.closed = False

    @contextlib.contextmanager
    def holding_room(self, res: Reservation):
        """Mark the block as work holding reserved room that ends without waiting for other work; resolved
        (and forgotten) when the block ends, however it ends. Registered only once the room is held, so
        nothing that waits in `Lifecycle.take` is ever waited for (no cycle: two promotions of a full host
        tier waiting for each other hung the torture test when a promotion was waited for from its start).
        What is left of ``res`` is given back before the waiters are woken."""
        fut: cf.Future = cf.Future()
        with self.lock:
            self.holding.add(fut)
        try:
            yield
        finally:
            try:
                res.release()
            finally:
                with self.lock:
                    self.holding.discard(fut)
                fut.set_result(None)

    def new_session(self, sid: str) -> Session:
        s = Session(sid, {t: self.budgets[t].empty() for t in TIERS})
        self.sessions[sid] = s
        return s

    def disk_bytes(self, blocks: int) -> int:
        return self.L * blocks * self.block_bytes

    def wait_gate(self, sid: str) -> None:
        with self.lock:
            g = self.gates.get(sid)
        if g is not None:
            g.result()

    def report(self, err: BaseException) -> None:
        with self.lock:
            self.errors.append(err)

    def take(self, tier: str, nbytes: int) -> Reservation:
        return self.budgets[tier].take(nbytes)
