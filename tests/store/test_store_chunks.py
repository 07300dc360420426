"""Disk chunks that span several layers: the bytes in a chunk file, a partial tail rewritten without
touching other rows, bytes written per turn, reopening, reclaiming a dead front and recovery on them."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import C, K, D, check, drain, quiet  # noqa: E402

from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore  # noqa: E402
from jax_cachedattn.store.faults import FaultInjector  # noqa: E402

B = 8
L4 = KVLayout(num_layers=4, kv_heads=K, head_dim=D, dtype="float32", fingerprint="chunks")
BPTL = L4.bytes_per_token_layer  # bytes of one token of one layer (K and V)


def open4(root, G, faults=None, **kw):
    cfg = StoreConfig(root=str(root), token_block=B, disk_chunk=C, disk_chunk_layers=G, host_bytes=1 << 20,
                      device_bytes=0, **kw)
    return TieredStore(cfg, L4, faults=faults)


def rows4(n, seed):
    return np.random.default_rng(seed).standard_normal((4, 2, n, K, D)).astype(np.float32)


def save4(st, sid, x, start, order=range(4)):
    for layer in order:
        st.save_layer(sid, layer, x[layer], start)


def check4(st, sid, want):
    for layer in range(4):
        got = np.asarray(st.load_layer(sid, layer, pad_to=want.shape[2] + 3))
        np.testing.assert_array_equal(got[:, : want.shape[2]], want[layer])
        assert not got[:, want.shape[2]:].any()


def kvdir(root, sid="a"):
    return os.path.join(root, "s", sid, "kv")


def chunk_file(root, g, c, sid="a"):
    return os.path.join(kvdir(root, sid), f"c.{g}.0.{c}.0.0")


def decode_chunk(path, G):
    """A chunk file's payload [G, 2, C, K, D] (zarr3 ``bytes`` codec, little endian) and its 4-byte crc32c."""
    raw = open(path, "rb").read()
    assert len(raw) == G * 2 * C * K * D * 4 + 4, len(raw)
    return np.frombuffer(raw[:-4], "<f4").reshape(G, 2, C, K, D)


def snapshot(root, sid="a"):
    """chunk file -> (inode, bytes): a file TensorStore rewrites gets a new inode (temp file + rename)."""
    d = kvdir(root, sid)
    out = {}
    for n in os.listdir(d):
        if n.startswith("c."):
            p = os.path.join(d, n)
            out[n] = (os.stat(p).st_ino, open(p, "rb").read())
    return out


