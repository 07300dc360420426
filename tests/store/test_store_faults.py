"""One deterministic regression test per failure of issue 11, driven by named hooks and injected faults.

A hook holds a queued save or commit at a named point while the test goes on; `FaultInjector` makes
chosen chunk writes, resizes or manifests fail with ENOSPC or EIO.
"""

import os
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import B, BLK, C, L, LAY, ZERO, check, drain, open_store, quiet, rows, save, tmpfs, turn  # noqa: E402

from jax_cachedattn.store import (  # noqa: E402
    BudgetError, DiskFull, FingerprintMismatch, InvalidSessionId, KVLayout, StoreConfig, TieredStore,
)
from jax_cachedattn.store.errors import StoreLocked, TurnFailed  # noqa: E402
from jax_cachedattn.store.faults import FaultInjector  # noqa: E402


def cat(*xs):
    return np.concatenate(xs, axis=2)


# ---------------------------------------------------------------- 1. queued saves never write zeros
def test_1a_failed_commit_with_next_turns_saves_queued(tmp_path):
    st = open_store(tmp_path / "st")
    a, b, c = rows(11, 1), rows(5, 2), rows(6, 3)
    turn(st, "s", a, 0).result()
    hm = st.hooks.hold("commit.manifest", sid="s")
    st.disk.faults.add("manifest", "ENOSPC", sid="s")
    f2 = turn(st, "s", b, 11)
    hm.wait_reached()  # turn 2's data is written, its manifest is next (and will fail)
    hs = st.hooks.hold("save.start", sid="s")
    f3 = turn(st, "s", c, 16)  # turn 3's saves queued behind a parked one; the engine does not wait
    hs.wait_reached()
    hm.release()
    with pytest.raises(DiskFull) as e2:
        f2.result()
    assert str(e2.value) == ("disk full: turn 2 of session 's' was not saved; the session stays at turn 1 "
                             "(free space and send it again)")
    hs.release()
    with pytest.raises(DiskFull, match="turn 3 of session 's' was not saved; the session stays at turn 1"):
        f3.result()
    check(st, "s", a, turn_no=1)
    with pytest.raises(DiskFull):  # flush reports the failure once
        st.flush()
    st.flush()
    quiet(st)
    turn(st, "s", c, 11).result()  # sent again: succeeds
    check(st, "s", cat(a, c), turn_no=2)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "s", cat(a, c), turn_no=2)
    st.close()


@pytest.mark.parametrize("manifest_fails", [False, True])
def test_1b_truncate_right_after_commit_with_saves_queued(tmp_path, manifest_fails):
    st = open_store(tmp_path / "st")
    a, b = rows(13, 4), rows(9, 5)
    turn(st, "t", a, 0).result()
    hs = st.hooks.hold("save.start", sid="t")
    f2 = turn(st, "t", b, 13)
    hs.wait_reached()  # turn 2's saves have not run
    if manifest_fails:
        st.disk.faults.add("manifest", "EIO", sid="t", after=1)  # turn 2's manifest passes, the truncation's fails
    ft = st.truncate_front("t", 17)  # drops blocks 0 and 1: the saves still queued need block 1's old rows
    hs.release()
    assert f2.result() == 2
    full = cat(a, b)
    if manifest_fails:
        with pytest.raises(TurnFailed, match="truncate of the history of session 't' was not saved"):
            ft.result()
        check(st, "t", full, turn_no=2)  # back to the last durable state: nothing dropped
        with pytest.raises(TurnFailed):
            st.flush()
    else:
        ft.result()
        check(st, "t", full[:, :, 17:], turn_no=2)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "t", full if manifest_fails else full[:, :, 17:], turn_no=2)
    st.close()


def test_1c_evict_host_or_delete_racing_a_new_save(tmp_path):
    st = open_store(tmp_path / "st")
    a, b = rows(12, 6), rows(7, 7)
    turn(st, "e", a, 0).result()
    turn(st, "d", a, 0).result()
    hs = st.hooks.hold("save.start", sid="e")
    f = turn(st, "e", b, 12)
    hs.wait_reached()
    ev = threading.Thread(target=st.evict, args=("e", "host"))
    ev.start()  # waits for the session's work; a session with a turn in flight keeps its host copy
    hs.release()
    ev.join()
    assert f.result() == 2
    check(st, "e", cat(a, b), turn_no=2)
    st.evict("e", "device")
    st.evict("e", "host")
    assert st.lookup("e").tier == "disk"
    check(st, "e", cat(a, b))  # read back from disk: the committed rows, never zeros

    hs = st.hooks.hold("save.start", sid="d")
    save(st, "d", b, 12)  # a new turn of "d" queued ...
    hs.wait_reached()
    deleter = threading.Thread(target=st.delete, args=("d",))
    deleter.start()  # ... while the session is deleted
    hs.release()
    deleter.join()
    assert st.lookup("d") is None
    assert not (tmp_path / "st" / "s" / "d").exists()  # no late chunk write brought a file back
    c = rows(4, 8)
    turn(st, "d", c, 0).result()  # the id starts afresh
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "d", c, turn_no=1)
    check(st, "e", cat(a, b), turn_no=2)
    st.close()


