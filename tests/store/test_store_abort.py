"""`abort_turn`: a turn given up on the engine's side leaves the session at its last committed turn."""

import numpy as np
import pytest

from jax_cachedattn.store import DiskFull, StoreConfig, TieredStore, KVLayout

L, K, D, B = 3, 2, 4, 8
LAY = KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype="float32", fingerprint="abort")
BLK = B * LAY.bytes_per_token_layer


def rows(n, seed):
    return np.random.default_rng(seed).standard_normal((L, 2, n, K, D)).astype(np.float32)


def open_store(tmp_path):
    return TieredStore(StoreConfig(root=str(tmp_path / "st"), token_block=B, host_bytes=1 << 20, device_bytes=1 << 20), LAY)


def save(st, sid, x, start):
    for layer in range(L):
        st.save_layer(sid, layer, x[layer], start)


def check(st, sid, want):
    info = st.lookup(sid)
    assert info.num_tokens == want.shape[2]
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(st.load_layer(sid, layer)), want[layer])


def drain(st):
    """Wait until the save worker and the committer ran everything queued so far."""
    st._wb.worker.submit(lambda: None).result()
    st._wb.committer.submit(lambda: None).result()


@pytest.mark.parametrize("held", [False, True])
def test_abort_turn_goes_back_to_last_committed_turn(tmp_path, held):
    st = open_store(tmp_path)
    a = rows(11, 1)
    save(st, "s", a, 0)
    st.commit_turn("s", np.arange(11)).result()
    host_before = st.usage()["host"]
    # held: the turn's first save is parked at its start, the others queued behind it, when it is aborted
    h = st.hooks.hold("save.start", sid="s") if held else None
    save(st, "s", rows(9, 2), 11)
    if h is None:
        drain(st)  # the saves ran: the host tier holds the turn's blocks
    else:
        h.wait_reached()
    st.abort_turn("s")
    if h is not None:
        h.release()
    drain(st)
    assert st.accounting() == {"device": 0, "host": 0, "disk": 0}
    info = st.lookup("s")
    assert (info.num_tokens, info.turn) == (11, 1)
    np.testing.assert_array_equal(info.token_ids, np.arange(11))
    check(st, "s", a)
    assert st.usage()["host"] == host_before  # the aborted turn's blocks were given back
    b = rows(6, 3)  # the engine retries the turn with other rows: they continue the committed ones
    save(st, "s", b, 11)
    st.commit_turn("s", np.arange(17)).result()
    st.flush()
    want = np.concatenate([a, b], axis=2)
    check(st, "s", want)
    st.close()
    st = open_store(tmp_path)
    assert st.lookup("s").turn == 2
    check(st, "s", want)
    st.close()


def test_abort_first_turn_forgets_the_session(tmp_path):
    st = open_store(tmp_path)
    save(st, "new", rows(5, 4), 0)
    st.abort_turn("new")
    assert st.lookup("new") is None and st.sessions() == []
    drain(st)  # queued saves give their reservations back when they run (and do nothing else)
    assert st.usage() == {"device": 0, "host": 0, "disk": 0}
    x = rows(4, 5)
    save(st, "new", x, 0)  # the id can be used again from 0
    st.commit_turn("new", np.arange(4)).result()
    check(st, "new", x)
    st.abort_turn("new")  # nothing open: no-op
    check(st, "new", x)
    st.close()


def test_flush_raises_a_failed_commit_once(tmp_path, monkeypatch):
    from jax_cachedattn.store import disk as diskmod

    st = open_store(tmp_path)
    a = rows(5, 6)
    save(st, "f", a, 0)
    st.commit_turn("f", np.arange(5)).result()
    monkeypatch.setattr(diskmod.DiskTier, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    save(st, "f", rows(3, 7), 5)
    fut = st.commit_turn("f", np.arange(8))
    assert isinstance(fut.exception(), DiskFull)  # the commit's future carries the error
    monkeypatch.undo()
    with pytest.raises(DiskFull):  # and flush raises it
        st.flush()
    st.flush()  # reported once
    assert st.lookup("f").turn == 1
    check(st, "f", a)
    st.close()
