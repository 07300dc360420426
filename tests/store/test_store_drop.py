"""`TieredStore.drop_range`: the three uses (front, attention sink + middle, tail) on every tier, the
kept rows bit-identical in memory and after reopening, budgets back to what the tables hold, held
worker points, and failures that roll back to the last durable history."""

import os
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _util import B, BLK, L, check, drain, open_store, quiet, rows, save  # noqa: E402

from jax_cachedattn.store import BudgetError, DiskFull, LayoutMismatch, assemble_blocks  # noqa: E402
from jax_cachedattn.store.errors import TurnFailed  # noqa: E402

N = 45  # rows of the first turn (blocks 0..5, the last one partial)
IDS = np.arange(100, 100 + N, dtype=np.int32)
# use -> (start, stop, first kept block, blocks after, disk blocks counted: the live ones, blocks
# before the front are deleted once the drop's manifest is durable)
USES = {
    "front": (0, 13, 1, 6, 5),  # truncate_front: offset 13
    "sink": (4, 20, 5, 10, 5),  # 4 sink rows + rows 20..44 copied to rows 45..73 (blocks 5..9)
    "tail": (30, N, 0, 4, 6),  # rows 30..44 dropped: metadata only
}


def cat(*xs):
    return np.concatenate(xs, axis=2)


def kept(x, start, stop):
    return cat(x[:, :, :start], x[:, :, stop:])


def first_turn(st, sid="a"):
    x = rows(N, 1)
    save(st, sid, x, 0)
    st.commit_turn(sid, IDS).result()
    return x


def to_tier(st, sid, tier):
    for layer in range(L):
        st.load_layer(sid, layer)  # fills the device tier
    if tier in ("host", "disk"):
        st.evict(sid, "device")
    if tier == "disk":
        st.evict(sid, "host")
    assert st.lookup(sid).tier == tier


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
@pytest.mark.parametrize("use", list(USES))
def test_drop_range_keeps_rows_bit_identical(tmp_path, use, tier):
    start, stop, f, nb, disk_blocks = USES[use]
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    to_tier(st, "a", tier)
    assert st.drop_range("a", start, stop).result() == 1
    want, ids = kept(x, start, stop), np.concatenate([IDS[:start], IDS[stop:]])
    info = st.lookup("a")
    assert info.durable and info.turn == 1
    np.testing.assert_array_equal(info.token_ids, ids)
    check(st, "a", want, turn_no=1)  # every layer, bit for bit (check compares exactly), zeros after
    quiet(st)  # no budget counts a byte that no table holds
    assert st.usage()["host"] == L * (nb - f) * BLK  # the kept blocks only (the loads above promoted them)
    assert st.usage()["disk"] == L * disk_blocks * BLK
    for layer in range(L):  # the engine's path: blocks + (off, n) assembled by a jitted program
        blocks, off, n, _ = st.layer_blocks("a", layer)
        got = np.asarray(assemble_blocks(tuple(jnp.asarray(b) for b in blocks), jnp.int32(off), jnp.int32(n), 40))
        np.testing.assert_array_equal(got[:, : want.shape[2]], want[layer])
    y = rows(6, 2)  # the next turn continues the shortened history
    save(st, "a", y, want.shape[2])
    assert st.commit_turn("a", np.concatenate([ids, np.arange(6)])).result() == 2
    want = cat(want, y)
    check(st, "a", want, turn_no=2)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "a", want, turn_no=2)
    np.testing.assert_array_equal(st.lookup("a").token_ids, np.concatenate([ids, np.arange(6)]))
    quiet(st)
    st.close()


def test_drop_range_twice_and_truncate_front_is_drop_range(tmp_path):
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    st.drop_range("a", 2, 9)  # not awaited: queued one after the other
    st.drop_range("a", 20, 38)
    st.truncate_front("a", 1).result()
    want = kept(kept(x, 2, 9), 20, 38)[:, :, 1:]
    check(st, "a", want, turn_no=1)
    assert st.drop_range("a", 3, 3).result() == 1  # nothing to drop
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "a", want, turn_no=1)
    st.close()


def test_drop_range_bad_input_loses_nothing(tmp_path):
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    for a, b in [(-1, 3), (3, 2), (0, N + 1), (1.5, 3), (True, 3), ("1", 2)]:
        with pytest.raises(LayoutMismatch):
            st.drop_range("a", a, b)
    save(st, "a", rows(3, 5), N)  # a turn is open
    with pytest.raises(LayoutMismatch, match="commit or abort the turn"):
        st.drop_range("a", 1, 4)
    st.abort_turn("a")
    check(st, "a", x, turn_no=1)
    quiet(st)
    st.close()