# ---------------------------------------------------------------- 2. a commit publishes only its own writes
@pytest.mark.parametrize("kind", ["ENOSPC", "EIO"])
def test_2_next_turns_failed_chunk_write_does_not_touch_this_turn(tmp_path, kind):
    st = open_store(tmp_path / "st")
    a, b, c = rows(5, 9), rows(3, 10), rows(12, 11)
    turn(st, "s", a, 0).result()
    hw = st.hooks.hold("commit.wait", sid="s")
    f2 = turn(st, "s", b, 5)
    hw.wait_reached()  # turn 2's commit waits to wait for its writes
    drain_worker = st._wb.worker.submit(lambda: None)
    drain_worker.result()  # turn 2's chunk writes are issued
    st.disk.faults.add("chunk_write", kind, sid="s")  # turn 3's first full block fails
    f3 = turn(st, "s", c, 8)
    st._wb.worker.submit(lambda: None).result()
    hw.release()
    assert f2.result() == 2  # turn 2 depends on its own writes only
    with pytest.raises(DiskFull if kind == "ENOSPC" else TurnFailed, match="turn 3 of session 's' was not saved"):
        f3.result()
    check(st, "s", cat(a, b), turn_no=2)
    with pytest.raises(DiskFull if kind == "ENOSPC" else TurnFailed):
        st.flush()
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "s", cat(a, b), turn_no=2)  # never 3 turns with rows that were not written
    st.close()


# ---------------------------------------------------------------- 3. adoption interrupted, v1 manifests
def test_3_adoption_interrupted_opens_again_with_every_option(tmp_path):
    root = tmp_path / "st"
    st = open_store(root)
    for i, sid in enumerate(["p", "q", "r"]):
        turn(st, sid, rows(6 + i, 20 + i), 0).result()
    st.close()
    other = KVLayout(num_layers=L, kv_heads=2, head_dim=4, dtype="float32", fingerprint="another-model")
    faults = FaultInjector()
    faults.add("manifest", "EIO", after=1)  # the adoption dies at its second session
    with pytest.raises(OSError):
        open_store(root, other, keep_tokens_on_mismatch=True, faults=faults)
    with pytest.raises(FingerprintMismatch):  # still the other model's store: refused without an option
        open_store(root, other)
    st = open_store(root, other, keep_tokens_on_mismatch=True)
    for i, sid in enumerate(["p", "q", "r"]):
        info = st.lookup(sid)
        assert not info.kv_valid and info.tier is None and info.num_tokens == 6 + i
        np.testing.assert_array_equal(info.token_ids, np.arange(6 + i))
    st.close()
    open_store(root, other).close()  # adopted: now its own store
    TieredStore(StoreConfig(root=str(root), token_block=B, wipe_on_mismatch=True), LAY).close()


def test_3_version_1_manifest_is_quarantined_unless_adopting(tmp_path):
    import json
    import zlib

    root = tmp_path / "st"
    st = open_store(root)
    turn(st, "old", rows(5, 30), 0).result()
    turn(st, "ok", rows(5, 31), 0).result()
    st.close()
    man = root / "s" / "old" / "manifest.json"
    body = json.loads(man.read_text().rsplit("\n#", 1)[0])
    body["version"] = 1
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    man.write_text(text + "\n#crc32=%08x\n" % zlib.crc32(text.encode()))
    st = open_store(root)
    assert st.lookup("old") is None and st.stats.quarantined == 1
    check(st, "ok", rows(5, 31))
    st.close()
    assert (root / "quarantine" / "old.0" / "reason.txt").read_text().startswith("made by model")


