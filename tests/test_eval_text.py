"""The truncation experiment's conversations and per-token analysis: a stored conversation is continued
(not regenerated) from its own KV, every token gets its role, and the sweep's breakdowns add up."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from jax_cachedattn.evaluation import sweep
from jax_cachedattn.evaluation.text import generate_conversation, token_roles
from jax_cachedattn.model import forward

sys.path.insert(0, str(Path(__file__).parent))
from _batch_model import byte_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def chat():
    cfg, params = tiny_model()
    tok = byte_tokenizer()
    kw = dict(reply_tokens=8, temperature=0.0, paste_prob=0.5, passage_words=6)
    first = generate_conversation(params, cfg, tok, 120, seed=3, **kw)
    longer = generate_conversation(params, cfg, tok, 260, seed=3, prefix=first, **kw)
    return cfg, params, tok, kw, first, longer


def test_a_stored_conversation_is_continued_from_its_own_tokens(chat):
    cfg, params, tok, kw, first, longer = chat
    n = len(first["ids"])
    assert len(first["ids"]) >= 120 and len(longer["ids"]) >= 260
    assert longer["ids"][:n] == first["ids"] and longer["messages"][: len(first["messages"])] == first["messages"]
    assert longer["turn_starts"][: len(first["turn_starts"])] == first["turn_starts"]
    # seeded: the same prefix and seed give the same continuation
    assert generate_conversation(params, cfg, tok, 260, seed=3, prefix=first, **kw)["ids"] == longer["ids"]
    # the new replies are greedy continuations of the whole conversation, prefix included: each reply token
    # is the argmax of a full recompute over everything before it (so the prefix was prefilled, not skipped)
    ids = np.asarray(longer["ids"], np.int32)
    logits = np.asarray(forward(params, cfg, ids))
    roles = token_roles(longer, tok, reply_tokens=kw["reply_tokens"])
    reply = [i for i in range(n, len(ids)) if roles[i] == "a"]
    assert len(reply) >= 8
    assert all(int(np.argmax(logits[i - 1])) == ids[i] for i in reply)


def test_token_roles(chat):
    _, _, tok, kw, _, longer = chat
    ids, roles = longer["ids"], token_roles(longer, tok, reply_tokens=kw["reply_tokens"])
    assert len(roles) == len(ids)
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert all(roles[i] == "t" for i, t in enumerate(ids) if t == start)
    assert all(roles[i] in "tf" for i, t in enumerate(ids) if t == end)
    for s in longer["turn_starts"]:
        head = tok.encode("<|im_start|>user\n")
        if ids[s : s + len(head)] == head:
            assert roles[s + len(head)] == "u" and roles[s : s + len(head)] == "t" * len(head)
    # 8-token replies: the random model rarely stops by itself, so most ends are forced (reply cut at the cap)
    assert roles.count("f") >= 1 and set(roles) <= set("tusaf")


def _row(tt, ca, full, roles, **more):
    return {"nll": {"TT": tt, "CA": ca, "Full": full, **more}, "roles": roles}


def test_by_role_and_recompute_spread_add_up():
    rng = np.random.default_rng(0)
    tt = rng.gamma(2.0, 1.0, 32)
    ca = tt + np.r_[np.full(16, 0.1), np.zeros(16)]  # CA worse on the first 16 tokens (the user's), same after
    full = tt + 2 * (ca - tt)  # Full moves the same way as CA: correlation 1
    t1, t16 = tt + 0.01, tt - 0.02
    r = _row(tt.tolist(), ca.tolist(), full.tolist(), "u" * 16 + "a" * 16,
             **{"TT+sink1": t1.tolist(), "CA+sink1": ca.tolist(), "TT+sink16": t16.tolist(), "CA+sink16": ca.tolist()})
    c = sweep._compare([r], "TT", "CA")
    assert c["by_role"]["u"] == {"tokens": 16, "sum": pytest.approx(1.6), "mean": pytest.approx(0.1)}
    assert c["by_role"]["a"]["sum"] == pytest.approx(0.0)
    assert c["corr_full"] == pytest.approx(1.0)
    sp = sweep.recompute_spread([r])  # sink 1 vs sink 16: 0.03 nats apart on every token
    assert sp["pair"] == "TT+sink1/TT+sink16" and sp["diff"] == pytest.approx(np.expm1(0.03))
    assert sp["mean_abs"] == pytest.approx(0.03)
    assert sweep.by_role([{"nll": r["nll"]}], "TT", "CA") is None  # prose / older runs: no roles
    # rows of a run with a sweep pooled with rows of a run without: only the sinks both have count (was a KeyError)
    bare = {"nll": {k: v for k, v in r["nll"].items() if k != "TT+sink16" and k != "CA+sink16"}, "roles": r["roles"]}
    assert sweep.recompute_spread([r, bare]) is None


def test_per_window_pools_texts_not_copies_of_their_tokens():
    rng = np.random.default_rng(1)

    def row(seq, W, ratio, tt, shift, full, cut="turn"):
        return {"source": "chat", "seq": seq, "W": W, "cut": cut, "ratio": ratio, "sink": 4,
                "nll": {"TT": tt.tolist(), "CA": (tt + 1.0).tolist(), "Full": full.tolist(),
                        "TT+sink": tt.tolist(), "CA+sink": (tt + shift).tolist()}}

    tt_a, tt_b, full_a, full_b = (rng.gamma(2.0, 1.0, 64) for _ in range(4))
    rows = [row(0, 1024, 0.25, tt_a, 0.1, full_a), row(0, 1024, 0.5, tt_a, 0.3, full_a),  # one text, two cuts
            row(2, 1024, 0.25, tt_b, -0.2, full_b), row(2, 1024, 0.5, tt_b, -0.2, full_b),
            row(0, 1024, None, tt_a, 5.0, full_a, cut="system"),  # not the engine's cut: left out
            row(0, 512, 0.25, tt_a, 0.05, full_b)]
    merged = sweep.per_text(rows[:4])
    assert sorted((r["seq"], r["cuts"]) for r in merged) == [(0, 2), (2, 2)]
    a = next(r for r in merged if r["seq"] == 0)
    assert np.allclose(np.asarray(a["nll"]["CA+sink"]) - a["nll"]["TT+sink"], 0.2)  # the two cuts averaged per token
    w = {g["W"]: g for g in sweep.summarize(rows)["by_window"]}
    assert (w[1024]["texts"], w[1024]["rows"], w[512]["texts"]) == (2, 4, 1)
    c = w[1024]["by_sink"]["4"]
    assert c["tokens"] == 128 and c["diff"] == pytest.approx(np.expm1(0.0))  # (+0.2 - 0.2) / 2: the system cut excluded
    assert c["per_seq"] == pytest.approx([np.expm1(0.2), np.expm1(-0.2)])
    assert w[512]["by_sink"]["4"]["diff"] == pytest.approx(np.expm1(0.05))
    # the same four rows pooled as separate samples count every token twice: the same figure, half the blocks
    naive = sweep._compare(rows[:4], "TT+sink", "CA+sink")
    assert naive["diff"] == pytest.approx(c["diff"]) and naive["tokens"] == 2 * c["tokens"]
    assert "**Per window**" in sweep.markdown(sweep.summarize(rows))


def test_text_bootstrap_resamples_conversations_not_blocks():
    rng = np.random.default_rng(2)
    tt = [rng.gamma(2.0, 1.0, 128) for _ in range(4)]
    # each conversation shifted by its own constant: the spread is all between conversations
    shifts = (0.10, -0.08, 0.04, -0.02)
    ca = [t + s for t, s in zip(tt, shifts)]
    lo, hi = sweep.text_ci(ca, tt)
    blo, bhi = sweep.paired_ci(ca, tt, block=16)
    assert hi - lo > 2 * (bhi - blo)  # 32 blocks of 4 conversations: far too many independent samples
    assert np.expm1(min(shifts)) <= lo < hi <= np.expm1(max(shifts))  # a mean of the conversations' own figures
    # the same shift in every conversation: no spread between them, the interval is the shift
    assert sweep.text_ci([t + 0.03 for t in tt], tt) == pytest.approx((np.expm1(0.03), np.expm1(0.03)))
    assert sweep.text_ci(ca[:1], tt[:1]) is None  # one conversation: no interval over conversations

    def row(seq, t, shift):
        return {"source": "chat", "seq": seq, "W": 2048, "cut": "turn", "ratio": 0.5, "sink": 4,
                "nll": {"TT": t.tolist(), "CA": (t + 1.0).tolist(), "Full": (t * 0.9).tolist(),
                        "TT+sink": t.tolist(), "CA+sink": (t + shift).tolist()}}

    s = sweep.summarize([row(0, t, x) for t, x in zip(tt, shifts)])
    c = s["by_window"][0]["by_sink"]["4"]
    assert c["ci_text"] == pytest.approx((lo, hi))
    assert "texts resampled" in sweep.markdown(s)
