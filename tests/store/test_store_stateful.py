"""Hypothesis state machine: the store under concurrent, un-awaited work and injected faults vs a model.

Saves and commits are not awaited (the engine never waits on a commit); a background thread keeps
prefetching and evicting; truncations, drops of a range (sink + middle, tail), aborted turns and
injected ENOSPC/EIO in chunk writes, resizes and manifests happen at any step. The model keeps, per session, the last durable state and
the chain of commits in flight; a failed commit fails every later one and leaves the last durable
state. Every served row is checked against the model's bytes (a load may see any state of the chain:
a failure rewinds in the background). The model never forgives a lost session: no KV is damaged here,
so ``kv_valid`` must stay True and every session must stay (the disk budget is unlimited).
"""

import threading

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from jax_cachedattn.store.errors import TurnFailed
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jax_cachedattn.store import BudgetError, DiskFull, KVLayout, LayoutMismatch, StoreConfig, StoreError, TieredStore, UnknownSession

L, K, D, B, C = 2, 1, 4, 4, 2  # C: tokens per disk chunk (2 per block: writes of part of a block)
LAY = KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype="float32", fingerprint="h")
BLK = B * LAY.bytes_per_token_layer
SIDS = ["a", "b", "c"]
MAX_TOKENS = 28


def ids_of(rows: np.ndarray) -> np.ndarray:
    """Token ids derived from the rows (unique in practice): a turn saved onto a history that went back
    meanwhile carries ids that do not continue the store's, and `commit_turn` refuses it."""
    return (np.frombuffer(np.ascontiguousarray(rows[0, 0, :, 0, 0]).tobytes(), np.uint32) >> 1).astype(np.int64)


def dropped(cur, a, b):
    """``cur`` without rows ``[a, b)`` (None when the range does not fit: the store refuses it)."""
    if cur is None or b > cur.shape[2]:
        return None
    return np.concatenate([cur[:, :, :a], cur[:, :, b:]], axis=2)


