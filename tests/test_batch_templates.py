"""`cachedattn batch` with chat templates other than ChatML: Llama 3 and Mistral [INST] templates on small
tokenizers trained here (tests/byom_fixtures.py), the tiny random model. A turn's tokens are the
template's render of the conversation, not a hand-written ChatML block."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _batch_model import tiny_engine  # noqa: E402
from byom_fixtures import write_tokenizer  # noqa: E402

from jax_cachedattn.batch import BatchOptions, run_batch_job, session_ids  # noqa: E402
from jax_cachedattn.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-tok")
    write_tokenizer(folder, "llama3")
    return Tokenizer.from_hf_folder(folder)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _chat(cid, *turns):
    return {"id": cid, "messages": [{"role": r, "content": c} for r, c in turns]}


def _run(tmp_path, tok, inp, opts, name="store"):
    events, reports = [], []
    eng = tiny_engine(str(tmp_path / name), tokenizer=tok)
    s = run_batch_job(eng, inp, tmp_path / f"{name}.jsonl", opts, progress=False, on_event=events.append,
                      report=reports.append)
    return eng, s, events, reports


def _lines(path):
    recs = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]
    return recs[0]["batch_job"]["job"], [r for r in recs if "conversation" in r]


@pytest.mark.slow  # ~2 min (make test-all); the ChatML case is in test_batch_job, the mistral one below
def test_llama3_generated_history_equals_engine_turn_loop(tmp_path, llama3):
    """Replies (token ids) and the stored history equal a loop over Engine.turn with text, which renders
    each turn with the tokenizer's template (bos once, header tokens, <|eot_id|> closing a reply)."""
    convs = [_chat("a", ("user", "What is the capital of France?"), ("user", "Tell me a joke about cats.")),
             _chat("b", ("user", "Hello there! How are you today?"), ("assistant", "replaced"),
                   ("user", "The quick brown fox"), ("user", "def f(x): return x")),
             _chat("c", ("user", "Multi-turn conversations re-send the whole history."))]
    inp = _jsonl(tmp_path / "in.jsonl", convs)
    eng, s, events, _ = _run(tmp_path, llama3, inp, BatchOptions(max_new_tokens=6, keep_sessions=True))
    assert s.turns_written == 6 and not s.skipped
    got = {(e["conversation"], e["turn"]): e["result"] for e in events if e["event"] == "written"}
    job, lines = _lines(tmp_path / "store.jsonl")
    ref = tiny_engine(None, tokenizer=llama3)
    bos = llama3.token_to_id("<|begin_of_text|>")
    for rec in convs:
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        for t, text in enumerate(users):
            want = ref.turn(rec["id"], text)
            res = got[(rec["id"], t)]
            assert res.reply_tokens == want.reply_tokens, (rec["id"], t)
            assert res.history_tokens + res.prompt_tokens == want.history_tokens + want.prompt_tokens
            assert res.reused_tokens == res.history_tokens
        held = eng.store.lookup(session_ids(job, rec["id"])[0]).token_ids
        ref_ids = ref.store.lookup(rec["id"]).token_ids
        np.testing.assert_array_equal(held, ref_ids[: len(held)])
        assert list(held).count(bos) == 1 and held[0] == bos    # the template's bos, once
    eng.close()
    ref.close()


