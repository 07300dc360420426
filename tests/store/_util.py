"""Helpers shared by the store's fault tests."""

import os
import subprocess

import numpy as np
import pytest

from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

L, K, D, B, C = 3, 2, 4, 8, 2
LAY = KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype="float32", fingerprint="faults")
BLK = B * LAY.bytes_per_token_layer  # bytes of one block of one layer
ZERO = {"device": 0, "host": 0, "disk": 0}


def cfg(root, **kw):
    # disk chunks of 2 tokens inside blocks of 8: every store test runs writes and reads of part of a block
    base = dict(token_block=B, disk_chunk=C, host_bytes=1 << 20, device_bytes=1 << 20)
    base.update(kw)
    return StoreConfig(root=str(root), **base)


def open_store(root, lay=LAY, **kw):
    faults = kw.pop("faults", None)
    return TieredStore(cfg(root, **kw), lay, faults=faults)


def rows(n, seed):
    return np.random.default_rng(seed).standard_normal((L, 2, n, K, D)).astype(np.float32)


def save(st, sid, x, start):
    for layer in range(L):
        st.save_layer(sid, layer, x[layer], start)


def turn(st, sid, x, start):
    save(st, sid, x, start)
    return st.commit_turn(sid, np.arange(start + x.shape[2]) % 1000)


def check(st, sid, want, turn_no=None):
    info = st.lookup(sid)
    assert info is not None and info.kv_valid
    assert info.num_tokens == want.shape[2], (info.num_tokens, want.shape[2])
    if turn_no is not None:
        assert info.turn == turn_no
    for layer in range(L):
        got = np.asarray(st.load_layer(sid, layer, pad_to=want.shape[2] + 3))
        np.testing.assert_array_equal(got[:, : want.shape[2]], want[layer])
        assert not got[:, want.shape[2]:].any()


def drain(st):
    """Wait until the save worker and then the committer ran everything queued so far."""
    st._wb.worker.submit(lambda: None).result()
    st._wb.committer.submit(lambda: None).result()
    st._wb.worker.submit(lambda: None).result()


def settle_moves(st):
    """Wait for every promotion and demotion in flight (call with no hook holding one): a load served
    from a promotion's published layers returns before the promotion installs its host table, so its
    reservation is briefly held by no table."""
    with st._core.lock:
        futs = [s.promoting.done for s in st._core.sessions.values() if s.promoting is not None]
        futs += list(st._core.holding)
    for f in futs:
        try:
            f.result()
        except BaseException:  # noqa: BLE001 - reported by the promotion's own reader
            pass


def quiet(st):
    """Drain, let promotions and demotions end, then no budget counts a byte that no table holds."""
    drain(st)
    settle_moves(st)
    assert st.accounting() == ZERO, st.accounting()
    for tier, cap in st.budget.items():
        assert cap is None or st.usage()[tier] <= cap


def tmpfs(tmp_path, size: str):
    """A real tmpfs of ``size`` (e.g. ``"512k"``) mounted under ``tmp_path`` for a fixture to yield from;
    skips with the reason printed when not root or when mounting fails; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; running as uid %d" % os.geteuid())
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
