"""The ``memory`` kvstore (the engine's warm-up scratch store) with chunks of several layers: no deadlock
between the save worker's resize and TensorStore dropping a chunk it had stored, no Python buffer kept by
TensorStore after a write, and a save worker held just before a resize while the caller goes on."""

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import LAY, B, C, L, check, drain, quiet, rows, save  # noqa: E402

from jax_cachedattn.store import StoreConfig, TieredStore  # noqa: E402
from jax_cachedattn.store import chunks as chunks_mod  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def open_kind(tmp_path, kind, **kw):
    base = dict(token_block=B, disk_chunk=C, host_bytes=1 << 20, device_bytes=1 << 20)
    base.update(kw)
    if kind == "memory":
        return TieredStore(StoreConfig(kvstore={"driver": "memory"}, **base), LAY)
    return TieredStore(StoreConfig(root=str(tmp_path / "st"), **base), LAY)


def test_memory_round_trips_in_one_process_do_not_hang():
    """The loop that hung within 3 iterations (save worker in TensorStore's resize holding the GIL, a
    TensorStore thread holding the memory kvstore's mutex while dropping a stored chunk that referenced
    a Python buffer, waiting for the GIL). Run in a child so a hang fails the test instead of the suite."""
    code = textwrap.dedent("""
        import pathlib, sys, tempfile
        sys.path.insert(0, "tests/store")
        import test_store_basic as t
        for i in range(4):
            for dt in ("float32", "bfloat16"):
                with tempfile.TemporaryDirectory() as d:
                    t.test_round_trip_all_tiers_bit_exact(pathlib.Path(d), "memory", dt)
        print("done", i + 1)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("8 memory-kvstore round trips did not finish in 240 s (the save worker deadlocks)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done 4" in r.stdout


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_tensorstore_keeps_no_python_buffer_after_a_chunk_write(tmp_path, kind, monkeypatch):
    """Every buffer a chunk write packs (the G layers' rows) is freed once the write is committed:
    TensorStore copied it. (Kept by reference, the memory kvstore held it as the stored chunk and freed
    it under its own mutex: the deadlock above.)"""
    packed, orig = [], chunks_mod.aligned_empty

    def recording(*a, **kw):
        arr = orig(*a, **kw)
        packed.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(chunks_mod, "aligned_empty", recording)
    st = open_kind(tmp_path, kind, disk_chunk=B)  # a block's write is one whole chunk: TensorStore could
    assert st.disk.chunk_layers == L > 1  # reference it; one chunk holds every layer: the packed path
    x = rows(21, 1)
    save(st, "a", x[:, :, :13], 0)
    st.commit_turn("a", np.arange(13)).result()
    save(st, "a", x[:, :, 13:], 13)
    st.commit_turn("a", np.arange(21)).result()
    drain(st)
    gc.collect()
    assert len(packed) >= 3  # block 0 (full), block 1's partial tail at the first commit, and later ones
    alive = sum(r() is not None for r in packed)
    assert alive == 0, f"{alive} of {len(packed)} packed chunk buffers still referenced after their commits"
    st.evict("a", "host")
    check(st, "a", x, turn_no=2)
    quiet(st)
    st.close()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_save_worker_held_before_a_resize_while_the_caller_goes_on(tmp_path, kind):
    """The save worker parks just before it grows "a"'s array; meanwhile the caller reads "a"'s layers
    whose saves ran from the host tier (every row the session holds, bit-exact) and queues "a"'s commit and a whole turn of "b", and nothing is committed
    early. Released, both turns commit and read back bit-exact from disk."""
    st = open_kind(tmp_path, kind)
    x, y = rows(21, 2), rows(9, 3)
    save(st, "a", x[:, :, :5], 0)
    st.commit_turn("a", np.arange(5)).result()  # block 0's partial tail written: "a" has 1 block on disk
    save(st, "b", y[:, :, :3], 0)
    st.commit_turn("b", np.arange(3)).result()
    drain(st)
    h = st.hooks.hold("save.resize", sid="a")
    save(st, "a", x[:, :, 5:], 5)  # fills block 0 (no resize) then block 1 (grow to 2 blocks): held
    h.wait_reached()  # in the save of the group's last layer, which completes the chunk of every layer
    for layer in range(L - 1):  # layers whose saves ran are read from the host tier: the rows the
        got = np.asarray(st.load_layer("a", layer, pad_to=24))  # session had (the turn is not published)
        n = st.lookup("a").num_tokens
        assert n in (5, 21)
        np.testing.assert_array_equal(got[:, :n], x[layer][:, :n])
        assert not got[:, n:].any()
    fa = st.commit_turn("a", np.arange(21))
    save(st, "b", y[:, :, 3:], 3)
    fb = st.commit_turn("b", np.arange(9))
    assert not fa.done() and not fb.done()
    assert st.disk.capacity_blocks("a") == 1  # not grown yet
    h.release()
    fa.result(timeout=60)
    fb.result(timeout=60)
    drain(st)
    assert st.disk.capacity_blocks("a") == 3
    for sid in ("a", "b"):
        st.evict(sid, "device")
        st.evict(sid, "host")
        assert st.lookup(sid).tier == "disk"
    check(st, "a", x, turn_no=2)
    check(st, "b", y, turn_no=2)
    quiet(st)
    st.close()
