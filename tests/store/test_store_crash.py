"""SIGKILL a writer at random points while it saves; every session must reopen at a whole turn, at or
after the last turn the writer saw reported durable. The kill waits on the writer's own reports (a
random number of durable turns, 0 included), not on time, so the test means the same under any load."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _crash_writer as W  # noqa: E402

from jax_cachedattn.store import TieredStore  # noqa: E402

KILLS = 20  # make test-all; make test runs 6 (a writer process per kill costs ~2.5 s of CPU, mostly importing jax)


def _verify(root: str) -> dict[str, int]:
    store = TieredStore(W.config(root), W.layout())
    turns = {}
    try:
        for i, sid in enumerate(W.SESSIONS):
            info = store.lookup(sid)
            if info is None:
                turns[sid] = 0
                continue
            assert info.kv_valid, f"{sid} lost its KV"
            want = sum(W.count(i, t) for t in range(1, info.turn + 1))
            assert info.num_tokens == want, f"{sid}: {info.num_tokens} tokens at turn {info.turn}, expected {want}"
            np.testing.assert_array_equal(info.token_ids, np.arange(want) % 997)
            for layer in range(W.L):
                got = np.asarray(store.load_layer(sid, layer))
                np.testing.assert_array_equal(got, W.expected(i, layer, 0, want))
            turns[sid] = info.turn
    finally:
        store.close()
    return turns


@pytest.mark.parametrize("kills,seed", [(6, 1234), pytest.param(KILLS, 4321, marks=pytest.mark.slow)])
def test_sigkill_writer_reopens_at_whole_turns(tmp_path, kills, seed):
    root = str(tmp_path / "store")
    rng = random.Random(seed)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    prev = {sid: 0 for sid in W.SESSIONS}
    progressed = waited = 0
    for k in range(kills):
        proc = subprocess.Popen([sys.executable, W.__file__, root], stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "ready"
        reported = dict(prev)
        durable = rng.randrange(0, 8)  # durable turns to see reported before the kill (the writer runs on)
        for _ in range(durable):
            word, sid, t = proc.stdout.readline().split()
            assert word == "durable"
            reported[sid] = max(reported[sid], int(t))
        proc.kill()  # SIGKILL
        proc.wait()
        turns = _verify(root)
        for sid in W.SESSIONS:
            assert turns[sid] >= reported[sid], f"{sid}: turn {reported[sid]} was reported durable, reopened at {turns[sid]}"
        progressed += sum(turns.values()) > sum(prev.values())
        waited += durable > 0
        prev = turns
    assert progressed >= waited  # every kill after a durable report found the store further on
