"""Stale rows: a copy of a session's blocks made before its rows changed is never installed after.

Each test holds a worker (or the background caller) between taking a copy of a session's blocks and
installing it, changes the session's rows meanwhile (a turn committed through another tier, a drop),
lets the copy go on, and checks every row a load returns.
"""

import os
import sys
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _util import B, L, check, open_store, quiet, rows, turn  # noqa: E402


def cat(*xs):
    return np.concatenate(xs, axis=2)


def test_device_demotion_copied_before_a_turn_is_not_installed_after_it(tmp_path):
    """evict(sid, "device") copies a device-only session's blocks to the host tier outside the lock.
    Meanwhile a turn (saved through a promotion from disk) commits one row inside the same last block
    and the host copy is evicted again: the demotion's copy misses that row and must not be installed
    (it was, served as the session's rows: the torture's `1 of 5` wrong row)."""
    st = open_store(tmp_path / "st")
    a, b = rows(5, 1), rows(1, 2)
    turn(st, "s", a, 0).result()
    check(st, "s", a)  # every layer now has a device copy too
    st.evict("s", "host")  # device only
    h = st.hooks.hold("evict.demote", sid="s")
    t = threading.Thread(target=st.evict, args=("s", "device"))
    t.start()
    h.wait_reached()  # the device blocks (rows of turn 1) are copied, not yet installed in the host tier
    turn(st, "s", b, 5).result()  # the save brings "s" back from disk: host tier again, then turn 2
    st.evict("s", "host")  # idle again: out of the host tier (the device copy stays)
    h.release()
    t.join()
    check(st, "s", cat(a, b), turn_no=2)
    assert st.stats.stale_copies == 1
    quiet(st)
    st.close()


def test_a_promotion_in_flight_pins_the_session_against_other_copies(tmp_path):
    """The promotion side of the same race: a demotion is held after its copy while a prefetch of the
    device-only session starts and is held before its read. A promotion in flight pins the session
    (``Session.busy``): the demotion installs nothing, and a turn's save joins the promotion (waits for
    it) instead of reading the session again, so no copy made before the turn is installed after it."""
    st = open_store(tmp_path / "st")
    a, b = rows(5, 3), rows(1, 4)
    turn(st, "s", a, 0).result()
    check(st, "s", a)
    st.evict("s", "host")
    hd = st.hooks.hold("evict.demote", sid="s")
    t = threading.Thread(target=st.evict, args=("s", "device"))
    t.start()
    hd.wait_reached()  # the demotion copied the device blocks
    hp = st.hooks.hold("promote.read", sid="s")
    fut = st.prefetch("s")
    hp.wait_reached()  # a promotion in flight
    hd.release()
    t.join()
    assert st.lookup("s").tier == "disk"  # the demotion installed nothing (busy), then dropped the device copy
    done = threading.Event()

    def save():
        turn(st, "s", b, 5).result()
        done.set()

    t = threading.Thread(target=save)
    t.start()
    assert not done.wait(0.5)  # the save joined the promotion and waits for it
    hp.release()
    t.join()
    assert fut.result() is True
    check(st, "s", cat(a, b), turn_no=2)
    st.evict("s", "device")
    st.evict("s", "host")
    check(st, "s", cat(a, b), turn_no=2)
    assert st.stats.stale_copies == 0
    quiet(st)
    st.close()


def test_a_given_up_save_never_shows_in_the_rows(tmp_path):
    """The torture's give-up write (one layer saved past the end, then `abort_turn`), held after merging
    its rows and before publishing them, then released after the abort; and one that published before
    its abort: neither shows in a load, in the next turn (which rewrites the disk chunk it continues)
    nor after reopening."""
    st = open_store(tmp_path / "st")
    a, junk, b = rows(5, 5), rows(3, 6), rows(2, 7)
    turn(st, "s", a, 0).result()
    h = st.hooks.hold("save.write", sid="s")
    st.save_layer("s", 0, junk[0], 5)
    h.wait_reached()  # merged into new blocks, not published
    st.abort_turn("s")
    h.release()
    check(st, "s", a, turn_no=1)
    st.save_layer("s", 0, junk[0], 5)  # published before the abort this time
    st._wb.worker.submit(lambda: None).result()
    st.abort_turn("s")
    check(st, "s", a, turn_no=1)
    turn(st, "s", b, 5).result()  # rows 4, 5 share a disk chunk: row 4 rewritten from the host copy
    check(st, "s", cat(a, b), turn_no=2)
    st.evict("s", "device")
    st.evict("s", "host")
    check(st, "s", cat(a, b), turn_no=2)
    quiet(st)
    st.close()
    st = open_store(tmp_path / "st")
    check(st, "s", cat(a, b), turn_no=2)
    st.close()


