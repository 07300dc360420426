"""Named points in the store's worker threads where a test can hold the work and let the caller go on.

The store calls ``hooks.point(name, sid)`` at each of these names (the list is `POINTS`); nothing is
held unless a test asked for it, and then the cost is one dict lookup::

    h = store.hooks.hold("commit.manifest", sid="a")   # the next commit of "a" stops before its manifest
    fut = store.commit_turn("a", ids)
    h.reached.wait()                                   # the committer is now parked there
    ...                                                # the caller goes on: save, truncate, evict, ...
    h.release()                                        # the commit continues
"""

from __future__ import annotations

import threading

POINTS = (
    "save.start",  # a queued save is about to run (save worker)
    "save.write",  # a save merged its rows and is about to publish them and write full blocks
    "save.resize",  # the save worker is about to grow a session's disk array (TensorStore resize)
    "commit.flush",  # a turn's partial tail blocks are about to be written (save worker)
    "commit.wait",  # the committer is about to wait for the turn's writes
    "commit.manifest",  # the turn's data is written; its manifest is about to be written
    "truncate.drop",  # a truncation is about to drop the front blocks from the host tier (save worker)
    "drop.move",  # a drop_range is about to copy the kept rows to their new blocks (save worker)
    "drop.tail",  # a drop_range of the tail is about to trim the host tier (save worker)
    "promote.read",  # a disk -> host promotion is about to read
    "promote.reserved",  # a promotion holds its host room (the session pinned) and is about to read
    "evict.demote",  # evict(sid, "device") copied the device blocks to host memory; about to install them
    "delete.disk",  # a deleted session's files are about to be removed (save worker)
    "reclaim.delete",  # the chunks before a durable manifest's front are about to be deleted (save worker)
)


class Hold:
    """One held point: ``reached`` is set when a thread arrives; it waits until `release`."""

    def __init__(self, name: str, sid: str | None, times: int):
        self.name, self.sid, self.times = name, sid, times
        self.reached = threading.Event()
        self._go = threading.Event()
        self.arrivals = 0

    def release(self) -> None:
        self._go.set()

    def wait_reached(self, timeout: float = 30.0) -> None:
        if not self.reached.wait(timeout):
            raise TimeoutError(f"nothing reached hook {self.name!r} (sid={self.sid!r}) in {timeout} s")


class Hooks:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, list[Hold]] = {}

    def hold(self, name: str, sid: str | None = None, times: int = 1) -> Hold:
        """Hold the next ``times`` arrivals at ``name`` (of session ``sid``, or any session)."""
        if name not in POINTS:
            raise ValueError(f"unknown hook point {name!r}; one of {POINTS}")
        h = Hold(name, sid, times)
        with self._lock:
            self._held.setdefault(name, []).append(h)
        return h

    def release_all(self) -> None:
        with self._lock:
            holds = [h for hs in self._held.values() for h in hs]
            self._held.clear()
        for h in holds:
            h.release()

    def point(self, name: str, sid: str) -> None:
        if not self._held:
            return
        with self._lock:
            hs = self._held.get(name)
            h = next((h for h in hs or () if h.sid in (None, sid) and h.times > 0), None)
            if h is None:
                return
            h.times -= 1
            h.arrivals += 1
            if h.times == 0:
                hs.remove(h)
        h.reached.set()
        h._go.wait()
