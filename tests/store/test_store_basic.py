"""Round trips, bad input, integrity, disk full, concurrency and the store CLI."""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cachedattn.store import (
    BudgetError, DiskFull, FingerprintMismatch, InvalidSessionId, KVLayout, KVLost, LayoutMismatch,
    StoreConfig, TieredStore, UnknownSession,
)
from jax_cachedattn.store import cli

L, K, D, B = 3, 2, 8, 8


def layout(dtype="float32", fp="m1"):
    return KVLayout(num_layers=L, kv_heads=K, head_dim=D, dtype=dtype, fingerprint=fp)


def cfg(tmp_path, kind="file", **kw):
    base = dict(token_block=B, host_bytes=1 << 20, device_bytes=1 << 20)
    base.update(kw)
    if kind == "memory":
        return StoreConfig(kvstore={"driver": "memory"}, **base)
    return StoreConfig(root=str(tmp_path / "st"), **base)


def rand(lay, n, seed):
    x = np.random.default_rng(seed).standard_normal((L, 2, n, K, D)).astype(np.float32)
    return x.astype(lay.np_dtype)


def save_turn(store, sid, full, start, end, device=True):
    for layer in range(L):
        chunk = full[layer, :, start:end]
        store.save_layer(sid, layer, jnp.asarray(chunk) if device else chunk, start)
    return store.commit_turn(sid, np.arange(end))


@pytest.mark.parametrize("kind", ["file", "memory"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_all_tiers_bit_exact(tmp_path, kind, dtype):
    lay = layout(dtype)
    full = rand(lay, 45, 0)
    st = TieredStore(cfg(tmp_path, kind), lay)
    save_turn(st, "a", full, 0, 20).result()
    save_turn(st, "a", full, 20, 45, device=False).result()
    for layer in range(L):  # host -> device
        got = np.asarray(st.load_layer("a", layer, pad_to=64))
        assert got.dtype == lay.np_dtype
        np.testing.assert_array_equal(got[:, :45].view(np.uint8), full[layer].view(np.uint8))
        assert not got[:, 45:].any()
    assert st.lookup("a").tier == "device"
    st.evict("a", "device")
    st.evict("a", "host")
    assert st.lookup("a").tier == "disk"
    st.prefetch("a").result()  # disk -> host
    assert st.lookup("a").tier == "host"
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(st.load_layer("a", layer)).view(np.uint8), full[layer].view(np.uint8))
    st.close()
    if kind == "file":  # reopen: disk -> host -> device in a fresh store
        st2 = TieredStore(cfg(tmp_path, kind), lay)
        info = st2.lookup("a")
        assert (info.tier, info.num_tokens, info.turn) == ("disk", 45, 2)
        np.testing.assert_array_equal(info.token_ids, np.arange(45))
        for layer in range(L):
            np.testing.assert_array_equal(np.asarray(st2.load_layer("a", layer)).view(np.uint8), full[layer].view(np.uint8))
        st2.close()


def test_truncate_front_keeps_rest_bit_identical(tmp_path):
    lay = layout()
    full = rand(lay, 40, 1)
    st = TieredStore(cfg(tmp_path), lay)
    save_turn(st, "t", full, 0, 40).result()
    st.truncate_front("t", 19).result()
    save_turn_tail = full[:, :, 40:40]  # noqa: F841
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(st.load_layer("t", layer)), full[layer, :, 19:])
    more = rand(lay, 10, 2)
    for layer in range(L):
        st.save_layer("t", layer, more[layer], 21)
    st.commit_turn("t", np.arange(19, 50)).result()  # the kept ids (19..39), then the new ones
    st.close()
    st = TieredStore(cfg(tmp_path), lay)
    assert st.lookup("t").num_tokens == 31
    for layer in range(L):
        want = np.concatenate([full[layer, :, 19:], more[layer]], axis=1)
        np.testing.assert_array_equal(np.asarray(st.load_layer("t", layer, pad_to=40))[:, :31], want)
    st.close()


