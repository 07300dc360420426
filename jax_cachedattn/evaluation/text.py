"""Local text for the truncation experiment: Python's own documentation and self-generated chats.

Nothing is downloaded. Prose comes from ``pydoc_data.topics`` (the English help text that ships
with CPython); conversations are ChatML multi-turn chats that the model under test writes itself,
from seeded opening questions and follow-ups, and are cached as token ids in a JSON file so a
rerun reads them back instead of generating them again.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.model import ModelConfig, bucket_length, decode_step, prefill, sample

OPENING_QUESTIONS = (
    "How do I read a CSV file in Python and compute the average of one column?",
    "What is the difference between a list and a tuple in Python?",
    "Can you explain how photosynthesis works?",
    "What are some good habits for writing clean code?",
    "How does a hash table work?",
    "Why is the sky blue?",
    "What should I pack for a three-day hiking trip?",
    "How do vaccines train the immune system?",
    "Explain recursion with a simple example.",
    "What is the best way to learn a new language as an adult?",
    "How do I make a simple bread at home?",
    "What causes the seasons on Earth?",
    "How does public-key cryptography work?",
    "What are the main causes of inflation?",
    "How can I improve my sleep?",
    "What is a binary search and when should I use it?",
)

PASTE_QUESTIONS = (
    "Here is a passage from the Python documentation:\n\n{passage}\n\nCan you explain what it means?",
    "I found this in the Python docs:\n\n{passage}\n\nWhat is the most important point here?",
    "Please summarize this part of the Python reference:\n\n{passage}",
)

FOLLOW_UPS = (
    "Can you give me an example?",
    "Tell me more about that.",
    "Why is that important?",
    "What are common mistakes people make with this?",
    "Can you explain it more simply?",
    "How would you summarize that in a few sentences?",
    "What would an expert add to this?",
    "Are there any alternatives?",
    "What is a related topic I should learn next?",
    "Can you go into more detail on the first point?",
)


def pydoc_text(split: str = "all", holdout: float = 0.2, seed: int = 0) -> str:
    """The help topics of ``pydoc_data.topics`` joined by blank lines, in a seeded order.

    ``split``: ``train`` (the first ``1 - holdout`` of the topics), ``eval`` (the rest) or ``all``.
    """
    from pydoc_data import topics

    names = sorted(topics.topics)
    order = np.random.default_rng(seed).permutation(len(names))
    n_train = int(round(len(names) * (1 - holdout)))
    pick = {"train": order[:n_train], "eval": order[n_train:], "all": order}.get(split)
    if pick is None:
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    return "\n\n".join(topics.topics[names[i]].strip() for i in pick)


def prose_sequences(ids: np.ndarray, n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` windows of ``length`` tokens from the token stream ``ids``, at seeded non-overlapping offsets."""
    ids = np.asarray(ids, np.int32)
    slots = len(ids) // length
    if slots < n:
        raise ValueError(f"the text has {len(ids)} tokens: too few for {n} windows of {length}")
    starts = np.sort(np.random.default_rng(seed).choice(slots, size=n, replace=False)) * length
    return [ids[s : s + length].copy() for s in starts]


# ---- self-generated conversations ---------------------------------------------------------------

@functools.partial(jax.jit, donate_argnames=("cache",))
def _write_rows(cache, new_kv, at):
    return jax.lax.dynamic_update_slice(cache, new_kv.astype(cache.dtype), (0, 0, at, 0, 0))