def test_drop_range_move_needs_host_room(tmp_path):
    # Host budget for 8 blocks of 3 layers: the 6-block session fits, with its 5-block moved copy it does not.
    st = open_store(tmp_path / "st", host_bytes=L * 8 * BLK)
    x = first_turn(st)
    with pytest.raises(BudgetError):
        st.drop_range("a", 4, 20)
    check(st, "a", x, turn_no=1)
    st.drop_range("a", 4, N - 3).result()  # a small kept copy fits
    check(st, "a", kept(x, 4, N - 3))
    quiet(st)
    st.close()


# ------------------------------------------------------------ concurrency: held worker points
@pytest.mark.parametrize("manifest_fails", [False, True])
def test_drop_range_while_the_last_turns_saves_are_held(tmp_path, manifest_fails):
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    y = rows(12, 3)
    hs = st.hooks.hold("save.start", sid="a")
    save(st, "a", y, N)
    f2 = st.commit_turn("a", np.concatenate([IDS, np.arange(12)]))
    hs.wait_reached()  # turn 2's saves are queued, none ran
    if manifest_fails:
        st.disk.faults.add("manifest", "EIO", sid="a", after=1)  # turn 2's manifest passes, the drop's fails
    fd = st.drop_range("a", 4, 30)  # needs rows turn 2's held saves have not written yet
    hs.release()
    assert f2.result() == 2
    full = cat(x, y)
    want = full if manifest_fails else kept(full, 4, 30)
    if manifest_fails:
        with pytest.raises(TurnFailed, match=r"drop of the history of session 'a' was not saved \(.*Input/output error.*\); the session stays at turn 2"):
            fd.result()
        with pytest.raises(TurnFailed):
            st.flush()
    else:
        fd.result()
    check(st, "a", want, turn_no=2)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "a", want, turn_no=2)
    st.close()


def test_drop_range_move_held_while_caller_loads_and_evicts(tmp_path):
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    hm = st.hooks.hold("drop.move", sid="a")
    fd = st.drop_range("a", 3, 17)
    hm.wait_reached()  # the copy has not started; the new history is already what lookup shows
    want = kept(x, 3, 17)
    np.testing.assert_array_equal(st.lookup("a").token_ids, np.concatenate([IDS[:3], IDS[17:]]))
    got = {}
    t = threading.Thread(target=lambda: got.update(v=np.asarray(st.load_layer("a", 1))))
    t.start()  # waits for the copy of its layer (read-your-writes)
    evs = [threading.Thread(target=st.evict, args=("a", tier)) for tier in ("device", "host")]
    for ev in evs:
        ev.start()  # each waits for the session's work; the copy needs the host tier
    assert not hm.arrivals > 1 and t.is_alive()
    hm.release()
    t.join()
    for ev in evs:
        ev.join()
    fd.result()
    np.testing.assert_array_equal(got["v"], want[1])
    check(st, "a", want, turn_no=1)
    quiet(st)
    st.close()


def test_tail_drop_holds_later_writes_until_its_manifest(tmp_path):
    """A tail drop's next turn rewrites rows the older manifest covers: none of its writes may land
    before the drop is durable. Here the drop's manifest fails: the old history must be intact."""
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    hm = st.hooks.hold("commit.manifest", sid="a")
    st.disk.faults.add("manifest", "ENOSPC", sid="a")
    fd = st.drop_range("a", 16, N)
    hm.wait_reached()
    hs = st.hooks.hold("save.start", sid="a")
    y = rows(24, 4)  # rows 16..39: whole blocks 2..4, which the old manifest calls valid
    save(st, "a", y, 16)
    f2 = st.commit_turn("a", np.concatenate([IDS[:16], np.arange(24)]))
    assert not hs.reached.wait(1.0)  # the worker is held at the barrier: the new turn's saves do not run
    hm.release()
    hs.release()
    with pytest.raises(DiskFull, match="drop of the history of session 'a' was not saved; the session stays at turn 1"):
        fd.result()
    with pytest.raises(DiskFull):
        f2.result()
    with pytest.raises(DiskFull):
        st.flush()
    check(st, "a", x, turn_no=1)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "a", x, turn_no=1)  # rows 16..44 on disk are the old ones
    st.close()