def test_llama3_given_history_is_the_templates_render(tmp_path, llama3):
    """Teacher forcing with a system prompt: the session holds exactly the template's render of the
    file's conversation (plus the model's replies where the file has none), and each reply equals a
    turn on a new session over that render."""
    conv = _chat("g", ("system", "You are a helpful assistant."), ("user", "What is the capital of France?"),
                 ("assistant", "The capital of France is Paris."), ("user", "Tell me a joke."),
                 ("user", "About cats?"), ("assistant", "Why did the cat sit on the computer?"), ("user", "Hello!"))
    inp = _jsonl(tmp_path / "in.jsonl", [conv])
    eng, s, events, _ = _run(tmp_path, llama3, inp, BatchOptions("given", max_new_tokens=6, keep_sessions=True))
    got = {e["turn"]: e["result"] for e in events if e["event"] == "written"}
    assert sorted(got) == [1, 3] and not s.skipped
    ref = tiny_engine(None, tokenizer=llama3)
    msgs = conv["messages"]
    # Turn 1 ("Tell me a joke.") answers the render of everything up to it.
    prompt1 = llama3.chat(msgs[:4])
    want1 = ref.turn("r1", prompt1)
    assert got[1].reply_tokens == want1.reply_tokens and got[1].prompt_tokens == len(prompt1)
    # Turn 3: the history is the render with the model's reply to turn 1, then the file's turns.
    hist = list(prompt1) + list(want1.reply_tokens)
    closing = llama3.assistant_end()
    hist += closing
    rest = llama3.chat(msgs[:4] + [{"role": "assistant", "content": got[1].reply}] + msgs[4:7])
    head = llama3.chat(msgs[:4] + [{"role": "assistant", "content": got[1].reply}], add_generation_prompt=False)
    prompt3 = hist + rest[len(head):]
    want3 = ref.turn("r3", prompt3)
    assert got[3].reply_tokens == want3.reply_tokens
    assert got[3].history_tokens + got[3].prompt_tokens == len(prompt3) and got[3].reused_tokens == got[3].history_tokens
    job, _ = _lines(tmp_path / "store.jsonl")
    held = eng.store.lookup(session_ids(job, "g")[0]).token_ids.tolist()
    assert held[: len(prompt3)] == prompt3
    eng.close()
    ref.close()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral-tok")
    write_tokenizer(folder, "mistral")
    return Tokenizer.from_hf_folder(folder)


MISTRAL = [_chat("sys", ("system", "Answer briefly."), ("user", "What is the capital of France?"), ("user", "Hello"),
                 ("user", "And Spain?")),
           _chat("plain", ("user", "What is the capital of France?"), ("user", "Tell me a joke"))]


def _recompute(ref, msgs, name):
    """A turn of a new session over the whole conversation: every token computed."""
    r = ref.turn(name, msgs)
    assert r.reused_tokens == 0
    return r


def test_mistral_template_that_moves_the_system_prompt_runs_as_messages(tmp_path, mistral):
    """Mistral's template puts the system prompt into the last user turn, so a stored history cannot be
    continued token by token: that conversation goes through the messages route (each job the whole
    conversation; the engine reuses the longest common prefix with the stored tokens and drops the stale
    tail) and every reply equals a recompute of the whole render. One without a system prompt continues
    token by token and its turns follow the [INST] template."""
    inp = _jsonl(tmp_path / "in.jsonl", MISTRAL)
    eng, s, events, reports = _run(tmp_path, mistral, inp, BatchOptions(max_new_tokens=6, keep_sessions=True))
    job, lines = _lines(tmp_path / "store.jsonl")
    assert sorted((r["conversation"], r["turn"]) for r in lines) == \
        [("plain", 0), ("plain", 1), ("sys", 0), ("sys", 1), ("sys", 2)]
    assert not s.skipped and not reports
    got = {(e["conversation"], e["turn"]): e["result"] for e in events if e["event"] == "written"}
    ref = tiny_engine(None, tokenizer=mistral)
    msgs = [MISTRAL[0]["messages"][0]]
    for t, user in enumerate(MISTRAL[0]["messages"][1:]):
        msgs = msgs + [user]
        res, want = got[("sys", t)], _recompute(ref, msgs, f"r{t}")
        assert res.reply_tokens == want.reply_tokens, t
        assert res.history_tokens + res.prompt_tokens == len(mistral.chat(msgs))
        if t:   # the moved system prompt: the stored render is reused up to where it moved, the rest dropped
            prev = mistral.chat(msgs[:-2])
            assert 0 < res.reused_tokens < len(prev) and res.dropped_tokens > 0
        msgs = msgs + [{"role": "assistant", "content": res.reply}]
    held = eng.store.lookup(session_ids(job, "sys")[0]).token_ids.tolist()
    whole = mistral.chat(msgs[:-1])
    assert held[: len(whole)] == whole   # the session holds the last render, not a stale one
    for t, text in enumerate(["What is the capital of France?", "Tell me a joke"]):
        want = ref.turn("plain", text)
        assert got[("plain", t)].reply_tokens == want.reply_tokens
    eng.close()
    ref.close()


