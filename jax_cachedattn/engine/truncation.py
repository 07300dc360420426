"""Context-window overflow: which history tokens to drop.

With decoupled RoPE the kept tokens' stored (pre-RoPE) KV stays valid: positions are re-applied
from 0 at attention time, so truncation costs no recompute.

The cut keeps the first ``sink`` tokens (the attention sink, StreamingLLM) and drops the oldest
tokens after them: ``[sink, sink + n)``. Models trained at scale park a large share of every head's
attention on the first tokens; dropping them leaves the kept KV without a sink and costs SmolLM2
1.2-3.6x in perplexity, keeping 4 brings the truncated cache back to a recompute of the same tokens
(docs/truncation.md). Sinks of 1, 4 and 16 measured alike on SmolLM2 (its sink is the first token);
4 is the default because other model families need more than one (StreamingLLM).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class ContextOverflow(ValueError):
    """The new prompt alone (plus the reply budget) does not fit the context window."""


class Cut(NamedTuple):
    """History rows ``[start, start + n)`` go; ``[0, start)`` (the sink) and ``[start + n, H)`` stay."""

    start: int
    n: int

    @property
    def stop(self) -> int:
        return self.start + self.n

    def keep(self, ids: np.ndarray) -> np.ndarray:
        """The kept tokens of ``ids`` (the history the cut was planned on)."""
        ids = np.asarray(ids)
        return np.concatenate([ids[: self.start], ids[self.stop :]]) if self.n else ids


NO_CUT = Cut(0, 0)


def plan_truncation(
    history_ids: np.ndarray,
    n_new: int,
    reserve: int,
    max_context: int,
    ratio: float,
    boundary_id: int | None = None,
    sink: int = 0,
) -> Cut:
    """Which history tokens to drop so ``history + n_new + reserve <= max_context``.

    Drops at least ``ceil(ratio * len(history))`` tokens once an overflow happens (so truncation
    is rare, as in the paper) and at least what the overflow needs. The first ``sink`` tokens stay
    (fewer when the overflow leaves no room for them); the cut starts after them and prefers to end at
    a turn boundary (the first ``boundary_id`` token at or after the minimal end, e.g. ``<|im_start|>``),
    so the kept tail starts with a whole turn. Returns ``Cut(0, 0)`` when everything fits.
    """
    h = int(len(history_ids))
    if n_new + reserve > max_context:
        raise ContextOverflow(
            f"the message ({n_new} tokens) plus the reply budget ({reserve} tokens) exceeds the context "
            f"window of {max_context} tokens"
        )
    if sink < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    overflow = h + n_new + reserve - max_context
    if overflow <= 0:
        return NO_CUT
    start = max(0, min(sink, h - overflow))  # the sink stays unless the overflow needs its rows too
    want = min(h - start, max(overflow, math.ceil(ratio * h)))
    stop = start + want
    if boundary_id is not None and stop < h:
        starts = np.flatnonzero(np.asarray(history_ids)[stop:] == boundary_id)
        if starts.size:
            stop += int(starts[0])
    return Cut(start, stop - start)