class _Generator:
    """Greedy or sampled continuation of one growing ChatML conversation over a fixed-size cache."""

    def __init__(self, params: Any, config: ModelConfig, capacity: int, key: jax.Array):
        self.params, self.config, self.key = params, config, key
        L, K, Dh = config.num_layers, config.num_kv_heads, config.head_dim
        self.cache = jnp.zeros((L, 2, capacity, K, Dh), config.jnp_dtype)
        self.length = 0

    def feed(self, ids: list[int]) -> jax.Array:
        """Append ``ids`` (prefill, padded to a bucket: few compiled shapes); returns the logits after the last one."""
        n = len(ids)
        T = bucket_length(n, minimum=32)
        padded = np.zeros(T, np.int32)
        padded[:n] = ids
        logits, new_kv = prefill(self.params, self.config, jnp.asarray(padded), self.cache, jnp.int32(self.length))
        self.cache = _write_rows(self.cache, new_kv, jnp.int32(self.length))
        self.length += n
        return logits[n - 1]

    def step(self, tok: int) -> jax.Array:
        logits, self.cache = decode_step(self.params, self.config, jnp.int32(tok), self.cache, jnp.int32(self.length))
        self.length += 1
        return logits

    def reply(self, logits, max_tokens: int, stop: set[int], temperature: float, top_p: float) -> list[int]:
        out: list[int] = []
        while True:
            self.key, sub = jax.random.split(self.key)
            tok = int(sample(logits, sub, temperature, top_p))
            out.append(tok)
            if tok in stop or len(out) >= max_tokens:
                return out
            logits = self.step(tok)


def generate_conversation(params: Any, config: ModelConfig, tokenizer: Any, min_tokens: int, seed: int, *,
                          reply_tokens: int = 128, temperature: float = 0.7, top_p: float = 0.9,
                          paste_prob: float = 0.6, passage_words: int = 120,
                          on_turn: Callable[[int], None] | None = None,
                          on_partial: Callable[[dict], None] | None = None, prefix: dict | None = None) -> dict:
    """One ChatML conversation of at least ``min_tokens`` tokens, written by the model itself.

    The user side is a seeded opening question, then seeded follow-ups; with probability
    ``paste_prob`` a follow-up pastes a passage of ``pydoc_text()`` (about ``passage_words`` words) and
    asks about it, as users paste documents into chats (it also halves the tokens to generate on a CPU).
    Every assistant reply is sampled from the model. Returns ``{"seed", "ids", "turn_starts", "messages"}``: ``turn_starts``
    are the token offsets where each ``<|im_start|>`` block begins (the system block is the first).
    ``on_partial`` gets that dict after every turn (a long generation that is stopped leaves whole turns).
    ``prefix``: an earlier conversation of this function (its ``ids`` and ``messages``) to continue
    rather than start anew: its tokens are prefilled, the follow-ups are drawn from a generator seeded by
    ``(seed, len(prefix ids))`` (a longer conversation without regenerating the stored turns).
    """
    n0 = len(prefix["ids"]) if prefix else 0
    rng = np.random.default_rng((seed, n0) if prefix else seed)
    key = jax.random.fold_in(jax.random.key(seed), n0) if prefix else jax.random.key(seed)
    gen = _Generator(params, config, bucket_length(max(min_tokens, n0) + 2 * reply_tokens + 128), key)
    end = list(tokenizer.assistant_end())
    words = pydoc_text().split()
    ids: list[int] = [int(t) for t in prefix["ids"]] if prefix else []
    messages: list[dict] = list(prefix["messages"]) if prefix else []
    if ids:
        gen.feed(ids)
    user = _next_user(rng, words, paste_prob, passage_words) if prefix else \
        OPENING_QUESTIONS[int(rng.integers(len(OPENING_QUESTIONS)))]
    first = not ids
    while len(ids) < min_tokens:
        prompt = list(tokenizer.chat_turn(user, first_turn=first))
        first = False
        reply = gen.reply(gen.feed(prompt), reply_tokens, tokenizer.stop_ids, temperature, top_p)
        text = tokenizer.decode([t for t in reply if t not in tokenizer.stop_ids], skip_special_tokens=True)
        # Every sampled token but the last was fed; feed it (unless it is a stop id) and the template's close.
        body = reply[:-1] if reply[-1] in tokenizer.stop_ids else reply
        gen.feed(body[len(reply) - 1:] + end)
        ids += prompt + body + end
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        if on_turn is not None:
            on_turn(len(ids))
        if on_partial is not None:
            on_partial(_conversation(seed, ids, messages, tokenizer))
        user = _next_user(rng, words, paste_prob, passage_words)
    return _conversation(seed, ids, messages, tokenizer)


