"""Multi-turn workloads: seeded generators and a tokenised ShareGPT/OpenAI-chat loader.

A workload is a list of sessions (conversations). Sessions arrive as a Poisson process; inside a
session the workload is a closed loop: turn ``k + 1`` is submitted ``think_s`` seconds after the reply
to turn ``k`` has finished (as SGLang's ``bench_multiturn.py`` and LMCache's multi-round QA do), so
the arrival times of later turns depend on how fast the server answers and are set by the driver
(``jax_cachedattn.bench.driver``), not here. A time-compression factor divides every inter-arrival
and think time (a day of traffic replayed in minutes).

Generators (``generate(preset, ...)``), each with the statistics it is calibrated to:

* ``sharegpt``: ShareGPT V3 with its ``id_N`` parts merged: user turns per conversation mean 6.5,
  median 3 (log-normal, rounded, at least 1, at most 256); user message mean ~90, median 20 tokens;
  reply mean ~340, median ~310 tokens; ~17-19 % of conversations exceed 4,096 tokens in total.
* ``paper``: the CachedAttention paper's trace: 5.75 turns per session on average (geometric),
  sessions arriving as a Poisson process at 1.0/s, ShareGPT-like message lengths.
* ``long``: a ~1,000-token document in the first turn, then short questions about it.

Think times are log-normal (median ``think_median_s``, shape ``think_sigma``), the same law for every
session but each session draws its own scale (``think_session_sigma``), so a session's observed
think times say something about its next one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

PRESETS = ("sharegpt", "paper", "long")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One user turn: ``user_tokens`` new prompt tokens, a reply of ``reply_tokens`` (the output
    budget), submitted ``think_s`` (trace seconds, compression applied) after the previous reply;
    ``prompt_ids``: real token ids when the workload was tokenised (None for synthetic lengths);
    ``reply_ids``: the recorded reply's token ids where the trace has them (a benchmark that feeds
    recorded replies into the history instead of decoding them reads these)."""

    user_tokens: int
    reply_tokens: int
    think_s: float = 0.0
    prompt_ids: tuple[int, ...] | None = None
    reply_ids: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Session:
    """``think_median_s``: the median of this session's think-time law where a generator drew it (a
    diagnostic's oracle reads it, `jax_cachedattn.bench.gap`; no policy does), else None."""

    sid: str
    start_s: float
    turns: tuple[Turn, ...]
    think_median_s: float | None = None

    @property
    def total_tokens(self) -> int:
        return sum(t.user_tokens + t.reply_tokens for t in self.turns)


@dataclasses.dataclass
class Workload:
    name: str
    sessions: list[Session]

    @property
    def num_turns(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def stats(self) -> dict:
        """The statistics the generators are calibrated to, measured on this workload."""
        turns = np.array([len(s.turns) for s in self.sessions])
        users = np.array([t.user_tokens for s in self.sessions for t in s.turns])
        replies = np.array([t.reply_tokens for s in self.sessions for t in s.turns])
        thinks = np.array([t.think_s for s in self.sessions for t in s.turns[1:]] or [0.0])
        totals = np.array([s.total_tokens for s in self.sessions])
        starts = np.sort([s.start_s for s in self.sessions])
        gaps = np.diff(starts) if len(starts) > 1 else np.array([0.0])
        return {
            "sessions": len(self.sessions), "turns": int(turns.sum()),
            "turns_mean": float(turns.mean()), "turns_median": float(np.median(turns)),
            "user_tokens_mean": float(users.mean()), "user_tokens_median": float(np.median(users)),
            "reply_tokens_mean": float(replies.mean()), "reply_tokens_median": float(np.median(replies)),
            "share_over_4096": float((totals > 4096).mean()),
            "total_tokens": int(totals.sum()),
            "think_median_s": float(np.median(thinks)),
            "arrival_rate_per_s": float(1.0 / gaps.mean()) if gaps.mean() > 0 else 0.0,
        }


def _lognormal(rng: np.random.Generator, median: float, sigma: float, size, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, size)), lo, hi).astype(np.int64)


