"""Workload generators: statistics within tolerance of their parameters; the tokenised loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jax_cachedattn.conversations import read_conversations
from jax_cachedattn.workload import from_conversations, generate, with_token_ids


def test_sharegpt_generator_matches_its_calibration():
    st = generate("sharegpt", 6000, seed=1).stats()
    assert st["turns_mean"] == pytest.approx(6.5, rel=0.08)
    assert st["turns_median"] == 3
    assert st["user_tokens_mean"] == pytest.approx(90, rel=0.15)
    assert st["user_tokens_median"] == pytest.approx(20, abs=2)
    assert st["reply_tokens_mean"] == pytest.approx(340, rel=0.05)
    assert st["reply_tokens_median"] == pytest.approx(310, rel=0.05)
    assert 0.15 <= st["share_over_4096"] <= 0.21


def test_paper_generator_turns_and_poisson_arrivals():
    w = generate("paper", 6000, seed=2, rate_per_s=1.0)
    st = w.stats()
    assert st["turns_mean"] == pytest.approx(5.75, rel=0.05)
    assert st["arrival_rate_per_s"] == pytest.approx(1.0, rel=0.05)
    gaps = np.diff([s.start_s for s in w.sessions])
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.1)  # exponential gaps: sd == mean


def test_long_generator_has_a_document_first():
    w = generate("long", 500, seed=3)
    first = np.array([s.turns[0].user_tokens for s in w.sessions])
    later = np.array([t.user_tokens for s in w.sessions for t in s.turns[1:]])
    assert first.mean() == pytest.approx(1000, rel=0.05)
    assert later.mean() < 40


def test_think_time_and_time_compression():
    a = generate("paper", 3000, seed=4, think_median_s=30.0)
    b = generate("paper", 3000, seed=4, think_median_s=30.0, time_compression=10.0)
    assert a.stats()["think_median_s"] == pytest.approx(30.0, rel=0.1)
    assert b.stats()["think_median_s"] == pytest.approx(a.stats()["think_median_s"] / 10, rel=1e-9)
    assert b.sessions[-1].start_s == pytest.approx(a.sessions[-1].start_s / 10)


def test_generators_are_seeded_and_bad_presets_refused():
    assert generate("sharegpt", 50, seed=7).sessions == generate("sharegpt", 50, seed=7).sessions
    assert generate("sharegpt", 50, seed=7).sessions != generate("sharegpt", 50, seed=8).sessions
    with pytest.raises(ValueError, match="preset"):
        generate("nope", 5)
    w = with_token_ids(generate("paper", 5, seed=0), vocab_size=100)
    assert all(len(t.prompt_ids) == t.user_tokens and max(t.prompt_ids) < 100 for s in w.sessions for t in s.turns)


class _WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word, a 2-token template per turn."""

    def encode(self, text):
        return [hash(w) % 1000 for w in text.split()]

    def chat_turn(self, text, first_turn):
        return [1, 2] + self.encode(text)


def test_loader_on_a_small_sharegpt_file(tmp_path):
    recs = [
        {"id": "a_0", "conversations": [{"from": "system", "value": "be brief"},
                                        {"from": "human", "value": "hello there"},
                                        {"from": "gpt", "value": "hi you all"}]},
        {"id": "a_1", "conversations": [{"from": "human", "value": "  "},  # empty turn: skipped
                                        {"from": "human", "value": "ça va bien ?"},
                                        {"from": "gpt", "value": "oui très bien merci"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "welcome back"},  # leading assistant turn
                                      {"from": "human", "value": "thanks"}]},
    ]
    p = tmp_path / "chats.json"
    p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    w = from_conversations(read_conversations(p), _WordTokenizer(), seed=0, think_median_s=10.0)
    assert [s.sid for s in w.sessions] == ["c000000", "c000001"]
    a, b = w.sessions
    assert len(a.turns) == 2  # id_0 and id_1 merged, the empty turn skipped
    # the system text is sent with the first user turn; reply budgets are the recorded replies' lengths
    assert a.turns[0].user_tokens == 2 + 4 and a.turns[0].reply_tokens == 3
    assert a.turns[1].user_tokens == 2 + 4 and a.turns[1].reply_tokens == 4  # non-ASCII words kept
    assert a.turns[0].think_s == 0 and a.turns[1].think_s > 0
    # the recorded replies' ids (fed into the history by a benchmark that does not decode them)
    assert a.turns[1].reply_ids == tuple(_WordTokenizer().encode("oui très bien merci"))
    assert b.turns[0].reply_ids is None  # no reply recorded: a budget of 64 to decode
    assert b.turns[0].user_tokens == 2 + 3  # "welcome back" kept as history with "thanks"
    assert b.start_s > a.start_s


def test_min_turns_keeps_the_first_long_enough_sessions_and_reply_ids():
    from jax_cachedattn.bench.trace import build_workload
    from jax_cachedattn.workload import truncate_sessions

    w = generate("sharegpt", 200, seed=1)
    kept = truncate_sessions(w, max_turns=4, min_turns=5, max_sessions=3)
    want = [s for s in w.sessions if len(s.turns) >= 5][:3]
    assert [s.sid for s in kept.sessions] == [s.sid for s in want]
    assert all(len(s.turns) == 4 for s in kept.sessions)
    cfg = {"seed": 1, "workload": {"kind": "synthetic", "preset": "sharegpt", "sessions": 4, "min_turns": 5}}
    assert len(build_workload(cfg).sessions) == 4 and all(len(s.turns) >= 5 for s in build_workload(cfg).sessions)
    ids = with_token_ids(kept, vocab_size=50)
    assert all(len(t.reply_ids) == t.reply_tokens and max(t.reply_ids) < 50 for s in ids.sessions for t in s.turns)
