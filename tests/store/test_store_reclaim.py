"""Disk space before a session's front is reclaimed: the chunk files before a durable manifest's front
are deleted (on the save worker, after the manifest), only live blocks count in the disk budget, and a
crash between the manifest and the deletion is repaired by the next open and by `store gc`."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import BLK, B, C, L, check, open_store, quiet, rows, save  # noqa: E402

from jax_cachedattn.store.cli import cmd_gc, cmd_ls  # noqa: E402

SINK, TURN, KEEP = 4, 20, 40  # the engine keeps a 4-token attention sink; a turn adds 20 rows


def kv_files(root, sid="a"):
    """(number of chunk files, their bytes) of session ``sid`` on disk."""
    d = os.path.join(root, "s", sid, "kv")
    names = [n for n in os.listdir(d) if n.startswith("c.")] if os.path.isdir(d) else []
    return len(names), sum(os.path.getsize(os.path.join(d, n)) for n in names)


def chunk_blocks(root, sid="a"):
    """Token blocks with a chunk file on disk."""
    d = os.path.join(root, "s", sid, "kv")
    return sorted({int(n.split(".")[3]) // (B // C) for n in os.listdir(d) if n.startswith("c.")})


def converse(st, root, turns, front, want=None, ids=None):
    """``turns`` turns of TURN rows, each followed (once the history passes KEEP) by a truncation that
    keeps the sink and the last rows (``front``: truncate_front instead). Checks bounds at every step."""
    want = np.zeros((L, 2, 0, 2, 4), np.float32) if want is None else want
    ids = np.zeros(0, np.int32) if ids is None else ids
    peak_files = peak_bytes = 0
    for t in range(turns):
        x = rows(TURN, 100 + t)
        save(st, "a", x, want.shape[2])
        want = np.concatenate([want, x], axis=2)
        ids = np.concatenate([ids, np.arange(TURN, dtype=np.int32) + t])
        st.commit_turn("a", ids).result()
        n = want.shape[2]
        if n > KEEP:
            if front:
                st.truncate_front("a", n - KEEP).result()
                want, ids = want[:, :, n - KEEP:], ids[n - KEEP:]
            else:
                st.drop_range("a", SINK, SINK + n - KEEP).result()  # what the engine does
                want = np.concatenate([want[:, :, :SINK], want[:, :, SINK + n - KEEP:]], axis=2)
                ids = np.concatenate([ids[:SINK], ids[SINK + n - KEEP:]])
        st.flush()
        files, nbytes = kv_files(root)
        peak_files, peak_bytes = max(peak_files, files), max(peak_bytes, nbytes)
        assert st.usage()["disk"] <= st.cfg.disk_bytes
        assert st.accounting() == {"device": 0, "host": 0, "disk": 0}
    check(st, "a", want)
    return want, ids, peak_files, peak_bytes


@pytest.mark.parametrize("front", [False, True], ids=["sink+middle", "front"])
def test_truncated_50_times_under_a_fixed_disk_budget(tmp_path, front):
    """Without reclaiming, the array grows by ~20 rows a turn (a middle drop moves the kept rows to
    fresh rows): 50 truncations need ~130 blocks of 8 rows; the budget holds 16."""
    root = str(tmp_path / "st")
    budget = L * 16 * BLK
    st = open_store(root, disk_bytes=budget)
    want, ids, peak_files, peak_bytes = converse(st, root, 50, front)
    live = -(-KEEP // 8) + 1  # blocks the live history spans (+1: it need not start on a block)
    files, nbytes = kv_files(root)
    per = B // C  # chunk files per block and layer
    assert files <= L * live * per and peak_files <= L * 2 * live * per  # a move holds the old and the new run
    assert nbytes <= L * live * (BLK + 16 * per) and peak_bytes <= 2 * L * live * (BLK + 16 * per)
    assert st.usage()["disk"] <= L * live * BLK
    assert st.stats.bytes_reclaimed["disk"] > 5 * budget  # far more than the budget was freed and reused
    assert min(chunk_blocks(root)) > 50  # the kept run moved on; nothing of the early blocks is left
    quiet(st)
    st.close()
    st = open_store(root, disk_bytes=budget)  # the reopened store counts the same live blocks
    check(st, "a", want)
    np.testing.assert_array_equal(st.lookup("a").token_ids, ids)
    assert st.usage()["disk"] <= L * live * BLK
    quiet(st)
    st.close()


def test_reclaim_held_then_failed_then_reopened(tmp_path):
    """Held between the manifest and the deletion: the files are still there and still counted; an
    injected EIO makes the deletion fail (counted, nothing leaks); the next reclaim or open deletes them."""
    root = str(tmp_path / "st")
    st = open_store(root)
    x = rows(45, 1)
    save(st, "a", x, 0)
    st.commit_turn("a", np.arange(45)).result()
    before = kv_files(root)
    h = st.hooks.hold("reclaim.delete", sid="a")
    assert st.truncate_front("a", 30).result() == 1  # the manifest is durable: offset 30, blocks 0..2 dead
    h.wait_reached()
    assert kv_files(root) == before and st.usage()["disk"] == L * 6 * BLK
    check(st, "a", x[:, :, 30:])
    st.disk.faults.add("reclaim", "EIO", sid="a")
    h.release()
    st.flush()
    assert st.stats.reclaim_failures == 1 and kv_files(root) == before
    assert st.accounting() == {"device": 0, "host": 0, "disk": 0} and st.usage()["disk"] == L * 6 * BLK
    st.close()
    st = open_store(root)  # the open deletes what the failed reclaim left
    assert chunk_blocks(root) == [3, 4, 5] and st.usage()["disk"] == L * 3 * BLK
    assert st.stats.bytes_reclaimed["disk"] == L * 3 * BLK
    check(st, "a", x[:, :, 30:])
    quiet(st)
    st.close()


CHILD = """
import os, sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from _util import open_store, rows, save
st = open_store({root!r})
save(st, "a", rows(45, 1), 0)
st.commit_turn("a", np.arange(45)).result()
h = st.hooks.hold("reclaim.delete", sid="a")
st.drop_range("a", 4, {stop}).result()  # durable: the old run is dead, its deletion held
h.wait_reached()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("repair", ["open", "gc"])
def test_sigkill_between_manifest_and_delete(tmp_path, repair, capsys):
    """A real SIGKILL after a middle drop's manifest, before its deletion: the dead run stays on disk;
    the next open (or `cachedattn store gc`) deletes it and serves the kept rows bit for bit."""
    root = str(tmp_path / "st")
    code = CHILD.format(tests=os.path.dirname(__file__), root=root, stop=20)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert chunk_blocks(root) == list(range(0, 10))  # old run 0..5, new run 5..9 (rows 45..73; block 5 shared)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    x = rows(45, 1)
    want = np.concatenate([x[:, :, :4], x[:, :, 20:]], axis=2)
    if repair == "gc":
        assert cmd_ls(type("A", (), {"store": root, "json": True})()) == 0
        row = json.loads(capsys.readouterr().out)["sessions"][0]
        assert row["dead_blocks"] == 5 and row["bytes"] == 5 * L * BLK
        assert cmd_gc(type("A", (), {"store": root, "json": True, "no_verify": False})()) == 0
        assert json.loads(capsys.readouterr().out)["reclaimed"] == ["a"]
        assert chunk_blocks(root) == [5, 6, 7, 8, 9]
    st = open_store(root)
    assert chunk_blocks(root) == [5, 6, 7, 8, 9] and st.usage()["disk"] == L * 5 * BLK
    check(st, "a", want, turn_no=1)
    quiet(st)
    st.close()