def test_bad_input(tmp_path):
    lay = layout()
    st = TieredStore(cfg(tmp_path), lay)
    for bad in ["../x", "", "/", "a/b", ".hidden", "x" * 200, None]:
        with pytest.raises(InvalidSessionId):
            st.lookup(bad)
        with pytest.raises(InvalidSessionId):
            st.save_layer(bad, 0, np.zeros((2, 1, K, D), np.float32), 0)
    with pytest.raises(UnknownSession):
        st.load_layer("nope", 0)
    with pytest.raises(UnknownSession):
        st.save_layer("nope", 0, np.zeros((2, 1, K, D), np.float32), 5)
    with pytest.raises(LayoutMismatch):
        st.save_layer("a", 0, np.zeros((2, 1, K + 1, D), np.float32), 0)
    with pytest.raises(LayoutMismatch):
        st.save_layer("a", 0, np.zeros((2, 1, K, D), np.float16), 0)
    with pytest.raises(LayoutMismatch):
        st.save_layer("a", L, np.zeros((2, 1, K, D), np.float32), 0)
    st.close()
    with pytest.raises(FingerprintMismatch):
        TieredStore(cfg(tmp_path), layout(fp="other"))
    TieredStore(cfg(tmp_path, wipe_on_mismatch=True), layout(fp="other")).close()
    with pytest.raises(BudgetError):
        TieredStore(cfg(tmp_path, host_bytes=100), layout(fp="other"))


def test_session_bigger_than_host_budget_raises(tmp_path):
    lay = layout()
    st = TieredStore(cfg(tmp_path, host_bytes=L * 2 * B * lay.bytes_per_token_layer), lay)
    full = rand(lay, 3 * B, 3)
    with pytest.raises(BudgetError):
        save_turn(st, "big", full, 0, 3 * B)
    st.close()


def test_corrupt_chunk_and_truncated_manifest_detected(tmp_path):
    lay = layout()
    st = TieredStore(cfg(tmp_path), lay)
    save_turn(st, "c", rand(lay, 20, 4), 0, 20).result()
    save_turn(st, "m", rand(lay, 20, 5), 0, 20).result()
    st.close()
    root = tmp_path / "st" / "s"
    chunk = root / "c" / "kv" / "c.0.0.1.0.0"  # layers 0-2 (one chunk spans them), rows 8..15 (flat zarr3 keys)
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    man = root / "m" / "manifest.json"
    man.write_bytes(man.read_bytes()[:50])
    assert cli.main(["store", "verify", "--store", str(tmp_path / "st"), "--json"]) == 1
    st = TieredStore(cfg(tmp_path), lay)
    assert st.lookup("m") is None  # damaged manifest: dropped
    assert st.stats.checksum_failures == 1
    with pytest.raises(KVLost):  # raised at the first layer that fails its checksum (layers are verified in order)
        for layer in range(lay.num_layers):
            st.load_layer("c", layer)
    info = st.lookup("c")
    assert not info.kv_valid and info.tier is None
    np.testing.assert_array_equal(info.token_ids, np.arange(20))  # token ids survive
    assert st.stats.checksum_failures == 2
    with pytest.raises(KVLost):  # appending to lost KV (a turn that loaded earlier layers first): recompute
        st.save_layer("c", 0, rand(lay, 4, 7)[0], 20)
    full = rand(lay, 20, 6)  # recompute and save again from 0
    save_turn(st, "c", full, 0, 20).result()
    np.testing.assert_array_equal(np.asarray(st.load_layer("c", 2)), full[2])
    st.close()