def generate(
    preset: str,
    num_sessions: int,
    *,
    seed: int = 0,
    rate_per_s: float = 1.0,
    think_median_s: float = 30.0,
    think_sigma: float = 0.8,
    think_session_sigma: float = 0.5,
    time_compression: float = 1.0,
    max_user_tokens: int = 4096,
    max_reply_tokens: int = 2048,
    length_scale: float = 1.0,
) -> Workload:
    """``num_sessions`` sessions of ``preset`` (see the module docstring), seeded.

    ``length_scale`` multiplies every message length (small models on a CPU replay the same shape of
    trace with shorter messages); ``time_compression`` divides arrival gaps and think times.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown workload preset {preset!r}; expected one of {PRESETS}")
    if num_sessions < 1 or rate_per_s <= 0 or time_compression <= 0 or length_scale <= 0:
        raise ValueError("num_sessions >= 1, rate_per_s > 0, time_compression > 0 and length_scale > 0 are required")
    rng = np.random.default_rng(seed)
    if preset == "sharegpt":
        n_turns = np.minimum(np.maximum(1, np.round(rng.lognormal(0.98, 1.33, num_sessions))), 256).astype(int)
    elif preset == "paper":
        n_turns = rng.geometric(1.0 / 5.75, num_sessions)
    else:
        n_turns = 1 + rng.geometric(1.0 / 4.0, num_sessions)
    starts = np.cumsum(rng.exponential(1.0 / rate_per_s, num_sessions)) / time_compression
    width = len(str(num_sessions - 1))
    sessions = []
    for i in range(num_sessions):
        k = int(n_turns[i])
        user = _lognormal(rng, 20 * length_scale, 1.77, k, 1, max_user_tokens)
        reply = _lognormal(rng, 310 * length_scale, 0.43, k, 1, max_reply_tokens)
        if preset == "long":
            user[0] = max(1, int(round(rng.normal(1000, 100) * length_scale)))
            user[1:] = _lognormal(rng, 15 * length_scale, 0.5, k - 1, 1, max_user_tokens)
            reply = _lognormal(rng, 120 * length_scale, 0.5, k, 1, max_reply_tokens)
        scale = think_median_s * math.exp(rng.normal(0.0, think_session_sigma))
        think = rng.lognormal(math.log(scale), think_sigma, k) / time_compression
        think[0] = 0.0
        turns = tuple(Turn(int(u), int(r), float(t)) for u, r, t in zip(user, reply, think))
        sessions.append(Session(f"s{i:0{width}d}", float(starts[i]), turns, scale / time_compression))
    return Workload(f"synthetic:{preset}", sessions)


def from_conversations(
    conversations: Iterable,
    tokenizer,
    *,
    seed: int = 0,
    rate_per_s: float = 1.0,
    think_median_s: float = 30.0,
    think_sigma: float = 0.8,
    time_compression: float = 1.0,
    max_sessions: int | None = None,
    max_reply_tokens: int = 2048,
    max_prompt_tokens: int | None = None,
    name: str = "sharegpt",
) -> Workload:
    """A workload from parsed conversations (``jax_cachedattn.conversations.read_conversations``:
    ``Conversation`` items; ``BadRecord`` items are skipped), tokenised with ``tokenizer``.

    Each user message (with the system or leading assistant turns before it folded in as history
    text) becomes a turn whose ``prompt_ids`` are the chat template's rendering of it; the recorded
    assistant reply's token count is the turn's output budget and its token ids the turn's ``reply_ids``
    (a benchmark may feed them into the history instead of decoding a reply).
    Arrivals and think times are drawn as in :func:`generate`.
    """
    rng = np.random.default_rng(seed)
    sessions: list[Session] = []
    t = 0.0
    for conv in conversations:
        if not hasattr(conv, "messages"):
            continue  # a BadRecord
        turns: list[Turn] = []
        pending: list[str] = []  # system / leading assistant text, sent with the next user turn
        think_scale = think_median_s * math.exp(rng.normal(0.0, 0.5))
        for i, m in enumerate(conv.messages):
            if m.role == "user":
                text = "\n\n".join(pending + [m.content])
                pending = []
                ids = tokenizer.chat_turn(text, first_turn=not turns)
                if max_prompt_tokens is not None:
                    ids = ids[-max_prompt_tokens:]
                nxt = conv.messages[i + 1] if i + 1 < len(conv.messages) else None
                rids = None
                if nxt is not None and nxt.role == "assistant" and nxt.content:
                    rids = tuple(int(x) for x in tokenizer.encode(nxt.content)[:max_reply_tokens])
                reply = len(rids) if rids else 64
                think = 0.0 if not turns else float(rng.lognormal(math.log(think_scale), think_sigma)) / time_compression
                turns.append(Turn(len(ids), max(1, min(reply, max_reply_tokens)), think, tuple(int(x) for x in ids),
                                  rids or None))
            elif not turns or m.role == "system":
                pending.append(m.content)
        if not turns:
            continue
        t += float(rng.exponential(1.0 / rate_per_s)) / time_compression
        sessions.append(Session(f"c{len(sessions):06d}", t, tuple(turns)))
        if max_sessions is not None and len(sessions) >= max_sessions:
            break
    if not sessions:
        raise ValueError("no usable conversation in the input")
    return Workload(f"sharegpt:{name}", sessions)


def with_token_ids(workload: Workload, vocab_size: int, seed: int = 0, low: int = 16) -> Workload:
    """The same workload with random prompt (and reply) token ids (for a real run of a synthetic trace)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in workload.sessions:
        turns = tuple(dataclasses.replace(t, prompt_ids=tuple(int(x) for x in rng.integers(low, vocab_size, t.user_tokens)),
                                          reply_ids=tuple(int(x) for x in rng.integers(low, vocab_size, t.reply_tokens)))
                      for t in s.turns)
        out.append(dataclasses.replace(s, turns=turns))
    return Workload(workload.name, out)


def truncate_sessions(workload: Workload, max_turns: int | None = None, max_sessions: int | None = None,
                      min_turns: int | None = None) -> Workload:
    """The first ``max_sessions`` sessions of at least ``min_turns`` turns, each cut to ``max_turns`` turns."""
    sess = [s for s in workload.sessions if len(s.turns) >= (min_turns or 1)]
    sess = sess[:max_sessions] if max_sessions else sess
    if max_turns:
        sess = [dataclasses.replace(s, turns=s.turns[:max_turns]) for s in sess]
    return Workload(workload.name, list(sess))