def test_a_promotion_reading_blocks_a_reclaim_deletes_is_retried_not_lost(tmp_path):
    """Found by scripts/torture_store.py: a load's promotion claimed the blocks from the old front, a
    truncation's manifest and its reclaim deleted the first of them, and the read of a deleted chunk
    marked the session's KV lost. The read is now stale, and the load reads again from the new front."""
    import threading

    from _util import drain

    root = str(tmp_path / "st")
    st = open_store(root)
    x = rows(45, 1)
    save(st, "a", x, 0)
    st.commit_turn("a", np.arange(45)).result()
    st.flush()
    st.evict("a", "device")
    st.evict("a", "host")
    h = st.hooks.hold("promote.read", sid="a")
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("kv", np.asarray(st.load_layer("a", 1))))
    t.start()
    h.wait_reached()  # the promotion of blocks 0..5 is claimed and parked before reading
    assert st.truncate_front("a", 30).result() == 1
    drain(st)  # the reclaim ran: blocks 0..2 are gone from the disk
    assert chunk_blocks(root) == [3, 4, 5]
    h.release()
    t.join()
    info = st.lookup("a")
    assert info.kv_valid and st.stats.checksum_failures == 0
    np.testing.assert_array_equal(got["kv"], x[1][:, 30:])
    check(st, "a", x[:, :, 30:])
    quiet(st)
    st.close()