def test_missing_or_short_chunk_is_never_read_as_zeros(tmp_path):
    """zarr3 reads a missing chunk as the fill value unless told not to: the store must raise KVLost."""
    lay = layout()
    full = rand(lay, 3 * B, 11)
    st = TieredStore(cfg(tmp_path), lay)
    save_turn(st, "gone", full, 0, 3 * B).result()
    save_turn(st, "short", full, 0, 3 * B).result()
    st.close()
    kv = tmp_path / "st" / "s"
    (kv / "gone" / "kv" / "c.0.0.1.0.0").unlink()  # rows 8..15 of layers 0-2 (one chunk spans them)
    short = kv / "short" / "kv" / "c.0.0.2.0.0"
    short.write_bytes(short.read_bytes()[:-4])  # the crc32c trailer cut off
    assert cli.main(["store", "verify", "--store", str(tmp_path / "st")]) == 1
    st = TieredStore(cfg(tmp_path), lay)
    for sid in ("gone", "short"):
        with pytest.raises(KVLost):
            for layer in range(L):
                st.load_layer(sid, layer)
        assert not st.lookup(sid).kv_valid
    assert st.stats.checksum_failures == 2
    st.close()


def test_store_of_another_format_is_refused_or_adopted(tmp_path):
    """A folder written by an older on-disk format (store.json without format 2 or 3) is handled like
    another model's: refused with a clear error, or adopted keeping the conversations' token ids only."""
    lay = layout()
    st = TieredStore(cfg(tmp_path), lay)
    save_turn(st, "old", rand(lay, 12, 12), 0, 12).result()
    st.close()
    meta_path = tmp_path / "st" / "store.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format"] == 3
    del meta["format"]  # what format 1 wrote
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FingerprintMismatch, match="format"):
        TieredStore(cfg(tmp_path), lay)
    with pytest.raises(FingerprintMismatch, match="format"):
        cli.main(["store", "ls", "--store", str(tmp_path / "st")])
    st = TieredStore(cfg(tmp_path, keep_tokens_on_mismatch=True), lay)
    info = st.lookup("old")
    assert not info.kv_valid and info.tier is None
    np.testing.assert_array_equal(info.token_ids, np.arange(12))
    st.close()


