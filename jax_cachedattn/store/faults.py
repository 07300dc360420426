"""Fault injection for the disk tier: ENOSPC or EIO raised by chosen chunk writes, resizes, manifests.

`DiskTier` asks ``faults.check(op, sid)`` before each operation of these kinds (`OPS`); a rule that
matches raises the `OSError` there (a chunk write's error comes out of its commit future, as a real
one does). Tests and ``scripts/torture_store.py`` use it; with no rules it costs nothing::

    store.disk.faults.add("chunk_write", "ENOSPC", sid="a", after=2, times=1)
"""

from __future__ import annotations

import dataclasses
import errno
import random
import threading

OPS = ("chunk_write", "resize", "manifest", "read", "delete", "reclaim")  # reclaim: dead-front chunk deletes
KINDS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO}


@dataclasses.dataclass
class Rule:
    op: str
    kind: str = "ENOSPC"
    sid: str | None = None
    after: int = 0  # let this many matching operations pass first
    times: int | None = 1  # fail this many (None: every one until removed)
    prob: float = 1.0  # fail a matching operation with this probability (seeded)


class FaultInjector:
    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._rng = random.Random(seed)
        self.injected: dict[str, int] = {op: 0 for op in OPS}

    def add(self, op: str, kind: str = "ENOSPC", *, sid: str | None = None, after: int = 0,
            times: int | None = 1, prob: float = 1.0) -> Rule:
        if op not in OPS or kind not in KINDS:
            raise ValueError(f"op must be one of {OPS} and kind one of {tuple(KINDS)}")
        r = Rule(op, kind, sid, after, times, prob)
        with self._lock:
            self._rules.append(r)
        return r

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def check(self, op: str, sid: str | None) -> None:
        if not self._rules:
            return
        with self._lock:
            for r in self._rules:
                if r.op != op or (r.sid is not None and r.sid != sid):
                    continue
                if r.after > 0:
                    r.after -= 1
                    continue
                if r.prob < 1.0 and self._rng.random() >= r.prob:
                    continue
                if r.times is not None:
                    r.times -= 1
                    if r.times <= 0:
                        self._rules.remove(r)
                self.injected[op] += 1
                code = KINDS[r.kind]
                raise OSError(code, f"{'No space left on device' if code == errno.ENOSPC else 'Input/output error'}"
                              f" (injected into {op} of session {sid!r})")