# ---------------------------------------------------------------- 4. failed resize
def test_4_failed_resize_returns_budget_and_next_append_works(tmp_path):
    st = open_store(tmp_path / "st", disk_bytes=64 * L * BLK)
    a, b = rows(8, 40), rows(20, 41)
    turn(st, "r", a, 0).result()
    before = st.usage()["disk"]
    st.disk.faults.add("resize", "ENOSPC", sid="r")
    f = turn(st, "r", b, 8)
    with pytest.raises(DiskFull, match="^disk full: turn 2 of session 'r' was not saved; the session stays at turn 1"):
        f.result()
    with pytest.raises(DiskFull):
        st.flush()
    quiet(st)
    assert st.usage()["disk"] == before  # the reservation of the failed growth came back
    turn(st, "r", b, 8).result()  # no OUT_OF_RANGE: the array handle was reopened
    check(st, "r", cat(a, b), turn_no=2)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "r", cat(a, b), turn_no=2)
    st.close()


# ---------------------------------------------------------------- 5. a session with a turn in flight is pinned
def test_5_background_prefetch_cannot_evict_a_session_being_saved(tmp_path):
    one = L * 2 * BLK  # a session of 2 blocks per layer
    st = open_store(tmp_path / "st", host_bytes=2 * one, device_bytes=0)
    a, b = rows(2 * B, 50), rows(2 * B, 51)
    turn(st, "A", a, 0).result()
    turn(st, "B", b, 0).result()
    st.evict("A", "host")
    more = rows(3, 52)
    st.save_layer("A", 0, more[0], 2 * B)  # A comes back to host (B goes) and is pinned by its open turn
    fut = st.prefetch("B")  # wants A's room: A is busy, so B cannot come in
    with pytest.raises(BudgetError):
        fut.result()
    for layer in range(1, L):
        st.save_layer("A", layer, more[layer], 2 * B)
    st.commit_turn("A", np.arange(2 * B + 3)).result()
    check(st, "A", cat(a, more), turn_no=2)
    check(st, "B", b)
    quiet(st)
    st.close()


# ---------------------------------------------------------------- 6. errors reach the caller
def test_6_failed_truncation_rolls_back_memory_and_manifest(tmp_path):
    st = open_store(tmp_path / "st")
    a = rows(20, 60)
    turn(st, "t", a, 0).result()
    st.disk.faults.add("manifest", "ENOSPC", sid="t")
    with pytest.raises(DiskFull, match="truncate of the history of session 't' was not saved"):
        st.truncate_front("t", 9).result()
    check(st, "t", a, turn_no=1)  # memory agrees with the manifest on disk
    with pytest.raises(DiskFull):
        st.flush()
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "t", a, turn_no=1)
    st.close()


# ---------------------------------------------------------------- 7. a real full disk (tmpfs)
@pytest.fixture
def small_fs(tmp_path):
    yield from tmpfs(tmp_path, "512k")


def test_7_long_lived_store_after_disk_full_on_tmpfs(small_fs):
    lay = KVLayout(num_layers=2, kv_heads=2, head_dim=16, dtype="float32", fingerprint="tmpfs")
    root = small_fs / "st"
    st = TieredStore(StoreConfig(root=str(root), token_block=16, host_bytes=8 << 20), lay)
    rng = np.random.default_rng(70)
    filler = small_fs / "filler"
    want, ids_turn, failed = None, 0, 0
    n = 0
    for t in range(12):  # 512 B per token: 12 turns of 24 tokens need ~150 KiB of the 512 KiB tmpfs
        x = rng.standard_normal((2, 2, 24, 2, 16)).astype(np.float32)
        if t == 3:
            with open(filler, "wb") as f:  # another program takes the free space
                try:
                    f.write(b"\0" * (1 << 20))  # more than the whole tmpfs: fills it
                except OSError:
                    pass
        if t == 6:
            filler.unlink()  # space is back
        for layer in range(2):
            st.save_layer("harbour", layer, x[layer], n)
        fut = st.commit_turn("harbour", np.arange(n + 24))
        try:
            fut.result()
            want = x if want is None else np.concatenate([want, x], axis=2)
            n += 24
            ids_turn += 1
        except DiskFull as e:
            failed += 1
            msg = str(e)
            assert "\n" not in msg and str(small_fs) not in msg and "RESOURCE_EXHAUSTED" not in msg
            assert msg == (f"disk full: turn {ids_turn + 1} of session 'harbour' was not saved; the session stays "
                           f"at turn {ids_turn} (free space and send it again)")
            assert 3 <= t < 6
            try:
                st.flush()
            except DiskFull:
                pass
        info = st.lookup("harbour")
        assert (info.turn, info.num_tokens) == (ids_turn, n)
    assert failed >= 1 and ids_turn >= 7  # every turn after space came back succeeded
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(st.load_layer("harbour", layer)), want[layer])
    st.flush()
    assert st.accounting() == ZERO
    st.close()
    st = TieredStore(StoreConfig(root=str(root), token_block=16, host_bytes=8 << 20), lay)
    for layer in range(2):
        np.testing.assert_array_equal(np.asarray(st.load_layer("harbour", layer)), want[layer])
    st.close()


