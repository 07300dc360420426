"""What a turn will do, decided before any device work: a frozen :class:`TurnPlan`."""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_cachedattn.engine.truncation import NO_CUT, Cut, plan_truncation


@dataclasses.dataclass(frozen=True)
class TurnPlan:
    """One job, planned.

    hist_ids: the history after truncation; new_ids: the user turn's tokens. source: where the
    history's KV comes from (``new``, ``device``, ``host``, ``disk``, ``recompute``). compute_ids: the
    tokens the prefill computes (the new ones, or history + new on a recompute); cached_len: history
    rows whose KV is reused; save_from: the first row the store does not hold yet. turn / num_tokens:
    the store state the plan was made against (None for a new session).

    Before the turn the store drops, in this order: ``tail_drop`` stored rows past the common prefix with
    the new render of the conversation (``[num_tokens - tail_drop, num_tokens)``), then the truncation
    ``cut`` of what is left (``[cut.start, cut.stop)``: the sink before it stays).
    """

    sid: str
    new_ids: np.ndarray
    hist_ids: np.ndarray
    n_drop: int
    source: str
    compute_ids: np.ndarray
    cached_len: int
    save_from: int
    max_new: int
    chat: bool
    turn: int | None
    num_tokens: int
    kv_valid: bool = False
    sample_name: str | None = None  # names the turn's sampling key (default: the session id)
    cut: Cut = NO_CUT
    tail_drop: int = 0
    pool_preloaded: bool = False  # source "device" because the history was preloaded from host (pool_preload.py)

    @property
    def reused(self) -> int:
        return self.cached_len


def make_plan(sid: str, info, new_ids: np.ndarray, max_new: int, *, chat: bool, max_context: int, ratio: float,
              boundary_id: int | None, use_cache: bool, on_device: bool, sink: int = 0,
              keep: int | None = None) -> TurnPlan:
    """Plan a turn of ``sid`` against the store's ``info`` (None: a new session). ``on_device``: the
    pool holds the session's pages for ``info``'s state. ``keep``: how many leading stored tokens the
    new turn continues (the common prefix with a re-rendered conversation; None: all of them); the
    rest are dropped. ``sink``: tokens a truncation keeps at the front. Raises ContextOverflow."""
    hist_ids = np.zeros(0, np.int32) if info is None else np.asarray(info.token_ids, np.int32)
    keep = len(hist_ids) if keep is None else int(keep)
    if not 0 <= keep <= len(hist_ids):
        raise ValueError(f"keep={keep} outside the stored history of {len(hist_ids)} tokens")
    tail_drop = len(hist_ids) - keep
    hist_ids = hist_ids[:keep]
    reserve = max_new + 2  # the reply and the tokens that close it (<|im_end|>\n)
    cut = plan_truncation(hist_ids, len(new_ids), reserve, max_context, ratio, boundary_id, sink)
    kv_valid = info is not None and info.kv_valid
    hist_ids = cut.keep(hist_ids)
    if info is None:
        source = "new"
    elif not kv_valid or not use_cache:
        source = "recompute"
    elif on_device and not cut.n:  # a dropped tail is fine: the pages' first rows are the kept prefix
        source = "device"
    else:
        source = info.tier or "recompute"
    if source in ("new", "recompute"):
        compute_ids = np.concatenate([hist_ids, new_ids]).astype(np.int32)
        cached_len, save_from = 0, (len(hist_ids) if kv_valid else 0)
    else:
        compute_ids, cached_len, save_from = new_ids, len(hist_ids), len(hist_ids)
    return TurnPlan(sid, new_ids, hist_ids, cut.n, source, compute_ids, cached_len, save_from, max_new, chat,
                    None if info is None else info.turn, 0 if info is None else info.num_tokens, kv_valid,
                    cut=cut, tail_drop=tail_drop)