@pytest.mark.parametrize("G", [2, 4])
def test_chunk_file_holds_rows_of_G_layers(tmp_path, G):
    root = str(tmp_path / "st")
    st = open4(root, G)
    x = rows4(11, 1)
    save4(st, "a", x, 0)
    st.commit_turn("a", np.arange(11)).result()
    st.close()
    names = sorted(n for n in os.listdir(kvdir(root)) if n.startswith("c."))
    # 11 rows in chunks of 2: chunks 0..5 of each of the 4 // G groups, nothing else
    assert names == sorted(f"c.{g}.0.{c}.0.0" for g in range(4 // G) for c in range(6))
    for g in range(4 // G):
        for c in range(6):
            got = decode_chunk(chunk_file(root, g, c), G)
            want = np.zeros((G, 2, C, K, D), np.float32)
            hi = min(11, (c + 1) * C)
            want[:, :, : hi - c * C] = x[g * G : (g + 1) * G, :, c * C : hi]
            np.testing.assert_array_equal(got, want)  # row 11 (past the end) written as zeros


def test_a_turn_rewrites_only_the_chunk_it_continues(tmp_path):
    """Each turn rewrites the chunk holding the previous end (its earlier rows with their own bytes) and
    writes its own rows; every other chunk file keeps its inode and bytes. Bytes written = the rows of
    those chunks in every layer, so a decode saved a token at a time writes no more than one save."""
    root = str(tmp_path / "st")
    st = open4(root, 2)
    x = rows4(40, 2)
    save4(st, "a", x[:, :, :11], 0)
    st.commit_turn("a", np.arange(11)).result()
    drain(st)
    w0, before = st.stats.bytes_written["disk"], snapshot(root)
    assert w0 == 12 * 4 * BPTL  # rows 0..11 (chunks 0..5) of 4 layers
    for t in range(11, 20):  # a decode: one token a save, layers in any order within a step
        save4(st, "a", x[:, :, t : t + 1], t, order=(3, 1, 0, 2))
    st.commit_turn("a", np.arange(20)).result()
    drain(st)
    after = snapshot(root)
    # rows 10..19: chunk 5 rewritten (row 10 unchanged, 11 new), chunks 6..9 new; block 1 (rows 8..15)
    # was filled by the turn: written when the last layer of each group filled it, from chunk 5 on
    assert st.stats.bytes_written["disk"] - w0 == 10 * 4 * BPTL
    for c in range(5):
        for g in range(2):
            n = f"c.{g}.0.{c}.0.0"
            assert after[n] == before[n]  # same inode, same bytes: never rewritten
    for g in range(2):
        assert after[f"c.{g}.0.5.0.0"][0] != before[f"c.{g}.0.5.0.0"][0]
        got = decode_chunk(chunk_file(root, g, 5), 2)
        np.testing.assert_array_equal(got, x[2 * g : 2 * g + 2, :, 10:12])
    # a partial tail at the next commit: rows 20..22 -> chunk 10 (20, 21) and 11 (22 + a zero row)
    save4(st, "a", x[:, :, 20:23], 20)
    st.commit_turn("a", np.arange(23)).result()
    drain(st)
    assert st.stats.bytes_written["disk"] - w0 == (10 + 4) * 4 * BPTL
    tail = decode_chunk(chunk_file(root, 1, 11), 2)
    np.testing.assert_array_equal(tail[:, :, 0], x[2:4, :, 22])
    assert not tail[:, :, 1].any()
    quiet(st)
    st.close()
    st = open4(root, 2)
    check4(st, "a", x[:, :, :23])  # from disk, group by group
    st.close()


def test_reopen_reclaim_and_recovery_with_multi_layer_chunks(tmp_path):
    root = str(tmp_path / "st")
    faults = FaultInjector()
    st = open4(root, 2, faults=faults)
    x = rows4(30, 3)
    save4(st, "a", x, 0)
    st.commit_turn("a", np.arange(30)).result()
    st.truncate_front("a", 17).result()  # front 17: blocks 0, 1 (chunks 0..7 of both groups) are dead
    st.flush()
    drain(st)
    names = {n for n in os.listdir(kvdir(root)) if n.startswith("c.")}
    assert names == {f"c.{g}.0.{c}.0.0" for g in range(2) for c in range(8, 15)}
    assert st.usage()["disk"] == 4 * 2 * B * BPTL  # blocks 2, 3
    check4(st, "a", x[:, :, 17:])
    # A reclaim that fails (EIO) leaves the dead chunk files; the next open deletes them.
    faults.add("reclaim", "EIO", times=1)
    st.truncate_front("a", 8).result()  # front 25: block 2 dead
    st.flush()
    drain(st)
    assert st.stats.reclaim_failures == 1
    assert os.path.exists(chunk_file(root, 1, 8))
    quiet(st)
    st.close()
    st = open4(root, 2)
    assert not any(os.path.exists(chunk_file(root, g, c)) for g in range(2) for c in range(12))
    assert os.path.exists(chunk_file(root, 1, 12))
    assert st.usage()["disk"] == 4 * 1 * B * BPTL
    st.evict("a", "host")
    check4(st, "a", x[:, :, 25:])
    # A turn that never committed (killed before its manifest): its rows are past the manifest's end.
    save4(st, "a", rows4(9, 4), 5)
    drain(st)
    st._wb.worker.shutdown(wait=True)  # as a kill would: nothing committed after this
    st._wb.committer.shutdown(wait=True)
    st._rootlock.release()
    st = open4(root, 2)
    check4(st, "a", x[:, :, 25:])
    # A damaged multi-layer chunk: every layer of its group is lost together (token ids kept).
    st.close()
    p = chunk_file(root, 0, 13)
    raw = bytearray(open(p, "rb").read())
    raw[8] ^= 0xFF
    open(p, "wb").write(bytes(raw))
    st = open4(root, 2)
    with pytest.raises(Exception, match="recompute"):
        check4(st, "a", x[:, :, 25:])
    info = st.lookup("a")
    assert not info.kv_valid and list(info.token_ids) == list(range(25, 30))
    st.close()


def test_a_format_2_store_keeps_one_layer_per_chunk_and_test_util_uses_groups(tmp_path):
    """_util's stores (3 layers, chunks of 2 tokens) get one chunk of all 3 layers by default, so every
    store test runs the grouped writes; `check` reads them back."""
    from _util import L, open_store, rows, save  # noqa: PLC0415

    root = str(tmp_path / "st")
    st = open_store(root)
    assert (st.disk.chunk, st.disk.chunk_layers) == (C, L)
    x = rows(5, 9)
    save(st, "a", x, 0)
    st.commit_turn("a", np.arange(5)).result()
    check(st, "a", x)
    st.close()
    assert sorted(os.listdir(kvdir(root)))[:3] == ["c.0.0.0.0.0", "c.0.0.1.0.0", "c.0.0.2.0.0"]
