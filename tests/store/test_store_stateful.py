"""Hypothesis state machine: random saves/appends/prefetches/loads/truncations/evictions vs a model."""

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

L, K, D, B = 2, 1, 4, 4
LAY = KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype="float32", fingerprint="h")
BLK = B * LAY.bytes_per_token_layer
SIDS = ["a", "b", "c"]


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.store = TieredStore(
            StoreConfig(kvstore={"driver": "memory"}, token_block=B, host_bytes=L * 8 * BLK,
                        device_bytes=L * 5 * BLK, disk_bytes=L * 14 * BLK), LAY)
        self.model: dict[str, np.ndarray] = {}  # sid -> [L, 2, n, K, D]
        self.seed = 0

    @rule(sid=st.sampled_from(SIDS), n=st.integers(1, 9))
    def append(self, sid, n):
        self.seed += 1
        new = np.random.default_rng(self.seed).standard_normal((L, 2, n, K, D)).astype(np.float32)
        old = self.model.get(sid)
        start = 0 if old is None else old.shape[2]
        if start + n > 24:
            return
        for layer in range(L):
            self.store.save_layer(sid, layer, new[layer], start)
        self.store.commit_turn(sid, np.arange(start + n)).result()
        self.model[sid] = new if old is None else np.concatenate([old, new], axis=2)
        for other in list(self.model):  # the disk budget may have deleted whole sessions
            if self.store.lookup(other) is None:
                del self.model[other]

    @rule(sid=st.sampled_from(SIDS), layer=st.integers(0, L - 1), pad=st.booleans())
    def load(self, sid, layer, pad):
        if sid not in self.model:
            assert self.store.lookup(sid) is None
            return
        want = self.model[sid][layer]
        got = np.asarray(self.store.load_layer(sid, layer, pad_to=32 if pad else None))
        np.testing.assert_array_equal(got[:, : want.shape[1]], want)
        assert not got[:, want.shape[1]:].any()

    @rule(sid=st.sampled_from(SIDS))
    def prefetch(self, sid):
        if sid in self.model:
            self.store.prefetch(sid).result()

    @rule(sid=st.sampled_from(SIDS), tier=st.sampled_from(["device", "host", "disk"]))
    def evict(self, sid, tier):
        if sid in self.model:
            self.store.evict(sid, tier)
            if tier == "disk":
                del self.model[sid]

    @rule(sid=st.sampled_from(SIDS), k=st.integers(0, 6))
    def truncate(self, sid, k):
        if sid in self.model and k <= self.model[sid].shape[2]:
            self.store.truncate_front(sid, k).result()
            self.model[sid] = self.model[sid][:, :, k:]

    @rule(order=st.permutations(SIDS))
    def hint(self, order):
        self.store.policy.set_future(order[:1])

    @invariant()
    def budgets_held(self):
        if hasattr(self, "store"):
            used = self.store.usage()
            for tier, cap in self.store.budget.items():
                assert cap is None or used[tier] <= cap, (tier, used)
            assert sorted(self.model) == self.store.sessions()

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()


StoreMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
TestStoreMachine = StoreMachine.TestCase