# ---------------------------------------------------------------- 8. input and metadata
def test_8_ids_and_root_are_validated():
    for bad in ["abc\n", "a\nb", "x" * 129]:
        with pytest.raises(InvalidSessionId):
            st_validate(bad)
    with pytest.raises(ValueError, match="root"):
        StoreConfig(root="")
    with pytest.raises(ValueError, match="root"):
        StoreConfig(root="   ")


def st_validate(sid):
    from jax_cachedattn.store import validate_session_id

    return validate_session_id(sid)


def test_8_one_bad_folder_quarantines_one_session(tmp_path):
    import json
    import zlib

    root = tmp_path / "st"
    st = open_store(root)
    for i, sid in enumerate(["good", "noend", "bigid", "badzarr"]):
        turn(st, sid, rows(9, 80 + i), 0).result()
    st.close()

    def rewrite(sid, edit):
        man = root / "s" / sid / "manifest.json"
        body = json.loads(man.read_text().rsplit("\n#", 1)[0])
        edit(body)
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        man.write_text(text + "\n#crc32=%08x\n" % zlib.crc32(text.encode()))

    rewrite("noend", lambda b: b.pop("end"))
    rewrite("bigid", lambda b: b["token_ids"].__setitem__(3, 2**40))
    zj = root / "s" / "badzarr" / "kv" / "zarr.json"
    meta = json.loads(zj.read_text())
    meta["codecs"] = [c for c in meta["codecs"] if c["name"] != "crc32c"]  # checksums silently off
    zj.write_text(json.dumps(meta))
    (root / "s" / "bad name!").mkdir()
    (root / "s" / "bad name!" / "junk").write_bytes(b"x" * 5000)
    st = open_store(root)
    assert st.sessions() == ["badzarr", "good"]
    assert st.stats.quarantined == 3
    assert not st.lookup("badzarr").kv_valid  # a zarr.json that does not match the layout: KV not trusted
    np.testing.assert_array_equal(st.lookup("badzarr").token_ids, np.arange(9))
    check(st, "good", rows(9, 80))
    assert st.usage()["disk"] == L * 2 * BLK  # only the good session counts
    st.close()
    reasons = sorted((root / "quarantine").iterdir())
    assert [p.name for p in reasons] == ["bad name!.0", "bigid.0", "noend.0"]
    assert "'end'" in (root / "quarantine" / "noend.0" / "reason.txt").read_text()
    assert "token_ids" in (root / "quarantine" / "bigid.0" / "reason.txt").read_text()


@pytest.mark.parametrize("G", [1, L])
def test_8_verify_on_open_counts_its_reads_in_the_host_budget(tmp_path, G):
    """verify_on_open reads one layer group (the layers a disk chunk spans) of the whole session at a
    time and reserves those bytes in the host budget."""
    root = tmp_path / "st"
    st = open_store(root, disk_chunk_layers=G)
    turn(st, "v", rows(4 * B, 90), 0).result()
    st.close()
    chunk = root / "s" / "v" / "kv" / "c.0.0.1.0.0"  # layer group 0, rows 2..3
    raw = bytearray(chunk.read_bytes())
    raw[5] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(BudgetError):  # G layers of the session (G x 4 blocks) do not fit
        open_store(root, disk_chunk_layers=G, host_bytes=L * BLK if G == 1 else L * 2 * BLK, verify_on_open=True)
    st = open_store(root, disk_chunk_layers=G, host_bytes=(L * 2 if G == 1 else L * 4) * BLK, verify_on_open=True)
    assert not st.lookup("v").kv_valid and st.usage()["host"] == 0
    st.close()


