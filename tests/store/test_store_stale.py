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
