#!/usr/bin/env python
"""Torture the tiered KV store: randomized fault schedules against a model; count what goes wrong.

Each schedule runs on one store root (a ``file`` kvstore, or with ``--kvstore memory`` TensorStore's
in-memory kvstore, the engine's warm-up scratch store) that lives across schedules: two driver
threads, each owning its own sessions, issue turns (prefill-sized or decode-sized saves), aborted
turns, truncations, drops of a range (attention sink + middle, tail), deletions and loads without waiting for commits, while a third thread keeps
prefetching and evicting and the schedule injects ENOSPC/EIO into chunk writes, resizes, dead-front deletions and
manifests. At the end of a schedule every commit's fate is settled against the model (a failed
turn fails every later one and leaves the last durable turn), every row of every session is read
and compared, and the budgets' accounting must be exact; some schedules close and reopen the store
(recovery) and check again. Every ``--kill-every`` schedules a child process runs random turns on
the root and is SIGKILLed at a random moment; the reopened store must hold whole turns only. A
``memory`` store lives and dies with its process, so there it is never reopened nor SIGKILLed (the
run says so); every other fault is injected alike.

Row ``i`` of a session is a function of its token id (``value(sid, id, layer)``, ids never reused), so
any served row can be checked without knowing which turn produced it.

Prints: schedules run, faults injected, rows served, wrong rows served, sessions lost (with the
reason), leaked bytes (budget accounting off, plus chunk files before a session's front that the disk
budget no longer counts, or that a reopen left), dead bytes reclaimed. Exit status 1 if any row was wrong, any session lost or any byte leaked.

  python scripts/torture_store.py --minutes 10 --seed 1
  python scripts/torture_store.py --seconds 5 --seed 0      (the short run inside the test suite)
  python scripts/torture_store.py --seconds 60 --seed 3 --kvstore memory
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402

from jax_cachedattn.store import (  # noqa: E402
    BudgetError, KVLayout, StoreConfig, StoreError, TieredStore, UnknownSession,
)
from jax_cachedattn.store.faults import FaultInjector  # noqa: E402

L, K, D, B, C = 2, 1, 8, 8, 2  # C: tokens per disk chunk (4 chunks per block); chunks of 1 or 2 layers
LAY = KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype="float32", fingerprint="torture")
BLK = B * LAY.bytes_per_token_layer
MAX_TOKENS = 80
SIDS = [f"s{i}" for i in range(6)]  # driver 0 owns s0..s2, driver 1 s3..s5


def value(sid: str, ids: np.ndarray, layer: int) -> np.ndarray:
    """[2, n, K, D]: the rows of tokens ``ids`` of ``sid`` in ``layer`` (exact in float32)."""
    base = ((int(sid[1:]) * 7919 + ids.astype(np.int64) * 31 + layer * 3) % 65536).astype(np.float32)
    k = base[:, None, None] + np.arange(K * D, dtype=np.float32).reshape(K, D) / 64
    return np.stack([k, -k])


# Recent operations per session (driver, background thread, futures that resolved), printed with a wrong row.
EVENTS: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=32))
T0 = time.monotonic()


def event(sid: str, what: str) -> None:
    EVENTS[sid].append(f"{time.monotonic() - T0:9.3f} {threading.current_thread().name:>12.12} {what}")


def token_of(sid: str, base: float, layer: int) -> int:
    """The token id (mod 65536) whose row has this base value (31 is odd: invertible mod 2**16)."""
    return int(((int(base) - int(sid[1:]) * 7919 - layer * 3) * pow(31, -1, 65536)) % 65536)


def explain(store, sid: str, lay: int, got: np.ndarray, best, tier_before) -> None:
    """Everything one wrong row needs for a diagnosis: which rows, what they hold, the session's record
    in the store (tier, turn, epoch, published saves, the turns in its log), and its recent events."""
    want = value(sid, best, lay) if best is not None and len(best) == got.shape[1] else None
    bad = [] if want is None else np.flatnonzero(~np.all(got == want, axis=(0, 2, 3))).tolist()
    print(f"  wrong rows {bad} of {got.shape[1]} (tier before the load: {tier_before}, after: "
          f"{getattr(store.lookup(sid), 'tier', None)})", flush=True)
    for i in bad[:8]:
        g = float(got[0, i, 0, 0])
        print(f"    row {i}: got {'zeros' if not got[:, i].any() else f'token {token_of(sid, g, lay)} (mod 65536)'}, "
              f"want token {int(best[i])}", flush=True)
    core = store._core
    with core.lock:
        x = core.sessions.get(sid)
        if x is not None:
            B = core.B
            f, nb = x.offset // B, -(-x.end // B)
            print(f"  store: offset {x.offset} end {x.end} turn {x.turn} epoch {x.epoch} layer_ver {x.layer_ver} "
                  f"durable {None if x.durable is None else (x.durable.turn, x.durable.offset, x.durable.end)} "
                  f"log {[(t.kind, t.seq, t.live) for t in x.log]} open {x.open is not None} "
                  f"host {None if x.host is None else x.host.covers(f, nb)} "
                  f"device {None if x.device is None else x.device.covers(f, nb)} disk_lo {x.disk_lo} "
                  f"stale copies refused {core.stats.stale_copies}", flush=True)
    for e in list(EVENTS[sid]):
        print("    " + e, flush=True)


CHUNK_LAYERS = [L]  # layers per disk chunk (--chunk-layers): all of them by default, as a new small-model store
KVSTORE = ["file"]  # --kvstore


def config(root: str) -> StoreConfig:
    where = {"kvstore": {"driver": "memory"}} if KVSTORE[0] == "memory" else {"root": root}
    return StoreConfig(token_block=B, disk_chunk=C, disk_chunk_layers=CHUNK_LAYERS[0],
                       host_bytes=L * 24 * BLK, device_bytes=L * 8 * BLK, **where)


def chunk_files(store, sid: str) -> list[tuple[str, int]]:
    """(name, bytes) of the chunk files of ``sid`` (a folder, or keys of the memory kvstore)."""
    root = store.disk.root
    if root is not None:
        d = os.path.join(root, "s", sid, "kv")
        out = []
        # TensorStore's file kvstore keeps a ``<key>.__lock`` file beside a chunk while it writes it; a chunk
        # can also go (a reclaim) between the listing and its size: neither is a chunk file on disk.
        for n in (os.listdir(d) if os.path.isdir(d) else []):
            if n.startswith("c.") and not n.endswith(".__lock"):
                try:
                    out.append((n, os.path.getsize(os.path.join(d, n))))
                except FileNotFoundError:
                    pass
        return out
    kv, prefix = store.disk.kv, f"s/{sid}/kv/c."
    out = []
    for k in kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + "/")).result():
        r = kv.read(k).result()
        if r.state == "value":
            out.append((k.decode()[len(prefix) - 2:], len(r.value)))
    return out


def dead_bytes(store, root: str, below: str) -> int:
    """Bytes of chunk files on disk before each session's ``below`` block: "lo" = the first block the
    disk budget counts (files there are a leak: deleted in the accounting, still on disk), "front" =
    the front of its history (after an open, which reclaims them, files there are a leak too)."""
    total = 0
    for sid, s in list(store._core.sessions.items()):
        lim = s.disk_lo if below == "lo" else (s.offset // B if s.kv_valid else 0)
        for n, size in chunk_files(store, sid):
            parts = n.split(".")
            if len(parts) == 6 and int(parts[3]) // (B // C) < lim:
                total += size
    return total


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.schedules = self.rows = self.wrong = self.leaked = self.kills = self.reopens = 0
        self.failed_turns = self.refused = self.drops = self.reclaimed = self.stale = 0
        self.lost: list[str] = []
        self.faults = 0

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)


def dropped(cur, a: int, b: int):
    """Token ids ``cur`` without ``[a, b)``; None when the range does not fit (the store refuses it)."""
    if cur is None or b > len(cur):
        return None
    return np.concatenate([cur[:a], cur[b:]])


class Model:
    """One session: durable token ids (None: absent) and the operations in flight, in order:
    ("turn", future, ids before, ids after) or ("drop", future, start, stop) (a truncation is
    ``("drop", f, 0, k)``)."""

    def __init__(self):
        self.durable: np.ndarray | None = None
        self.chain: list = []
        self.gen = 0  # bumps when the session starts again (ids never reused)
        self.next = 0  # the next token id (a tail drop does not make its ids free again)

    @property
    def latest(self):
        cur = self.durable
        for op in self.chain:
            cur = op[3] if op[0] == "turn" else dropped(cur, op[2], op[3])
        return cur

    def candidates(self) -> list:
        """States a load may see now: the durable state with any subset of the operations in flight
        applied in order (each succeeded or failed; a turn's rows are read before its commit resolves).
        A turn applies only onto the history it continued. Every operation in flight counts (a
        schedule's driver makes at most 13 steps, so a chain holds at most 12 when a load runs)."""
        states = {None if self.durable is None else tuple(self.durable.tolist())}
        for op in self.chain:
            nxt = set(states)
            for st in states:
                if op[0] == "turn":
                    if (st is None and len(op[2]) == 0) or (st is not None and st == tuple(op[2].tolist())):
                        nxt.add(tuple(op[3].tolist()))
                elif st is not None and op[3] <= len(st):
                    nxt.add(st[: op[2]] + st[op[3]:])
            states = nxt
        return [None if st is None else np.asarray(st, np.int64) for st in states]


def check_rows(store, sid, ids_options, tally, layer=None, where="") -> None:
    """Load ``sid`` (one layer or all) and compare with every allowed token id list."""
    for lay in ([layer] if layer is not None else range(L)):
        info = store.lookup(sid)
        tier_before = None if info is None else info.tier
        try:
            got = np.asarray(store.load_layer(sid, lay))
        except BudgetError:  # the host tier is full of sessions with turns in flight: refused, not wrong
            tally.add(refused=1)
            return
        except UnknownSession:
            if any(o is not None for o in ids_options):
                if all(o is not None for o in ids_options):
                    tally.lost.append(f"{sid}: unknown to the store {where}")
            return
        ok = any(o is not None and got.shape[1] == len(o) and np.array_equal(got, value(sid, o, lay)) for o in ids_options)
        tally.add(rows=got.shape[1])
        if not ok:
            best = min((o for o in ids_options if o is not None), key=lambda o: abs(len(o) - got.shape[1]), default=None)
            wrong = got.shape[1] if best is None or len(best) != got.shape[1] else int(
                (~np.all(got == value(sid, best, lay), axis=(0, 2, 3))).sum())
            tally.add(wrong=wrong)
            print(f"WRONG ROWS {where}: {sid} layer {lay}: {wrong} of {got.shape[1]}", flush=True)
            explain(store, sid, lay, got, best, tier_before)
            if os.environ.get("TORTURE_DEBUG"):
                print("  got bases", got[0, :, 0, 0].astype(int).tolist(), flush=True)
                for o in ids_options:
                    if o is not None:
                        print("  want", value(sid, o, lay)[0, :, 0, 0].astype(int).tolist(), o.tolist(), flush=True)


class Driver:
    def __init__(self, store, sids, models, rng, tally):
        self.store, self.sids, self.models, self.rng, self.tally = store, sids, models, rng, tally

    def settle(self, sid) -> bool:
        """Resolve the session's operations in flight: apply those that succeeded to the durable state."""
        m = self.models[sid]
        failed = False
        cur = m.durable
        for op in m.chain:
            try:
                op[1].result(timeout=120)
                event(sid, f"settled: {op[0]} {len(op[3]) if op[0] == 'turn' else op[2:]} ok")
            except StoreError as e:
                event(sid, f"settled: {op[0]} failed: {type(e).__name__}")
                failed = True
                self.tally.add(failed_turns=1)
                continue
            except Exception as e:  # noqa: BLE001 - a future must fail with a one-line StoreError
                failed = True
                self.tally.lost.append(f"{sid}: an operation's future raised {type(e).__name__}, not a StoreError: {e}")
                continue
            if op[0] == "turn":
                before = op[2]
                if (cur is None and len(before)) or (cur is not None and not np.array_equal(cur, before)):
                    self.tally.lost.append(f"{sid}: a turn saved onto another history than the one it continued")
                cur = op[3]
            else:
                new = dropped(cur, op[2], op[3])
                if new is None and cur is not None:
                    self.tally.lost.append(f"{sid}: a drop of [{op[2]}, {op[3]}) succeeded on {len(cur)} tokens")
                cur = new
        m.durable, m.chain = cur, []
        return failed

    def turn(self, sid, decode: bool):
        st, m, rng = self.store, self.models[sid], self.rng
        old = m.latest
        if old is None:
            m.gen += 1
            old_ids, start = np.zeros(0, np.int64), 0
        else:
            old_ids, start = old, len(old)
        n = int(rng.integers(1, 6 if decode else 24))
        if start + n > MAX_TOKENS:  # over the context: drop the oldest half, or all but 4 sink tokens of it
            return self.drop(sid, 0, start // 2) if rng.random() < 0.5 else self.drop(sid, 4, 4 + start // 2)
        first = max(m.gen * 100000, m.next)
        if first % 100000 > 90000:
            m.gen += 1
            first = m.gen * 100000
        m.next = first + n
        ids = np.arange(first, first + n)
        try:
            pieces = [(0, n)] if not decode else [(i, min(n, i + 2)) for i in range(0, n, 2)]
            for lo, hi in pieces:
                for layer in range(L):
                    st.save_layer(sid, layer, value(sid, ids[lo:hi], layer), start + lo)
            fut = st.commit_turn(sid, np.concatenate([old_ids, ids]))
            event(sid, f"turn rows [{start}, {start + n}) ids {first}.. {'decode' if decode else 'prefill'}: committed in memory")
        except StoreError as e:
            event(sid, f"turn rows [{start}, {start + n}) refused: {type(e).__name__}")
            if st.lookup(sid) is not None:
                st.abort_turn(sid)
            self.settle(sid)  # an earlier turn failed (the history went back) or this turn's save did
            return
        m.chain.append(("turn", fut, old_ids, np.concatenate([old_ids, ids])))

    def drop(self, sid, a, b):
        """``truncate_front`` for a drop of ``[0, b)``, else ``drop_range``."""
        m = self.models[sid]
        old = m.latest
        if old is None or not a <= b <= len(old):
            return
        try:
            fut = self.store.truncate_front(sid, b) if a == 0 else self.store.drop_range(sid, a, b)
        except BudgetError:  # a middle drop needs the session twice in the host tier: refused, nothing changed
            self.tally.add(refused=1)
            return
        except (StoreError, UnknownSession):
            self.settle(sid)
            return
        m.chain.append(("drop", fut, a, b))
        event(sid, f"drop [{a}, {b}) of {len(old)}")
        self.tally.add(drops=1)

    def step(self):
        rng, st = self.rng, self.store
        sid = self.sids[int(rng.integers(len(self.sids)))]
        m = self.models[sid]
        r = rng.random()
        if r < 0.35:
            self.turn(sid, decode=False)
        elif r < 0.55:
            self.turn(sid, decode=True)
        elif r < 0.60:
            self.drop(sid, 0, int(rng.integers(0, 12)))
        elif r < 0.66 and m.latest is not None:  # attention sink + middle, a middle range, or the tail
            size, use = len(m.latest), rng.random()
            if use < 0.4:
                a = int(rng.integers(1, 5))
                self.drop(sid, min(a, size), min(size, a + int(rng.integers(1, 16))))
            elif use < 0.7:
                self.drop(sid, max(0, size - int(rng.integers(1, 12))), size)
            else:
                a = int(rng.integers(0, size + 1))
                self.drop(sid, a, int(rng.integers(a, size + 1)))
        elif r < 0.72 and m.latest is not None:  # a turn given up by the engine
            try:
                st.save_layer(sid, 0, value(sid, np.arange(3) + 99999, 0), len(m.latest))
                event(sid, f"give-up save layer 0 rows [{len(m.latest)}, {len(m.latest) + 3})")
            except StoreError as e:
                event(sid, f"give-up save refused: {type(e).__name__}")
            if st.lookup(sid) is not None:
                st.abort_turn(sid)
                event(sid, "abort_turn")
        elif r < 0.75 and m.latest is not None:
            try:
                st.delete(sid)
                event(sid, "delete")
            except UnknownSession:
                pass
            self.settle(sid)
            m.durable, m.chain = None, []
        else:
            opts = m.candidates()
            check_rows(st, sid, opts, self.tally, layer=int(rng.integers(L)), where="(during a schedule)")


def background(store, stop, rng, tally):
    while not stop.is_set():
        sid = SIDS[int(rng.integers(len(SIDS)))]
        try:
            if rng.random() < 0.5:
                store.prefetch(sid)
                event(sid, "prefetch")
            else:
                tier = ["host", "device"][int(rng.integers(2))]
                store.evict(sid, tier)
                event(sid, f"evict {tier}")
            used = store.usage()
            for tier, cap in store.budget.items():
                if cap is not None and used[tier] > cap:
                    tally.lost.append(f"budget exceeded: {tier} {used[tier]} > {cap}")
        except (UnknownSession, BudgetError):
            pass
        except StoreError as e:
            tally.lost.append(f"background: {e!r}")
        stop.wait(0.001)


def verify_all(store, models, tally, where) -> None:
    for sid in SIDS:
        m = models[sid]
        info = store.lookup(sid)
        if m.durable is None:
            if info is not None:
                tally.lost.append(f"{sid}: present {where} although no commit of it succeeded")
            continue
        if info is None:
            tally.lost.append(f"{sid}: lost {where} (model: {len(m.durable)} tokens)")
            m.durable = None
            continue
        if not info.kv_valid:
            tally.lost.append(f"{sid}: KV marked lost {where} with nothing damaged")
        if not np.array_equal(info.token_ids, m.durable):
            tally.lost.append(f"{sid}: token ids differ from the last durable turn {where}")
        check_rows(store, sid, [m.durable], tally, where=where)


def schedule(store, models, rng, tally, faults: FaultInjector) -> None:
    for _ in range(int(rng.integers(0, 3))):
        faults.add(str(rng.choice(["chunk_write", "resize", "manifest", "reclaim"])), str(rng.choice(["ENOSPC", "EIO"])),
                   after=int(rng.integers(0, 12)))
    stop = threading.Event()
    bg = threading.Thread(target=background, args=(store, stop, np.random.default_rng(int(rng.integers(1 << 30))), tally))
    drivers = [Driver(store, SIDS[:3], models, np.random.default_rng(int(rng.integers(1 << 30))), tally),
               Driver(store, SIDS[3:], models, np.random.default_rng(int(rng.integers(1 << 30))), tally)]
    steps = int(rng.integers(4, 14))

    def run(d):
        for _ in range(steps):
            d.step()

    threads = [threading.Thread(target=run, args=(d,)) for d in drivers]
    bg.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    bg.join()
    faults.clear()
    for d in drivers:
        for sid in d.sids:
            d.settle(sid)
    try:
        store.flush()
    except StoreError:
        pass  # every failure was seen through its turn's future
    acc = store.accounting()
    if any(acc.values()):
        tally.add(leaked=sum(abs(v) for v in acc.values()))
        print(f"LEAK: {acc}", flush=True)
    dead = dead_bytes(store, store.disk.root, "lo")
    if dead:
        tally.add(leaked=dead)
        print(f"LEAK: {dead} bytes of chunk files the disk budget no longer counts", flush=True)
    verify_all(store, models, tally, "after a schedule")


def child(root: str, seed: int) -> None:
    """Random turns on ``root`` until SIGKILLed (ids continue those on disk: rows stay checkable)."""
    store = TieredStore(config(root), LAY)
    models = {sid: Model() for sid in SIDS}
    for sid in SIDS:
        info = store.lookup(sid)
        if info is not None and info.kv_valid:
            models[sid].durable = np.asarray(info.token_ids, np.int64)
            models[sid].gen = int(info.token_ids.max()) // 100000 + 1 if len(info.token_ids) else 1
        elif info is not None:
            store.delete(sid)
    rng = np.random.default_rng(seed)
    store.disk.faults.add("chunk_write", "ENOSPC", prob=0.02, times=None)
    print("ready", flush=True)
    d = Driver(store, SIDS, models, rng, Tally())
    while True:
        d.step()


def kill_round(root: str, rng, tally, env) -> None:
    proc = subprocess.Popen([sys.executable, __file__, "--child", root, "--seed", str(int(rng.integers(1 << 30))),
                             "--chunk-layers", str(CHUNK_LAYERS[0])],
                            stdout=subprocess.PIPE, env=env, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        tally.lost.append("the child writer did not start")
        return
    time.sleep(float(rng.uniform(0.05, 1.0)))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tally.add(kills=1)


def reopen_check(root, tally) -> tuple[TieredStore, dict]:
    """Open after a kill: every session must hold whole turns whose rows match their token ids, and
    no chunk file before its front (the open deletes what the kill left)."""
    store = TieredStore(config(root), LAY)
    dead = dead_bytes(store, root, "front")
    if dead:
        tally.add(leaked=dead)
        print(f"LEAK: {dead} bytes of chunk files before a front after reopening", flush=True)
    models = {sid: Model() for sid in SIDS}
    for sid in SIDS:
        info = store.lookup(sid)
        if info is None:
            continue
        if not info.kv_valid:
            tally.lost.append(f"{sid}: KV lost after a SIGKILL")
            store.delete(sid)
            continue
        ids = np.asarray(info.token_ids, np.int64)
        models[sid].durable = ids
        models[sid].gen = int(ids.max()) // 100000 + 1 if len(ids) else 1
        check_rows(store, sid, [ids], tally, where="after a SIGKILL")
    return store, models


def close(store, tally) -> None:
    tally.add(reclaimed=store.stats.bytes_reclaimed["disk"], stale=store.stats.stale_copies)
    store.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="run time in minutes")
    p.add_argument("--seconds", type=float, default=None, help="run time in seconds (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    p.add_argument("--root", default=None, help="store folder (default: a new temporary folder, removed at the end)")
    p.add_argument("--kill-every", type=int, default=400, help="a SIGKILL round every N schedules (0: none)")
    p.add_argument("--reopen-every", type=int, default=10, help="close and reopen the store every N schedules")
    p.add_argument("--chunk-layers", type=int, default=L, choices=[d for d in range(1, L + 1) if L % d == 0],
                   help=f"layers per disk chunk (StoreConfig.disk_chunk_layers; default {L}: chunks span every layer)")
    p.add_argument("--kvstore", default="file", choices=["file", "memory"],
                   help="where the disk tier lives (memory: TensorStore's in-memory kvstore; no reopen, no SIGKILL)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    CHUNK_LAYERS[0] = args.chunk_layers
    KVSTORE[0] = args.kvstore
    if args.kvstore == "memory":
        if args.reopen_every or args.kill_every:
            print("memory kvstore: its data lives and dies with this process, so the store is never reopened and no "
                  "writer is SIGKILLed (--reopen-every and --kill-every ignored); every other fault is injected", flush=True)
        args.reopen_every = args.kill_every = 0
    if args.child:
        child(args.child, args.seed)
        return 0
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 1)
    own = args.root is None
    root = args.root or tempfile.mkdtemp(prefix="torture-store-")
    rng = np.random.default_rng(args.seed)
    random.seed(args.seed)
    tally = Tally()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    faults = FaultInjector(seed=args.seed)
    store = TieredStore(config(root), LAY, faults=faults)
    models = {sid: Model() for sid in SIDS}
    last = t0
    try:
        while time.monotonic() - t0 < seconds:
            schedule(store, models, rng, tally, faults)
            tally.add(schedules=1)
            if args.reopen_every and tally.schedules % args.reopen_every == 0:
                close(store, tally)
                store = TieredStore(config(root), LAY, faults=faults)
                tally.add(reopens=1)
                verify_all(store, models, tally, "after a reopen")
                dead = dead_bytes(store, root, "front")
                if dead:
                    tally.add(leaked=dead)
                    print(f"LEAK: {dead} bytes of chunk files before a front after reopening", flush=True)
            if args.kill_every and tally.schedules % args.kill_every == 0:
                tally.faults += sum(faults.injected.values())
                faults.injected = {k: 0 for k in faults.injected}
                close(store, tally)
                kill_round(root, rng, tally, env)
                store, models = reopen_check(root, tally)
                close(store, tally)
                store = TieredStore(config(root), LAY, faults=faults)
            if time.monotonic() - last > 30:
                last = time.monotonic()
                print(f"[{last - t0:.0f} s] schedules {tally.schedules}, rows served {tally.rows}, wrong {tally.wrong}, "
                      f"lost {len(tally.lost)}, leaked {tally.leaked}, stale copies refused {tally.stale + store.stats.stale_copies}",
                      flush=True)
    finally:
        try:
            close(store, tally)
        except StoreError:
            pass
        if own:
            shutil.rmtree(root, ignore_errors=True)
    tally.faults += sum(faults.injected.values())
    wall = time.monotonic() - t0
    print(f"seed {args.seed}, {args.kvstore} kvstore, {wall / 60:.1f} min ({wall:.0f} s), disk chunks of "
          f"{CHUNK_LAYERS[0]} layer(s) x {C} tokens")
    print(f"schedules run:       {tally.schedules}  (reopened {tally.reopens}x, SIGKILLed a writer {tally.kills}x)")
    print(f"faults injected:     {tally.faults}  (turns that failed: {tally.failed_turns})")
    print(f"drops of a range:    {tally.drops}  (truncate_front and drop_range, awaited by no one)")
    print(f"rows served:         {tally.rows}  (loads and drops refused by a full host budget: {tally.refused})")
    print(f"wrong rows served:   {tally.wrong}")
    print(f"sessions lost:       {len(tally.lost)}")
    for reason in tally.lost[:20]:
        print(f"  - {reason}")
    print(f"leaked bytes:        {tally.leaked}  (budget accounting, and chunk files before a front that the"
          " budget no longer counts or that an open left)")
    print(f"dead bytes reclaimed: {tally.reclaimed}")
    print(f"stale copies refused: {tally.stale}  (demotions device -> host whose rows a turn changed meanwhile"
          " inside the same blocks: served as wrong rows before the store checked Session.stamp)")
    return 1 if (tally.wrong or tally.lost or tally.leaked) else 0


if __name__ == "__main__":
    sys.exit(main())
