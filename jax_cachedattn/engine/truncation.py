"""Context-window overflow: how many of the oldest history tokens to drop.

With decoupled RoPE the kept tokens' stored (pre-RoPE) KV stays valid: positions are re-applied
from 0 at attention time, so truncation costs no recompute.
"""

from __future__ import annotations

import math

import numpy as np


class ContextOverflow(ValueError):
    """The new prompt alone (plus the reply budget) does not fit the context window."""


def plan_truncation(
    history_ids: np.ndarray,
    n_new: int,
    reserve: int,
    max_context: int,
    ratio: float,
    boundary_id: int | None = None,
) -> int:
    """Number of oldest history tokens to drop so ``history + n_new + reserve <= max_context``.

    Drops at least ``ceil(ratio * len(history))`` tokens once an overflow happens (so truncation
    is rare, as in the paper), at least what the overflow needs, and prefers to cut at a turn
    boundary (the first ``boundary_id`` token at or after that point, e.g. ``<|im_start|>``).
    Returns 0 when everything fits.
    """
    h = int(len(history_ids))
    if n_new + reserve > max_context:
        raise ContextOverflow(
            f"the message ({n_new} tokens) plus the reply budget ({reserve} tokens) exceeds the context "
            f"window of {max_context} tokens"
        )
    overflow = h + n_new + reserve - max_context
    if overflow <= 0:
        return 0
    want = min(h, max(overflow, math.ceil(ratio * h)))
    if boundary_id is not None and want < h:
        starts = np.flatnonzero(np.asarray(history_ids)[want:] == boundary_id)
        if starts.size:
            return want + int(starts[0])
    return want
