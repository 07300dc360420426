"""The pure part of a batch job: which replies a conversation asks for (`plan_units`), its sessions'
ids, and the tokens that continue a stored conversation as the model's chat template renders it
(`turn_tokens`). See jax_cachedattn/batch.py for the job."""

from __future__ import annotations

import dataclasses
import hashlib
import re

from jax_cachedattn.chat_template import ChatTemplateError, render_turn
from jax_cachedattn.conversations import Conversation, Message
from jax_cachedattn.engine.warmup import TurnShape

__all__ = ["Unit", "plan_units", "rerenders", "session_ids", "turn_shapes", "turn_tokens"]


@dataclasses.dataclass(frozen=True)
class Unit:
    """One reply to compute: user turn ``turn`` (0-based among the conversation's user turns).

    ``before``: the messages rendered ahead of the user message (history not yet in the session).
    ``scratch``: the reply is computed on a copy of the session and not kept as history."""

    turn: int
    before: tuple[Message, ...]
    user: Message
    scratch: bool = False


def plan_units(conv: Conversation, history: str, reply_all: bool = False) -> list[Unit]:
    """The replies a conversation asks for, in order (see the module docstring)."""
    msgs, units, pending, i, t = conv.messages, [], [], 0, 0
    while i < len(msgs):
        if msgs[i].role != "user":
            pending.append(msgs[i])      # system turns, a leading assistant turn
            i += 1
            continue
        j = i + 1
        while j < len(msgs) and msgs[j].role == "assistant":
            j += 1
        given = list(msgs[i + 1 : j])
        if history == "generated" or not given:
            units.append(Unit(t, tuple(pending), msgs[i]))   # the file's reply, if any, is replaced
            pending = []
        else:
            if reply_all:
                units.append(Unit(t, tuple(pending), msgs[i], scratch=True))
            pending += [msgs[i]] + given
        i, t = j, t + 1
    return units


def session_ids(job: str, conv_id: str) -> tuple[str, str]:
    """(session, scratch session) of a conversation: store-safe, unique per job and conversation."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", conv_id)[:64]
    h = hashlib.sha1(conv_id.encode("utf-8")).hexdigest()[:10]
    sid = f"bj-{job}.{safe}.{h}"
    return sid, sid + ".r"


def dicts(msgs) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in msgs]


def turn_tokens(tok, history: list[dict], new: list[dict], last_token: int | None) -> tuple[list[int], list[int]]:
    """``(closing, rendered)``: the token ids that continue a session holding ``history`` (the chat
    messages already in it, the last one a reply whose last token is ``last_token``) with the ``new``
    messages and the generation prompt. ``rendered`` is what the chat template adds; ``closing`` ends
    the previous reply as the template does (empty for a new session: ``history`` empty,
    ``last_token`` None). Raises ChatTemplateError when the template renders ``history`` (or the
    prompt before its last reply) otherwise once ``new`` follows it: the stored tokens would not be a
    prefix of the conversation."""
    if last_token is None:
        return [], tok.chat(history + new)
    plan = render_turn(tok, history, new)
    # The session holds the previous prompt (``history`` less its last reply, rendered with the
    # generation prompt), the reply, and its closing: both renders must still be there.
    if plan.drop or not tok.render_chat(history + new).startswith(tok.render_chat(history[:-1])):
        raise ChatTemplateError("the chat template renders the earlier turns differently once this turn follows "
                                "(e.g. it moves the system prompt into the last user turn): a stored history "
                                "cannot continue")
    end = tok.assistant_end()
    closing = end[1:] if end and last_token == end[0] else end
    return list(closing), list(plan.compute)


def rerenders(tok, units: list[Unit]) -> bool:
    """Whether the chat template renders an earlier part of this conversation differently once a later
    turn follows (Mistral's moves the system prompt into the last user turn), so that a stored history
    cannot be continued token by token (``turn_tokens`` would refuse it). Decided from the input alone
    (each reply a stand-in), so a resumed job takes the same way through the conversation."""
    hist: list[dict] = []
    for u in units:
        new = dicts(u.before + (u.user,))
        try:
            turn_tokens(tok, hist, new, None if not hist else -1)
        except ChatTemplateError:
            return True
        if not u.scratch:
            hist += new + [{"role": "assistant", "content": "OK."}]
    return False


def turn_shapes(tok, units: list[Unit], max_new: int, max_context: int, skip=frozenset()) -> tuple[list[TurnShape], int]:
    """The lengths of the turns a conversation's ``units`` will run (``skip``: user turns already
    written), for the engine's warm-up: ``(shapes, turns not covered)``. A prompt's length is known
    from the input (what the template adds, after the 0-2 tokens that close the reply before it); a
    history grows by each main turn's prompt and its reply of 1 to ``max_new`` tokens. Not covered:
    turns from the first one that may overflow ``max_context`` (the truncation's cut depends on the
    replies) and conversations the template re-renders (the messages route)."""
    end = len(tok.assistant_end())
    hist: list[dict] = []
    lo = hi = 0
    out: list[TurnShape] = []
    for k, u in enumerate(units):
        new = dicts(u.before + (u.user,))
        try:
            if not hist:
                p = (len(tok.chat(new)),) * 2
            else:
                n = len(turn_tokens(tok, hist, new, -1)[1])
                p = (n + max(0, end - 1), n + end)
        except ChatTemplateError:   # the messages route: not covered
            return out, len([x for x in units[k:] if x.turn not in skip])
        if hi + p[1] + max_new + 2 > max_context:   # a truncation may cut: later lengths unknown
            return out, len([x for x in units[k:] if x.turn not in skip])
        if u.turn not in skip:
            out.append(TurnShape((lo, hi), p))
        if not u.scratch:
            hist += new + [{"role": "assistant", "content": "OK."}]
            lo, hi = lo + p[0] + 1, hi + p[1] + max_new
    return out, 0