def test_mistral_given_history_with_reply_all_runs_on_the_session(tmp_path, mistral):
    """Teacher forcing on the messages route: the reply to a user turn the file answers is generated on the
    conversation's own session (no copy), and the next job's render puts the file's reply in its place
    (the generated one dropped). Each reply equals a recompute of the render of the file's conversation."""
    conv = _chat("g", ("system", "Be kind."), ("user", "What is the capital of France?"),
                 ("user", "Tell me a joke."), ("assistant", "No."), ("user", "Why?"))
    inp = _jsonl(tmp_path / "in.jsonl", [conv])
    eng, s, events, reports = _run(tmp_path, mistral, inp, BatchOptions("given", reply_all=True, max_new_tokens=6))
    assert s.turns_written == 3 and not s.skipped and not reports
    got = {e["turn"]: e["result"] for e in events if e["event"] == "written"}
    sessions = {e["result"].session for e in events if e["event"] == "written"}
    assert len(sessions) == 1 and not sessions.pop().endswith(".r")   # no scratch copy
    ref = tiny_engine(None, tokenizer=mistral)
    m = conv["messages"]
    gen0 = {"role": "assistant", "content": got[0].reply}   # the file has no reply to turn 0: the model's is history
    for t, msgs in enumerate([m[:2], m[:2] + [gen0] + m[2:3], m[:2] + [gen0] + m[2:5]]):
        want = _recompute(ref, msgs, f"r{t}")
        assert got[t].reply_tokens == want.reply_tokens, t
        assert got[t].history_tokens + got[t].prompt_tokens == len(mistral.chat(msgs))
    assert got[2].dropped_tokens > 0 and got[2].reused_tokens > 0   # turn 1's generated reply dropped for the file's
    eng.close()
    ref.close()


def test_mistral_resume_rebuilds_a_durable_turn_from_the_store(tmp_path, mistral, monkeypatch):
    """Killed between a durable commit and its line, on the messages route: the next run rebuilds the line
    from the stored tokens (nothing computed again) and the output equals an uninterrupted run's."""
    from jax_cachedattn import batch_io

    inp = _jsonl(tmp_path / "in.jsonl", MISTRAL[:1])
    eng, _, _, _ = _run(tmp_path, mistral, inp, BatchOptions(max_new_tokens=6), name="ref")
    eng.close()
    _, ref = _lines(tmp_path / "ref.jsonl")
    real = batch_io.JobOutput.write_turn

    class Killed(BaseException):
        pass

    def dies_at_second_line(self, record):
        if record["turn"] == 1:
            raise Killed()
        return real(self, record)

    monkeypatch.setattr(batch_io.JobOutput, "write_turn", dies_at_second_line)
    eng = tiny_engine(str(tmp_path / "store"), tokenizer=mistral)
    with pytest.raises(Killed):
        run_batch_job(eng, inp, tmp_path / "store.jsonl", BatchOptions(max_new_tokens=6), progress=False)
    eng.close()
    monkeypatch.setattr(batch_io.JobOutput, "write_turn", real)
    eng, s, events, _ = _run(tmp_path, mistral, inp, BatchOptions(max_new_tokens=6), name="store")
    eng.close()
    assert (s.turns_done_before, s.turns_recovered, s.turns_written) == (1, 1, 1) and not s.skipped
    assert [(e["event"], e["turn"]) for e in events if e["event"] in ("compute", "recovered")] == \
        [("recovered", 1), ("compute", 2)]
    _, out = _lines(tmp_path / "store.jsonl")
    assert [(r["turn"], r["reply"]) for r in sorted(out, key=lambda r: r["turn"])] == \
        [(r["turn"], r["reply"]) for r in sorted(ref, key=lambda r: r["turn"])]
    rec = next(r for r in out if r.get("recovered"))
    assert rec["generated_tokens"] == next(r for r in ref if r["turn"] == 1)["generated_tokens"]