class Model:
    """One session: the durable rows and the operations in flight, in order: ("turn", future, rows
    before, rows after) or ("drop", future, start, stop) (a truncation is ``("drop", f, 0, k)``).
    A drop issued after an earlier turn failed applies to the rewound history."""

    def __init__(self):
        self.durable: np.ndarray | None = None  # [L, 2, n, K, D] or None: not in the store
        self.chain: list[tuple] = []

    @property
    def latest(self):
        cur = self.durable
        for op in self.chain:
            cur = op[3] if op[0] == "turn" else dropped(cur, op[2], op[3])
        return cur

    def states(self):
        """What a load may see now: the durable state with any subset of the operations in flight
        applied in order (each may succeed or fail; a failure rewinds in the background)."""
        out = [self.durable]
        for op in self.chain[:10]:
            nxt = list(out)
            for cur in out:
                new = op[3] if op[0] == "turn" else dropped(cur, op[2], op[3])
                if new is not None and not any(o is not None and o.shape == new.shape and np.array_equal(o, new)
                                               for o in nxt):
                    nxt.append(new)
            out = nxt
        return out


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.store = TieredStore(
            StoreConfig(kvstore={"driver": "memory"}, token_block=B, disk_chunk=C, host_bytes=L * 12 * BLK,
                        device_bytes=L * 5 * BLK), LAY)
        self.models = {sid: Model() for sid in SIDS}
        self.seed = 0
        self.failures = 0
        self.bg_errors: list = []
        self.stop = threading.Event()
        self.bg = threading.Thread(target=self._background, daemon=True)
        self.bg.start()

    def _background(self):
        rng = np.random.default_rng(0)
        while not self.stop.is_set():
            sid = SIDS[rng.integers(len(SIDS))]
            try:
                if rng.random() < 0.5:
                    self.store.prefetch(sid)
                else:
                    self.store.evict(sid, ["host", "device"][rng.integers(2)])
                used = self.store.usage()
                for tier, cap in self.store.budget.items():
                    if cap is not None and used[tier] > cap:
                        self.bg_errors.append(f"{tier} over budget: {used}")
            except (UnknownSession, BudgetError):
                pass
            except Exception as e:  # noqa: BLE001 - anything else is a bug
                self.bg_errors.append(repr(e))
            self.stop.wait(0.002)

    # ---- helpers -------------------------------------------------------------------------------
    def settle(self, sid):
        """Resolve the session's operations in flight; apply those that succeeded, in order."""
        m = self.models[sid]
        failed = False
        cur = m.durable
        for op in m.chain:
            try:
                op[1].result(timeout=60)
            except StoreError:
                failed = True
                self.failures += 1
                continue
            if op[0] == "turn":
                assert (cur is None and op[2] is None) or np.array_equal(cur, op[2]), f"{sid}: turn onto another history"
                cur = op[3]
            else:
                new = dropped(cur, op[2], op[3])
                assert new is not None or cur is None, f"{sid}: a drop of [{op[2]}, {op[3]}) succeeded on {cur.shape[2]} rows"
                cur = new
        m.durable, m.chain = cur, []
        info = self.store.lookup(sid)
        if m.durable is None:
            assert info is None, f"{sid} exists but no commit of it succeeded"
        else:
            assert info is not None, f"{sid} was lost"
            assert info.kv_valid, f"{sid} lost its KV although nothing damaged it"
            assert info.num_tokens == m.durable.shape[2], (sid, info.num_tokens, m.durable.shape[2])
        return failed

    def fresh(self, n):
        self.seed += 1
        return np.random.default_rng(self.seed).standard_normal((L, 2, n, K, D)).astype(np.float32)

    # ---- rules ---------------------------------------------------------------------------------
    @rule(sid=st.sampled_from(SIDS), n=st.integers(1, 9), device=st.booleans())
    def append(self, sid, n, device):
        m = self.models[sid]
        old = m.latest
        start = 0 if old is None else old.shape[2]
        if start + n > MAX_TOKENS:
            return
        new = self.fresh(n)
        try:
            for layer in range(L):
                self.store.save_layer(sid, layer, new[layer], start)
            full = new if old is None else np.concatenate([old, new], axis=2)
            fut = self.store.commit_turn(sid, ids_of(full))
        except StoreError as e:
            # Only when this turn's own queued save failed (an injected fault: a one-line DiskFull /
            # TurnFailed), an earlier commit failed in the background (the history went back), or the
            # host tier is full of sessions with work in flight (a middle drop_range holds a session
            # twice there until its copy is written): `BudgetError`, nothing saved.
            self.store.abort_turn(sid) if self.store.lookup(sid) is not None else None
            own = isinstance(e, (DiskFull, TurnFailed)) and "the new turn" in str(e)
            refused = type(e) is BudgetError
            STATS["refused"] += refused
            assert self.settle(sid) or own or refused, f"{sid}: save refused with no failed commit: {e!r}"
            self.failures += own
            return
        m.chain.append(("turn", fut, old, new if old is None else np.concatenate([old, new], axis=2)))

    @rule(sid=st.sampled_from(SIDS), n=st.integers(1, 6))
    def aborted_turn(self, sid, n):
        m = self.models[sid]
        old = m.latest
        if old is None:
            return
        try:
            self.store.save_layer(sid, 0, self.fresh(n)[0], old.shape[2])
        except StoreError:
            pass
        if self.store.lookup(sid) is not None:
            self.store.abort_turn(sid)

    @rule(sid=st.sampled_from(SIDS), k=st.integers(0, 6))
    def truncate(self, sid, k):
        self._drop(sid, 0, k, front=True)

    @rule(sid=st.sampled_from(SIDS), use=st.sampled_from(["sink", "tail", "middle"]), a=st.integers(0, 6),
          n=st.integers(0, 12))
    def drop_range(self, sid, use, a, n):
        old = self.models[sid].latest
        if old is None:
            return
        size = old.shape[2]
        if use == "sink":  # keep ``a`` attention-sink rows, drop the next ``n``
            self._drop(sid, min(a, size), min(a + n, size))
        elif use == "tail":  # longest-common-prefix reuse: keep ``size - n`` rows
            self._drop(sid, max(0, size - n), size)
        else:
            lo = min(a * 3, size)
            self._drop(sid, lo, min(lo + n, size))

    def _drop(self, sid, a, b, front=False):
        m = self.models[sid]
        old = m.latest
        if old is None or b > old.shape[2]:
            return
        try:
            fut = self.store.truncate_front(sid, b) if front else self.store.drop_range(sid, a, b)
        except BudgetError:
            return  # a middle drop needs the session twice in the host tier: refused, nothing changed
        except (LayoutMismatch, UnknownSession):
            assert self.settle(sid)
            return
        m.chain.append(("drop", fut, a, b))

    @rule(sid=st.sampled_from(SIDS), layer=st.integers(0, L - 1), pad=st.booleans())
    def load(self, sid, layer, pad):
        m = self.models[sid]
        try:
            got = np.asarray(self.store.load_layer(sid, layer, pad_to=MAX_TOKENS + 4 if pad else None))
        except UnknownSession:
            assert m.durable is None, f"{sid} vanished"
            return
        ok = False
        for state in m.states():
            if state is None:
                continue
            n = state.shape[2]
            if (got.shape[1] == n or pad) and np.array_equal(got[:, :n], state[layer]) and not got[:, n:].any():
                if pad or got.shape[1] == n:
                    ok = True
                    break
        assert ok, f"{sid} layer {layer}: served rows match no state the model allows"

    @rule(op=st.sampled_from(["chunk_write", "resize", "manifest"]), kind=st.sampled_from(["ENOSPC", "EIO"]),
          after=st.integers(0, 4))
    def inject(self, op, kind, after):
        self.store.disk.faults.add(op, kind, after=after)

    @rule(after=st.integers(0, 2))
    def inject_reclaim(self, after):
        """EIO in a deletion of a session's dead front (retried by its next manifest; nothing is lost)."""
        self.store.disk.faults.add("reclaim", "EIO", after=after)

    @rule(sid=st.sampled_from(SIDS))
    def settle_one(self, sid):
        self.settle(sid)

    @rule(order=st.permutations(SIDS))
    def hint(self, order):
        self.store.policy.set_future(order[:1])

    @precondition(lambda self: hasattr(self, "store"))
    @rule()
    def settle_all(self):
        for sid in SIDS:
            self.settle(sid)
        try:
            self.store.flush()
        except StoreError:
            pass  # failures already seen through their futures
        self.check_quiet()

    def check_quiet(self):
        self.store.disk.faults.clear()
        self.store.flush() if False else None
        acc = self.store.accounting()
        assert acc == {"device": 0, "host": 0, "disk": 0} or any(self.models[s].chain for s in SIDS), acc

    @invariant()
    def budgets_held(self):
        if hasattr(self, "store"):
            used = self.store.usage()
            for tier, cap in self.store.budget.items():
                assert cap is None or used[tier] <= cap, (tier, used)
            assert not self.bg_errors, self.bg_errors[:3]

    def teardown(self):
        if hasattr(self, "store"):
            self.stop.set()
            self.bg.join()
            self.store.disk.faults.clear()
            for sid in SIDS:
                self.settle(sid)
            try:
                self.store.flush()
            except StoreError:
                pass
            assert self.store.accounting() == {"device": 0, "host": 0, "disk": 0}, self.store.accounting()
            # the dead front is gone from the disk (a reclaim that an injected fault made fail is retried
            # by the session's next manifest, which may not have come) and not counted
            if not self.store.stats.reclaim_failures:
                for sid in self.store.sessions():
                    info = self.store.lookup(sid)
                    front = self.store._core.sessions[sid].offset // B if info.kv_valid else 0
                    blocks = {int(k.split("/")[3].split(".")[3]) // (B // C) for k in self.store.disk.list_keys()
                              if k.startswith(f"s/{sid}/kv/c.")}
                    assert not any(b < front for b in blocks), (sid, front, sorted(blocks))
                    assert self.store._core.sessions[sid].disk_lo == front
                STATS["fronts_checked"] += 1
            # every session the model knows is there with exactly its bytes
            for sid, m in self.models.items():
                if m.durable is not None:
                    for layer in range(L):
                        np.testing.assert_array_equal(np.asarray(self.store.load_layer(sid, layer)), m.durable[layer])
            assert self.store.sessions() == sorted(s for s, m in self.models.items() if m.durable is not None)
            STATS["examples"] += 1
            STATS["failed_commits"] += self.failures
            STATS["faults"] += sum(self.store.disk.faults.injected.values())
            STATS["reclaim_faults"] += self.store.disk.faults.injected["reclaim"]
            STATS["reclaimed_bytes"] += self.store.stats.bytes_reclaimed["disk"]
            self.store.close()


STATS = {"examples": 0, "failed_commits": 0, "faults": 0, "refused": 0, "fronts_checked": 0, "reclaim_faults": 0,
         "reclaimed_bytes": 0}


def teardown_module(module):
    print(f"\nstore state machine: {STATS}")
    # the faults rules must have fired: a machine whose injections never hit tests nothing
    assert STATS["faults"] > 0 and STATS["failed_commits"] > 0, STATS
    assert STATS["reclaimed_bytes"] > 0 and STATS["fronts_checked"] > 0, STATS  # the dead front was exercised


StoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck),
    derandomize=True, database=None, print_blob=True,
)
TestStoreMachine = StoreMachine.TestCase