def _next_user(rng: np.random.Generator, words: list[str], paste_prob: float, passage_words: int) -> str:
    """A seeded follow-up: a pasted pydoc passage with a question about it, or a short follow-up."""
    if rng.random() < paste_prob:
        start = int(rng.integers(len(words) - passage_words))
        passage = " ".join(words[start : start + passage_words])
        return PASTE_QUESTIONS[int(rng.integers(len(PASTE_QUESTIONS)))].format(passage=passage)
    return FOLLOW_UPS[int(rng.integers(len(FOLLOW_UPS)))]


def _conversation(seed: int, ids: list[int], messages: list[dict], tokenizer: Any) -> dict:
    starts = np.flatnonzero(np.asarray(ids, np.int32) == tokenizer.token_to_id("<|im_start|>")).tolist()
    return {"seed": seed, "ids": list(ids), "turn_starts": starts, "messages": list(messages)}


def token_roles(conversation: dict, tokenizer: Any, reply_tokens: int = 128) -> str:
    """One letter per token of a conversation: ``s``/``u``/``a`` the content of a system, user or assistant
    message, ``t`` the template (``<|im_start|>role\\n`` and ``<|im_end|>\\n``), ``f`` the ``<|im_end|>`` that
    closes a reply cut off at ``reply_tokens`` (a forced end of turn: the model did not choose to stop there)."""
    ids = np.asarray(conversation["ids"])
    starts = [int(s) for s in conversation["turn_starts"]] + [len(ids)]
    heads = {r[0]: [int(t) for t in tokenizer.encode(f"<|im_start|>{r}\n")] for r in ("system", "user", "assistant")}
    close = [int(t) for t in tokenizer.encode("<|im_end|>\n")]
    out = ["t"] * starts[0]
    for s, e in zip(starts[:-1], starts[1:]):
        r, h = next(((r, len(h)) for r, h in heads.items() if ids[s : s + len(h)].tolist() == h), ("?", 1))
        c = len(close) if e - s >= h + len(close) and ids[e - len(close) : e].tolist() == close else 0
        body = e - s - h - c
        tail = ["t"] * c
        if c and r == "a" and body >= reply_tokens:
            tail[0] = "f"
        out += (["t"] * h + [r] * max(body, 0) + tail)[: e - s]
    return "".join(out)


def load_or_generate_conversations(params: Any, config: ModelConfig, tokenizer: Any, n: int, min_tokens: int,
                                   seed: int, cache_file: Path | None, fingerprint: str = "",
                                   on_done: Callable[[int], None] | None = None,
                                   on_turn: Callable[[int], None] | None = None) -> list[dict]:
    """``n`` conversations (seeds ``seed .. seed+n-1``), read from ``cache_file`` when it holds them
    for this model and length, generated (and written back) otherwise."""
    cached: dict[str, Any] = {}
    if cache_file is not None and Path(cache_file).is_file():
        cached = json.loads(Path(cache_file).read_text())
        if cached.get("fingerprint") != fingerprint:
            cached = {}
    convs = {c["seed"]: c for c in cached.get("conversations", []) if len(c["ids"]) >= min_tokens}
    out = []
    for s in range(seed, seed + n):
        if s not in convs:
            convs[s] = generate_conversation(params, config, tokenizer, min_tokens, s, on_turn=on_turn)
            if cache_file is not None:
                Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
                body = {"fingerprint": fingerprint, "conversations": sorted(convs.values(), key=lambda c: c["seed"])}
                Path(cache_file).write_text(json.dumps(body))
        out.append(convs[s])
        if on_done is not None:
            on_done(s)
    return out