def test_disk_budget_and_enospc_keep_committed_sessions(tmp_path, monkeypatch):
    lay = layout()
    one = L * 3 * B * lay.bytes_per_token_layer  # a session of 3 blocks
    st = TieredStore(cfg(tmp_path, disk_bytes=2 * one + one // 3), lay)
    a, b = rand(lay, 3 * B, 7), rand(lay, 3 * B, 8)
    save_turn(st, "a", a, 0, 3 * B).result()
    save_turn(st, "b", b, 0, 3 * B).result()
    st.policy.set_future(["a", "b"])  # both needed soon: nothing may go
    with pytest.raises(DiskFull):
        save_turn(st, "c", rand(lay, 8 * B, 9), 0, 8 * B)  # bigger than the whole budget
    assert st.usage()["disk"] <= 2 * one
    # simulated ENOSPC from the filesystem while writing a new turn of "a"
    from jax_cachedattn.store import disk as diskmod

    def boom(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(diskmod.DiskTier, "write_manifest", boom)
    more = rand(lay, 2, 10)
    for layer in range(L):
        st.save_layer("a", layer, more[layer], 3 * B)
    fut = st.commit_turn("a", np.arange(3 * B + 2))
    with pytest.raises(DiskFull):
        fut.result()
    monkeypatch.undo()
    with pytest.raises(DiskFull):  # flush reports the failed commit too (once)
        st.flush()
    st.close()
    st = TieredStore(cfg(tmp_path, disk_bytes=2 * one + one // 3), lay)
    assert st.lookup("c") is None
    assert st.lookup("a").num_tokens == 3 * B and st.lookup("a").turn == 1
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(st.load_layer("a", layer)), a[layer])
        np.testing.assert_array_equal(np.asarray(st.load_layer("b", layer)), b[layer])
    st.close()


def test_disk_budget_evicts_lru_outside_future_window(tmp_path):
    lay = layout()
    one = L * 2 * B * lay.bytes_per_token_layer
    st = TieredStore(cfg(tmp_path, disk_bytes=2 * one), lay)
    for sid in ("x", "y"):
        save_turn(st, sid, rand(lay, 2 * B, 11), 0, 2 * B).result()
    st.policy.set_future(["x"])  # x comes next: y (outside the window) must go although x is older
    save_turn(st, "z", rand(lay, 2 * B, 12), 0, 2 * B).result()
    assert st.sessions() == ["x", "z"]
    assert st.stats.evictions["disk"] == 1
    st.close()


def test_concurrent_saves_prefetches_evictions(tmp_path):
    lay = layout()
    st = TieredStore(cfg(tmp_path, host_bytes=6 * L * 4 * B * lay.bytes_per_token_layer), lay)
    sids = [f"s{i}" for i in range(6)]
    data = {sid: rand(lay, 4 * B, 20 + i) for i, sid in enumerate(sids)}
    errors = []

    def worker(sid):
        try:
            full = data[sid]
            for t, (lo, hi) in enumerate([(0, 9), (9, 17), (17, 4 * B)]):
                save_turn(st, sid, full, lo, hi, device=t % 2 == 0)
                st.prefetch(sid)
                if t == 1:
                    st.flush()
                    st.evict(sid, "host")
                st.load_layer(sid, t % L, pad_to=4 * B)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(sid,)) for sid in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    st.flush()
    for sid in sids:
        for layer in range(L):
            np.testing.assert_array_equal(np.asarray(st.load_layer(sid, layer)), data[sid][layer])
    assert st.usage()["host"] <= st.budget["host"]
    st.close()


def test_cli_ls_verify_gc(tmp_path, capsys):
    lay = layout()
    st = TieredStore(cfg(tmp_path), lay)
    save_turn(st, "ok", rand(lay, 12, 30), 0, 12).result()
    st.close()
    os.makedirs(tmp_path / "st" / "s" / "orphan" / "kv", exist_ok=True)
    (tmp_path / "st" / "s" / "orphan" / "kv" / "zarr.json").write_text("{}")
    root = str(tmp_path / "st")
    assert cli.main(["store", "ls", "--store", root, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    states = {r["session"]: r["state"] for r in out["sessions"]}
    assert states == {"ok": "committed", "orphan": "orphan"}
    assert cli.main(["store", "verify", "--store", root]) == 0
    assert cli.main(["store", "gc", "--store", root, "--json"]) == 0
    capsys.readouterr()
    cli.main(["store", "ls", "--store", root, "--json"])
    assert [r["session"] for r in json.loads(capsys.readouterr().out)["sessions"]] == ["ok"]


def test_a_chunk_of_zeros_is_stored_and_read_back(tmp_path):
    """TensorStore skips writing a chunk equal to the fill value unless told to store it; with missing
    chunks read as errors, a session whose KV has a chunk of zeros would read back as damaged."""
    from _util import L, check, open_store, quiet, save  # noqa: PLC0415

    st = open_store(tmp_path / "st")
    x = np.zeros((L, 2, 13, 2, 4), np.float32)
    x[:, :, 9] = 1.0  # one chunk of zeros in a block that is not all zeros, and whole blocks of zeros
    save(st, "z", x, 0)
    st.commit_turn("z", np.arange(13)).result()
    st.flush()
    st.evict("z", "host")
    assert st.lookup("z").tier == "disk"
    check(st, "z", x)
    quiet(st)
    st.close()


def test_disk_chunk_default_config_and_older_stores(tmp_path):
    """The disk chunk geometry: the config's, else the store's own (format 2, written before chunks spanned
    layers, means one layer per chunk; without ``disk_chunk``, one chunk per block), else the block halved
    down to 32 tokens and the fewest layers that make a chunk >= 512 KiB."""
    from _util import L, LAY, check, open_store, rows, save  # noqa: PLC0415

    from jax_cachedattn.store import FingerprintMismatch  # noqa: PLC0415

    llama, smol = KVLayout(32, 32, 128, "bfloat16"), KVLayout(30, 3, 64, "float32")
    assert StoreConfig(root="x").new_disk_geometry(llama) == (32, 1)  # 512 KiB chunks of one layer
    assert StoreConfig(root="x").new_disk_geometry(smol) == (32, 15)  # 48 KiB a layer: 15 layers, 720 KiB
    assert StoreConfig(root="x", token_block=64).new_disk_geometry(smol) == (32, 15)
    assert StoreConfig(root="x", disk_chunk=16).new_disk_geometry(smol) == (16, 30)  # 720 KiB needs all 30
    assert StoreConfig(root="x", disk_chunk=256, disk_chunk_layers=1).new_disk_geometry(smol) == (256, 1)
    for bad in (3, 0, 512, True, 2.0):
        with pytest.raises(ValueError, match="disk_chunk"):
            StoreConfig(root="x", disk_chunk=bad)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="disk_chunk_layers"):
            StoreConfig(root="x", disk_chunk_layers=bad)
    with pytest.raises(ValueError, match="divide the layer count"):
        open_store(tmp_path / "bad", disk_chunk_layers=2)  # 3 layers
    root = tmp_path / "st"
    st = open_store(root, disk_chunk=None)  # a new store of a tiny layout: one chunk per block of 8, all layers
    x = rows(11, 3)
    save(st, "a", x, 0)
    st.commit_turn("a", np.arange(11)).result()
    st.close()
    meta = json.loads((root / "store.json").read_text())
    assert (meta["format"], meta["disk_chunk"], meta["disk_chunk_layers"]) == (3, 8, L)
    assert sorted(os.listdir(root / "s" / "a" / "kv")) == ["c.0.0.0.0.0", "c.0.0.1.0.0", "zarr.json"]
    with pytest.raises(FingerprintMismatch):
        open_store(root)  # _util's chunks of 2 in a store of chunks of 8: another layout on disk
    with pytest.raises(FingerprintMismatch):
        open_store(root, disk_chunk=None, disk_chunk_layers=1)  # another chunk geometry

    # A store of format 2 (one layer per chunk), as the previous version wrote it: read as it is.
    old = tmp_path / "old"
    st = open_store(old, disk_chunk=None, disk_chunk_layers=1)
    save(st, "a", x, 0)
    st.commit_turn("a", np.arange(11)).result()
    st.close()
    one_layer_chunks = sorted(f"c.{la}.0.{c}.0.0" for la in range(L) for c in range(2)) + ["zarr.json"]
    assert sorted(os.listdir(old / "s" / "a" / "kv")) == one_layer_chunks
    meta = json.loads((old / "store.json").read_text())
    meta["format"] = 2
    del meta["disk_chunk_layers"], meta["disk_chunk"]  # format 2 before disk chunks existed: chunk = block
    (old / "store.json").write_text(json.dumps(meta, sort_keys=True))
    st = open_store(old, disk_chunk=None)
    check(st, "a", x)
    save(st, "a", rows(3, 4), 11)  # and written in its own geometry
    st.commit_turn("a", np.arange(14)).result()
    st.close()
    meta = json.loads((old / "store.json").read_text())
    assert (meta["format"], meta["disk_chunk"], "disk_chunk_layers" in meta) == (2, 8, False)  # recorded once
    assert sorted(os.listdir(old / "s" / "a" / "kv")) == one_layer_chunks
    st = open_store(old, disk_chunk=None)
    check(st, "a", np.concatenate([x, rows(3, 4)], axis=2))
    st.close()
    # A format this version does not read: refused with one line, nothing changed.
    meta["format"] = 4
    (old / "store.json").write_text(json.dumps(meta, sort_keys=True))
    with pytest.raises(FingerprintMismatch, match="reads formats") as e:
        open_store(old, disk_chunk=None)
    assert "\n" not in str(e.value)
    assert json.loads((old / "store.json").read_text())["format"] == 4
    assert L == LAY.num_layers