# ---------------------------------------------------------------- 9. one writer per root
def test_9_one_writer_per_root(tmp_path, capsys):
    import subprocess

    from jax_cachedattn.store import cli

    root = tmp_path / "st"
    st = open_store(root)
    turn(st, "w", rows(5, 100), 0).result()
    with pytest.raises(StoreLocked, match=f"in use by process {os.getpid()}"):
        open_store(root)
    code = ("import sys; from jax_cachedattn.store import *; from jax_cachedattn.store.errors import StoreLocked\n"
            f"try:\n    TieredStore(StoreConfig(root={str(root)!r}, token_block={B}), KVLayout({L}, 2, 4, fingerprint='faults'))\n"
            "except StoreLocked as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd()))
    assert r.returncode == 3 and f"in use by process {os.getpid()}" in r.stdout
    assert cli.main(["store", "ls", "--store", str(root), "--json"]) == 0  # readers need no lock
    assert cli.main(["store", "verify", "--store", str(root)]) == 0
    with pytest.raises(StoreLocked):
        cli.main(["store", "gc", "--store", str(root)])
    st.close()
    capsys.readouterr()
    assert cli.main(["store", "gc", "--store", str(root)]) == 0
    st = open_store(root)  # the lock went with the writer
    check(st, "w", rows(5, 100))
    st.close()


# ---------------------------------------------------------------- 10. durability
def test_10_manifest_and_folder_fsynced_store_json_written_once(tmp_path, monkeypatch):
    import jax_cachedattn.store.disk as diskmod

    root = tmp_path / "st"
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(diskmod.os, "fsync", spy)
    st = open_store(root)
    turn(st, "f", rows(5, 110), 0).result()
    folder = str(root / "s" / "f")
    assert any(p.startswith(folder + "/.manifest.json.") for p in synced)  # the file, before its rename
    assert folder in synced  # the folder, after the rename
    st.close()
    meta = root / "store.json"
    before = (meta.stat().st_ino, meta.stat().st_mtime_ns)
    open_store(root).close()
    assert (meta.stat().st_ino, meta.stat().st_mtime_ns) == before  # not rewritten when unchanged


# ---------------------------------------------------------------- 11. partial blocks written once
def test_11_decode_saves_write_each_block_once(tmp_path):
    st = open_store(tmp_path / "st")
    hist = rows(5, 120)
    turn(st, "w", hist, 0).result()
    w0 = st.stats.bytes_written["disk"]
    dec = rows(4 * B + 6, 121)  # decode: 38 tokens saved 1 at a time, then committed
    for i in range(dec.shape[2]):
        save(st, "w", dec[:, :, i : i + 1], 5 + i)
    st.commit_turn("w", np.arange(5 + dec.shape[2])).result()
    # 43 tokens, disk chunks of C=2 rows: block 0 from the chunk holding row 5 (rows 4..7: row 4 of the
    # history rewritten with its own bytes), blocks 1..4 whole when they filled, block 5 at the commit up
    # to the chunk holding row 42 (rows 40..43: one row of padding). Each row once, plus 2.
    assert C == 2 and st.stats.bytes_written["disk"] - w0 == L * (4 + 4 * B + 4) * BLK // B
    check(st, "w", cat(hist, dec), turn_no=2)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "w", cat(hist, dec), turn_no=2)
    st.close()


# ---------------------------------------------------------------- 12. deletes outside the global lock
def test_12_file_removal_runs_without_the_lock(tmp_path):
    st = open_store(tmp_path / "st")
    a = rows(9, 130)
    turn(st, "x", a, 0).result()
    turn(st, "y", a, 0).result()
    h = st.hooks.hold("delete.disk", sid="x")
    t = threading.Thread(target=st.delete, args=("x",))
    t.start()
    h.wait_reached()  # the removal of x's files is parked; the store's lock must be free
    assert st.lookup("x") is None
    check(st, "y", a)  # loads (and their device transfers) go on meanwhile
    assert st.usage()["disk"] == 2 * L * 2 * BLK  # x's bytes are counted until its files are gone
    h.release()
    t.join()
    quiet(st)
    assert st.usage()["disk"] == L * 2 * BLK
    st.close()


def test_a_deleted_sessions_failed_turn_reports_a_store_error(tmp_path):
    """Found by scripts/torture_store.py: a turn whose save had failed (the raw OSError recorded) and
    that a delete killed before its commit ran resolved its future with that raw OSError."""
    st = open_store(tmp_path / "st")
    a = rows(9, 1)
    turn(st, "s", a, 0).result()
    hc = st.hooks.hold("commit.wait", sid="s")
    st.disk.faults.add("resize", "EIO", sid="s")
    f2 = turn(st, "s", rows(8, 2), 9)  # rows 9..16: block 2's flush at commit grows the array (and fails)
    hc.wait_reached()
    st._wb.worker.submit(lambda: None).result()  # the flush ran and failed: the turn holds the raw OSError
    st.disk.faults.clear()
    deleter = threading.Thread(target=st.delete, args=("s",))
    deleter.start()
    hc.release()
    deleter.join()
    with pytest.raises(TurnFailed, match="of session 's' was not saved"):
        f2.result()
    assert st.lookup("s") is None
    st.close()
