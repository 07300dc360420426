"""Writer process for test_store_crash: appends turns to a few sessions until it is killed; prints
``durable <sid> <turn>`` once a turn's manifest is durable (from the committer thread)."""

import sys
import threading

import numpy as np

from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

L, K, D, B = 3, 2, 4, 8
SESSIONS = ["s0", "s1", "s2"]


def layout():
    return KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype="float32", fingerprint="crash")


def config(root):
    return StoreConfig(root=root, host_bytes=1 << 22, token_block=B, disk_chunk=2)


def count(sid_num: int, turn: int) -> int:
    return 3 + (turn * 7 + sid_num * 5) % 13


def expected(sid_num: int, layer: int, p0: int, p1: int) -> np.ndarray:
    p = np.arange(p0, p1, dtype=np.float32)
    base = sid_num * 10000 + p * 4 + layer * 0.5
    out = np.empty((2, p1 - p0, K, D), np.float32)
    out[0] = base[:, None, None] + np.arange(K * D, dtype=np.float32).reshape(K, D) / 64
    out[1] = -out[0]
    return out


def main(root: str) -> None:
    store = TieredStore(config(root), layout())
    out = threading.Lock()

    def report(sid, fut):
        if fut.exception() is None:
            with out:
                print(f"durable {sid} {fut.result()}", flush=True)

    print("ready", flush=True)
    turn = 0
    while True:
        for i, sid in enumerate(SESSIONS):
            info = store.lookup(sid)
            n, t = (0, 0) if info is None else (info.num_tokens, info.turn)
            c = count(i, t + 1)
            for layer in range(L):
                store.save_layer(sid, layer, expected(i, layer, n, n + c), n)
            store.commit_turn(sid, np.arange(n + c) % 997).add_done_callback(lambda f, sid=sid: report(sid, f))
        turn += 1


if __name__ == "__main__":
    main(sys.argv[1])