def test_a_given_up_save_behind_a_failed_tail_drop_never_shows(tmp_path):
    """A rewind is the one way the end of a history grows without a write: a tail drop whose manifest
    fails brings back rows past the end it had set. A give-up save of those rows is queued behind the
    drop's barrier, so it runs after the rewind, dead, and the rows come back as they were."""
    from jax_cachedattn.store import DiskFull
    import pytest

    st = open_store(tmp_path / "st")
    a, junk = rows(6, 8), rows(3, 9)
    turn(st, "s", a, 0).result()
    hm = st.hooks.hold("commit.manifest", sid="s")
    st.disk.faults.add("manifest", "ENOSPC", sid="s")
    drop = st.drop_range("s", 3, 6)  # tail: end 6 -> 3, metadata only
    hm.wait_reached()
    st.save_layer("s", 0, junk[0], 3)  # the give-up write over the dropped rows, then its abort
    st.abort_turn("s")
    hm.release()
    with pytest.raises(DiskFull):
        drop.result()
    check(st, "s", a, turn_no=1)
    with pytest.raises(DiskFull):
        st.flush()
    quiet(st)
    st.close()


def test_a_served_load_keeps_its_rows_after_its_blocks_are_freed_and_reused(tmp_path):
    """Blocks are never recycled: a load's array keeps its rows after the session is evicted and
    deleted and another session's saves allocate new blocks (host blocks alias fresh buffers only)."""
    st = open_store(tmp_path / "st", device_bytes=0)
    a, b = rows(11, 10), rows(11, 11)
    turn(st, "s", a, 0).result()
    got = [st.load_layer("s", layer) for layer in range(L)]
    st.evict("s", "host")
    st.delete("s")
    turn(st, "t", b, 0).result()
    check(st, "t", b)
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(got[layer]), a[layer])
    quiet(st)
    st.close()


def _first_save_waits_for(st, sid, x, hold):
    """Commit ``x`` as session ``sid``'s first turn on a thread while ``hold`` keeps the work that holds the
    host tier's last room parked: the save must wait (not fail) until the hold is released, then succeed."""
    out = {}

    def save():
        try:
            out["turn"] = turn(st, sid, x, 0).result()
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            out["error"] = e

    t = threading.Thread(target=save, daemon=True)
    t.start()
    t.join(0.5)
    try:
        assert t.is_alive() and not out, out  # waiting for the held work, not failed
    finally:
        hold.release()  # also when the assertion fails: a held worker would keep the process from exiting
    t.join()
    assert "error" not in out, out.get("error")


def test_a_save_waits_for_a_promotion_that_holds_the_last_host_room(tmp_path):
    """The host tier holds one session's blocks. A prefetch of session "a" (on disk only) reserves that
    room and is held before its read; session "b"'s first save needs the same room. The promotion is
    bounded work that ends with "a" idle (evictable), so the save waits for it instead of failing with
    "no room in the host tier ... nothing evictable now" (what the smoke benchmark hit when the scheduler's
    prefetch and the running turn's save met in a full host tier)."""
    from _util import BLK

    st = open_store(tmp_path / "st", host_bytes=L * BLK)  # one block of every layer
    a, b = rows(5, 8), rows(3, 9)
    turn(st, "a", a, 0).result()
    st.evict("a", "device")
    st.evict("a", "host")
    assert st.lookup("a").tier == "disk"
    h = st.hooks.hold("promote.reserved", sid="a")
    fut = st.prefetch("a")
    h.wait_reached()  # the promotion holds the whole host tier; "a" is pinned
    _first_save_waits_for(st, "b", b, h)
    assert fut.result() is True  # "a" was installed, then evicted from the host tier to make room for "b"
    check(st, "b", b, turn_no=1)
    check(st, "a", a, turn_no=1)
    quiet(st)
    st.close()


def test_a_save_waits_for_a_demotion_that_holds_the_last_host_room(tmp_path):
    """The same with a demotion device -> host (the engine's pool evicting "a") holding the host tier's
    only room while it copies: "b"'s first save waits for the copy, then evicts the idle "a"."""
    from _util import BLK

    st = open_store(tmp_path / "st", host_bytes=L * BLK)
    a, b = rows(5, 10), rows(3, 11)
    turn(st, "a", a, 0).result()
    check(st, "a", a)  # a device copy of every layer
    st.evict("a", "host")  # device only
    h = st.hooks.hold("evict.demote", sid="a")
    d = threading.Thread(target=st.evict, args=("a", "device"), daemon=True)
    d.start()
    h.wait_reached()  # the copy holds the whole host tier
    _first_save_waits_for(st, "b", b, h)
    d.join()
    check(st, "b", b, turn_no=1)
    check(st, "a", a, turn_no=1)
    quiet(st)
    st.close()
