"""The recall task: a fact given in a recent turn, asked for after older turns were truncated.

An item is a ChatML conversation: the system block, older turns of a self-generated conversation
(the filler), one turn in which the user gives a fact and the assistant acknowledges it, then a new
turn asking for it with the start of the assistant's answer already written (``Your locker code
is``). The window overflows at the question, so the oldest turns are dropped (whole turns, as the
engine does) while the fact turn stays. The answer counts as recalled when the model's top-1
prediction is the exact answer token at every answer position (what greedy decoding would write).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

FACTS = (
    ("Please remember this for later: my locker code is {x}.", "Sure, I will remember that your locker code is {x}.",
     "What is my locker code?", "Your locker code is", " {x}"),
    ("Note this down, please: the meeting is in room {x}.", "Got it: the meeting is in room {x}.",
     "Which room is the meeting in?", "The meeting is in room", " {x}"),
    ("Keep this in mind: my order number is {x}.", "Understood, your order number is {x}.",
     "What was my order number?", "Your order number is", " {x}"),
)


@dataclasses.dataclass
class RecallItem:
    history: np.ndarray  # [h] token ids: system block + filler turns + the fact turn
    question: np.ndarray  # [q] the question turn, the assistant header and the answer's first words
    answer: np.ndarray  # [a] the answer tokens (teacher-forced after ``question``)
    turn_starts: np.ndarray  # offsets of ``<|im_start|>`` in ``history``
    fact: str

    @property
    def continuation(self) -> np.ndarray:
        return np.concatenate([self.question, self.answer]).astype(np.int32)


def make_item(conversation: dict, tokenizer: Any, window: int, seed: int) -> RecallItem | None:
    """A recall item whose history fits ``window`` tokens, from whole turns of ``conversation``
    (the system block and the turns after a seeded start), or None when the conversation is too short."""
    rng = np.random.default_rng(seed)
    tpl = FACTS[int(rng.integers(len(FACTS)))]
    x = str(int(rng.integers(1000, 10000)))
    say, ack, ask, prefix, ans = (t.format(x=x) for t in tpl)
    fact_turn = tokenizer.encode(f"<|im_start|>user\n{say}<|im_end|>\n<|im_start|>assistant\n{ack}<|im_end|>\n")
    ids = np.asarray(conversation["ids"], np.int32)
    starts = [int(s) for s in conversation["turn_starts"]]
    system = ids[: starts[1]]
    budget = window - len(fact_turn) - len(system)
    # user turns after the system block: a seeded one among those leaving room to fill the budget
    user_tok = tokenizer.encode("<|im_start|>user")[1]
    bounds = starts + [len(ids)]
    user_starts = [s for s in starts[1:] if ids[s + 1] == user_tok]
    firsts = [s for s in user_starts if any(0.8 * budget <= e - s <= budget for e in bounds)]
    if not firsts or budget <= 0:
        return None
    first = firsts[int(rng.integers(len(firsts)))]
    ends = [e for e in bounds if first < e <= first + budget]
    if not ends:
        return None
    filler = ids[first : max(ends)]
    history = np.concatenate([system, filler, np.asarray(fact_turn, np.int32)]).astype(np.int32)
    q = tokenizer.encode(f"<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n{prefix}")
    full = tokenizer.encode(f"<|im_start|>user\n{ask}<|im_end|>\n<|im_start|>assistant\n{prefix}{ans}")
    if full[: len(q)] != q:
        raise ValueError(f"the answer {ans!r} changes the tokens of its prefix {prefix!r}")
    im_start = tokenizer.token_to_id("<|im_start|>")
    return RecallItem(history, np.asarray(q, np.int32), np.asarray(full[len(q):], np.int32),
                      np.flatnonzero(history == im_start), x)


def recalled(top1: np.ndarray, targets: np.ndarray, n_answer: int) -> bool:
    """Exact match: every answer token is the top-1 prediction (``targets``/``top1`` end with the answer)."""
    return bool(np.array_equal(top1[-n_answer:], targets[-n_answer:]))
