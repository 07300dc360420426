"""``Engine.append``: take in finished turns without decoding (teacher forcing: a recorded assistant
reply becomes the history as given, not generated).

The turn path without its decode: the same plan (engine/plan.py, truncation included), the same
prefill (its KV saved to the store layer by layer as it is computed), the same page writes, then the
commit. Nothing is sampled, no decode slot is taken.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

import numpy as np

from jax_cachedattn.chat_template import ROLES, ChatTemplateError, plan_turn
from jax_cachedattn.engine.config import TurnResult
from jax_cachedattn.engine.plan import make_plan
from jax_cachedattn.model import validate_tokens
from jax_cachedattn.store import validate_session_id


def _messages(messages) -> list[dict]:
    """A whole conversation to append: ``[{"role", "content"}, ...]`` (it may end with the assistant's)."""
    if not messages:
        raise ChatTemplateError("the conversation must be a non-empty list of {\"role\", \"content\"} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}, not a {{\"role\", \"content\"}} object")
        if m.get("role") not in ROLES:
            raise ChatTemplateError(f"message {i}: role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"message {i} ({m['role']}): content must be a string")
        out.append(dict(m))
    return out


def append(engine, session_id: str, message, InputError: type[Exception] = ValueError) -> TurnResult:
    """See :meth:`jax_cachedattn.engine.Engine.append` (which passes its ``InputError`` to raise)."""
    e, mc, ec = engine, engine.model_config, engine.config
    if e.store is None:
        raise InputError("append needs a store: without one nothing is kept")
    sid = validate_session_id(session_id)
    if any(a.plan.sid == sid for a in e._slots.values()):
        raise InputError(f"session {sid!r} has a turn in flight")
    info = e.store.lookup(sid)
    whole = isinstance(message, (list, tuple)) and any(isinstance(m, Mapping) for m in message)
    keep = None
    if whole:
        if e.tokenizer is None:
            raise InputError("this engine has no tokenizer: pass token ids")
        try:
            ids = e.tokenizer.chat(_messages(message), add_generation_prompt=False)
            stored = np.zeros(0, np.int32) if info is None else info.token_ids
            p = plan_turn(stored, ids, budget=mc.max_context - 2)
        except ChatTemplateError as err:
            raise InputError(str(err).splitlines()[0]) from None
        new_ids, keep = np.asarray(p.compute, np.int32), p.reuse
    else:
        new_ids = np.asarray(message, np.int32).reshape(-1) if not isinstance(message, str) else None
        if new_ids is None:
            raise InputError("append takes token ids or the whole conversation as messages, not a string")
        if new_ids.size == 0:
            raise InputError("nothing to append")
    new_ids = validate_tokens(new_ids, mc, what="appended tokens")
    on_dev = info is not None and e.pool.holds(sid, info.turn, info.num_tokens)
    # max_new=1: the plan's reserve for a reply (none comes) is kept as small as the planner allows.
    plan = make_plan(sid, info, new_ids, 1, chat=False, max_context=mc.max_context, ratio=ec.truncation_ratio,
                     boundary_id=e._boundary_id, use_cache=ec.use_cache, on_device=on_dev and ec.use_cache,
                     sink=ec.truncation_sink, keep=keep)
    if plan.source == "device" and e.pool.entry(sid).preloaded:  # pages a queued job's preload left (pool_preload.py)
        plan = dataclasses.replace(plan, pool_preloaded=True)
    t0 = time.perf_counter()
    store, pool = e.store, e.pool
    # The turn path's own reservation (promises of slots in flight respected) and chunked prefill, no slot.
    s = e._begin(-1, plan, -1, t0, t0)
    a = None
    try:
        while a is None:
            a = e._resume(s, insert=False)  # on failure it gives its pages back
    except BaseException:
        e._abort_session(sid)
        raise
    try:
        all_ids = np.concatenate([plan.hist_ids, plan.new_ids]).astype(np.int32)
        commit = store.commit_turn(sid, all_ids)
    except BaseException:
        e._abort(a)
        raise
    info = store.lookup(sid)
    if ec.keep_pages:
        pool.retain(sid, a.pages, info.turn, info.num_tokens)
        a.pages = []
    e._give_back(a)
    plan, pf, dt = a.plan, a.prefill, time.perf_counter() - t0
    return TurnResult(session=sid, reply="", reply_tokens=[], history_tokens=len(plan.hist_ids),
                      prompt_tokens=len(plan.new_ids), generated_tokens=0, truncated_tokens=plan.n_drop,
                      dropped_tokens=plan.tail_drop, ttft_s=dt, total_s=dt, source="host" if plan.pool_preloaded else plan.source,
                      reused_tokens=plan.cached_len, read_ahead=pf.ahead, preload="pool" if plan.pool_preloaded else pf.mode,
                      preloaded_layers=e.model_config.num_layers if plan.pool_preloaded else pf.preloaded, commit=commit)
