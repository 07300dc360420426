"""Child process for test_store_drop's SIGKILL tests: one committed turn, then a drop_range held at a
named point (or finished); prints a line when the parent may kill it, then waits to be killed."""

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _util import open_store, rows, save  # noqa: E402

N = 45
IDS = np.arange(100, 100 + N, dtype=np.int32)


def main(root: str, mode: str) -> None:
    st = open_store(root)
    x = rows(N, 1)
    save(st, "a", x, 0)
    st.commit_turn("a", IDS).result()
    if mode == "move-done":
        st.drop_range("a", 4, 20).result()
    else:
        h = st.hooks.hold("commit.manifest", sid="a")  # the drop's data is written, its manifest is next
        if mode == "move-held":
            st.drop_range("a", 4, 20)
        else:  # "tail-held": a tail drop, then the next turn's saves (rows 16..39) and commit queued
            st.drop_range("a", 16, N)
            save(st, "a", rows(24, 9), 16)
            st.commit_turn("a", np.concatenate([IDS[:16], np.arange(24)]))
            time.sleep(0.5)  # time for the save worker to run anything it may run
        h.wait_reached()
    print("ready", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