@pytest.mark.parametrize("op", ["chunk_write", "resize", "manifest"])
def test_drop_range_move_fault_rolls_back(tmp_path, op):
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    st.disk.faults.add(op, "ENOSPC", sid="a")
    fd = st.drop_range("a", 5, 21)
    with pytest.raises(DiskFull, match="drop of the history of session 'a' was not saved; the session stays at turn 1"):
        fd.result()
    with pytest.raises(DiskFull):
        st.flush()
    check(st, "a", x, turn_no=1)
    np.testing.assert_array_equal(st.lookup("a").token_ids, IDS)
    quiet(st)
    st.disk.faults.clear()
    st.drop_range("a", 5, 21).result()  # space is back: the same drop succeeds
    check(st, "a", kept(x, 5, 21), turn_no=1)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "a", kept(x, 5, 21), turn_no=1)
    quiet(st)
    st.close()


def test_drop_range_on_a_session_without_kv_edits_its_ids(tmp_path):
    st = open_store(tmp_path / "st")
    first_turn(st)
    st.close()
    kv = tmp_path / "st" / "s" / "a" / "kv"
    chunk = next(p for p in kv.iterdir() if p.name.startswith("c."))
    chunk.write_bytes(b"\0" * 10)  # damaged: the session's KV is lost on the first read
    st = open_store(tmp_path / "st")
    with pytest.raises(Exception):
        for layer in range(L):
            st.load_layer("a", layer)
    drain(st)
    st.flush()
    assert not st.lookup("a").kv_valid
    st.drop_range("a", 2, 40).result()
    info = st.lookup("a")
    np.testing.assert_array_equal(info.token_ids, np.concatenate([IDS[:2], IDS[40:]]))
    st.close()
    st = open_store(tmp_path / "st")
    info = st.lookup("a")
    assert not info.kv_valid
    np.testing.assert_array_equal(info.token_ids, np.concatenate([IDS[:2], IDS[40:]]))
    st.close()


def test_tail_drop_after_queued_saves_then_a_new_turn_reserves_its_blocks(tmp_path):
    """Found by scripts/torture_store.py (a 512-byte host leak): turn 2's queued saves put blocks past
    a tail drop's new end back in the host tier, a new turn's `save_layer` saw them there and reserved
    nothing for them, the drop's trim then freed them and the new save put them back uncounted."""
    st = open_store(tmp_path / "st")
    x = first_turn(st)
    y = rows(19, 6)  # turn 2: rows 45..63 (blocks 5..7)
    hs = st.hooks.hold("save.start", sid="a")
    save(st, "a", y, N)
    f2 = st.commit_turn("a", np.concatenate([IDS, np.arange(19)]))
    hs.wait_reached()
    ht = st.hooks.hold("drop.tail", sid="a")
    fd = st.drop_range("a", 20, N + 19)  # keep rows 0..19 (blocks 0..2)
    hs.release()  # turn 2's saves run: they write their chunks for turn 2's manifest
    ht.wait_reached()  # ... and the drop's trim has not run yet
    z = rows(30, 7)  # the next turn: rows 20..49 (blocks 2..6), reserved now
    save(st, "a", z, 20)
    ht.release()
    f3 = st.commit_turn("a", np.concatenate([IDS[:20], np.arange(500, 530)]))
    assert (f2.result(), fd.result(), f3.result()) == (2, 2, 3)
    want = cat(x[:, :, :20], z)
    check(st, "a", want, turn_no=3)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "a", want, turn_no=3)
    st.close()


@pytest.mark.parametrize("mode", ["move-held", "tail-held", "move-done"])
def test_sigkill_during_drop_range_leaves_the_old_or_the_new_history(tmp_path, mode):
    """A real SIGKILL: held before the drop's manifest (its moved rows written, or the next turn's saves
    queued behind a tail drop) the old history reopens bit-identical; after it, the new one."""
    import signal
    import subprocess

    root = tmp_path / "st"
    here = os.path.dirname(__file__)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([here, os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, os.path.join(here, "_drop_crash_child.py"), str(root), mode],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    x = rows(N, 1)
    if mode == "move-held":  # the copy reached the disk (blocks 5..9): the kill came after it
        kv = root / "s" / "a" / "kv"
        assert any(p.name.startswith("c.") and int(p.name.split(".")[3]) >= 6 for p in kv.iterdir())
    st = open_store(root)
    if mode == "move-done":
        check(st, "a", kept(x, 4, 20), turn_no=1)
        np.testing.assert_array_equal(st.lookup("a").token_ids, np.concatenate([IDS[:4], IDS[20:]]))
    else:
        check(st, "a", x, turn_no=1)
        np.testing.assert_array_equal(st.lookup("a").token_ids, IDS)
    quiet(st)
    st.close()
