"""The job queue: what the engine runs next, in arrival order."""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Iterator


@dataclasses.dataclass
class Job:
    """One turn of one session, waiting to run.

    arrival_s: trace time the turn was submitted. new_tokens: prompt tokens of the turn. max_new_tokens:
    the output budget. turn: index of the turn in its session (0 = first). prompt_ids: the real token
    ids when the model runs for real. history_tokens: tokens the session held before this turn (set by
    the driver; the store may have truncated them).
    """

    sid: str
    arrival_s: float
    new_tokens: int
    max_new_tokens: int
    turn: int = 0
    prompt_ids: tuple[int, ...] | None = None
    history_tokens: int = 0
    seq: int = -1


class JobQueue:
    """First come, first served; the scheduler reads ahead of the head without taking."""

    def __init__(self) -> None:
        self._q: deque[Job] = deque()
        self._seq = itertools.count()

    def push(self, job: Job) -> None:
        if self._q and job.arrival_s < self._q[-1].arrival_s:
            raise ValueError(f"job of {job.sid!r} arrives at {job.arrival_s} before the queue's tail")
        job.seq = next(self._seq)
        self._q.append(job)

    def pop(self) -> Job:
        return self._q.popleft()

    def peek(self, n: int) -> list[Job]:
        """The first ``n`` jobs, head first."""
        return list(itertools.islice(self._q, max(0, n)))

    def sessions(self) -> list[str]:
        """Session ids in queue order (a session may appear once: closed-loop sessions have at most
        one turn waiting)."""
        return [j.sid for j in self._q]

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._q)
