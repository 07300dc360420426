"""`cachedattn batch` on the tiny model: equal to a loop over Engine.turn, resumable after kills, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _batch_model import byte_tokenizer, tiny_engine  # noqa: E402

from jax_cachedattn import batch_io  # noqa: E402
from jax_cachedattn.batch import (  # noqa: E402
    BatchOptions,
    OutputFileError,
    StrictStop,
    plan_units,
    run_batch_job,
    session_ids,
)
from jax_cachedattn.conversations import Conversation, Message, read_conversations  # noqa: E402

LOGIT_TOL = 1e-4


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _chat(cid, *turns):
    return {"id": cid, "messages": [{"role": r, "content": c} for r, c in turns]}


GENERATED = [
    _chat("g1", ("user", "hello there"), ("assistant", "replaced by the model"), ("user", "naïve Zürich ☃"),
          ("user", "two in a row")),
    _chat("g2", ("user", "data cache"), ("user", "abc abc")),
    _chat("g3", ("user", "x"), ("assistant", ""), ("user", "y y y"), ("assistant", "z"), ("user", "w")),
]


def _lines(path):
    recs = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]
    return recs[0], [r for r in recs if "conversation" in r], [r for r in recs if "summary" in r]


def _run(tmp_path, inp, out, opts=BatchOptions(max_new_tokens=6), store="store", engine=None, **ec):
    events = []
    eng = engine or tiny_engine(str(tmp_path / store), **ec)
    try:
        s = run_batch_job(eng, inp, out, opts, progress=False, on_event=events.append, report=lambda _: None)
    finally:
        if engine is None:
            eng.close()
    return s, events


def test_plan_units():
    c = Conversation("c", (Message("system", "s"), Message("assistant", "lead"), Message("user", "u0"),
                           Message("assistant", "a0"), Message("user", "u1"), Message("user", "u2"),
                           Message("assistant", "a2"), Message("assistant", "a2b")), 1, "openai")
    gen = plan_units(c, "generated")
    assert [(u.turn, [m.content for m in u.before], u.user.content) for u in gen] == [
        (0, ["s", "lead"], "u0"), (1, [], "u1"), (2, [], "u2")]
    given = plan_units(c, "given")   # the model answers only u1, the turn the file does not answer
    assert [(u.turn, [m.content for m in u.before]) for u in given] == [(1, ["s", "lead", "u0", "a0"])]
    every = plan_units(c, "given", reply_all=True)
    assert [(u.turn, u.scratch, [m.content for m in u.before]) for u in every] == [
        (0, True, ["s", "lead"]), (1, False, ["s", "lead", "u0", "a0"]), (2, True, [])]


def test_generated_history_equals_engine_turn_loop(tmp_path):
    """Identical greedy replies (token ids) and logits as a plain loop over Engine.turn with text."""
    inp = _jsonl(tmp_path / "in.jsonl", GENERATED)
    eng = tiny_engine(str(tmp_path / "store"), return_logits=True)
    s, events = _run(tmp_path, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6, keep_sessions=True),
                     engine=eng)
    got = {(e["conversation"], e["turn"]): e["result"] for e in events if e["event"] == "written"}
    assert s.turns_written == len(got) == 8 and not s.skipped
    ref = tiny_engine(None, return_logits=True)
    for rec in GENERATED:
        users = [m["content"] for m in rec["messages"] if m["role"] == "user"]
        for t, text in enumerate(users):
            want = ref.turn(rec["id"], text)
            res = got[(rec["id"], t)]
            assert res.reply_tokens == want.reply_tokens
            assert res.history_tokens + res.prompt_tokens == want.history_tokens + want.prompt_tokens
            assert res.reused_tokens == res.history_tokens  # every history came from the store
            for a, b in zip(res.decode_logits, want.decode_logits):
                assert float(np.abs(a - b).max()) <= LOGIT_TOL
        # The session holds the conversation as the chat template renders it (the engine closes the
        # last reply with <|im_end|>\n; the job leaves it open: no turn follows).
        held = eng.store.lookup(session_ids(_lines(tmp_path / "out.jsonl")[0]["batch_job"]["job"], rec["id"])[0])
        ref_ids = ref.store.lookup(rec["id"]).token_ids
        np.testing.assert_array_equal(held.token_ids, ref_ids[: len(held.token_ids)])
        assert len(ref_ids) - len(held.token_ids) in (1, 2)
    eng.close()
    header, lines, (summary,) = _lines(tmp_path / "out.jsonl")
    assert header["batch_job"]["history"] == "generated"
    # Lines in finish order: each conversation's turns in order, every turn once.
    assert sorted((r["conversation"], r["turn"]) for r in lines) == [("g1", 0), ("g1", 1), ("g1", 2), ("g2", 0),
                                                                    ("g2", 1), ("g3", 0), ("g3", 1), ("g3", 2)]
    for cid in ("g1", "g2", "g3"):
        turns = [r["turn"] for r in lines if r["conversation"] == cid]
        assert turns == sorted(turns)
    # Continuous batching: the three conversations' first turns were all in the engine before any
    # line was written (the job does not wait for one conversation to end before starting the next).
    turns = [e for e in events if e["event"] != "warmed"]
    assert [(e["event"], e["conversation"], e["turn"]) for e in turns[:3]] == \
        [("compute", "g1", 0), ("compute", "g2", 0), ("compute", "g3", 0)]
    assert summary["summary"]["turns_written"] == 8 and summary["summary"]["token_hit_rate"] == 1.0
    assert all(r["source"] in ("new", "host", "device") for r in lines)


GIVEN = [
    _chat("s1", ("system", "Sé breve."), ("user", "q0"), ("assistant", "a0"), ("user", "q1 ü"),
          ("user", "q2"), ("assistant", "a2"), ("user", "q3")),
    _chat("s2", ("assistant", "I speak first"), ("user", "q0"), ("assistant", "a0")),
]


@pytest.mark.parametrize("reply_all", [False, True])
def test_given_history_equals_engine_turn_on_the_rendered_history(tmp_path, reply_all):
    """Teacher forcing: each reply equals Engine.turn on the file's history rendered by the template."""
    inp = _jsonl(tmp_path / "in.jsonl", GIVEN)
    s, events = _run(tmp_path, inp, tmp_path / "out.jsonl", BatchOptions("given", reply_all, max_new_tokens=6))
    got = {(e["conversation"], e["turn"]): e["result"] for e in events if e["event"] == "written"}
    want_turns = {("s1", 0), ("s1", 1), ("s1", 2), ("s1", 3), ("s2", 0)} if reply_all else {("s1", 1), ("s1", 3)}
    assert set(got) == want_turns and s.turns_written == len(want_turns)
    tok, ref = byte_tokenizer(), tiny_engine(None)
    end = tok.encode("<|im_end|>\n")
    for rec in GIVEN:
        # The history as token ids: the file's turns rendered by the template, and where the file has
        # no reply (and only there) the model's reply, closed as the engine closes one.
        msgs, t, ids = rec["messages"], 0, tok.chat(rec["messages"][:1], add_generation_prompt=False)
        for i, m in enumerate(msgs):
            if i:
                ids = ids + tok.encode(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
            if m["role"] != "user":
                continue
            if (rec["id"], t) in got:
                prompt = ids + tok.encode("<|im_start|>assistant\n")
                want = ref.turn(f"{rec['id']}-{t}", prompt)   # a new session: everything computed
                assert want.generated_tokens == len(want.reply_tokens)   # no stop token: closing is <|im_end|>\n
                res = got[(rec["id"], t)]
                assert res.reply_tokens == want.reply_tokens, (rec["id"], t)
                assert res.history_tokens + res.prompt_tokens == len(prompt)
                if res.history_tokens:
                    assert res.reused_tokens == res.history_tokens   # a copied session computes no history
                if i + 1 == len(msgs) or msgs[i + 1]["role"] != "assistant":
                    ids = prompt + want.reply_tokens + end
            t += 1
    _, lines, _ = _lines(tmp_path / "out.jsonl")
    assert len(lines) == len(want_turns)


def _kill_input(tmp_path, n=6):
    r = random.Random(0)
    words = "alpha beta gamma delta hé ☃ naïve Zürich data cache token".split()
    recs = []
    for c in range(n):
        turns = [("user", " ".join(r.choice(words) for _ in range(3)))]
        for _ in range(2):
            turns += [("assistant", "ok"), ("user", " ".join(r.choice(words) for _ in range(3)))]
        recs.append(_chat(f"k{c}", *turns))
    return _jsonl(tmp_path / "in.jsonl", recs)


def test_resume_after_a_kill_between_durable_commit_and_line(tmp_path, monkeypatch):
    """The reply of a turn whose KV commit is durable but whose line is missing is rebuilt from the
    store, not computed again; a turn killed before its commit is computed again; the output equals an
    uninterrupted run's."""
    inp = _kill_input(tmp_path, n=3)
    _run(tmp_path, inp, tmp_path / "ref.jsonl", store="ref-store")
    _, ref, _ = _lines(tmp_path / "ref.jsonl")
    real = batch_io.JobOutput.write_turn
    calls = {"n": 0, "lost": None}

    class Killed(BaseException):
        pass

    def dies_at_fourth_line(self, record):
        calls["n"] += 1
        if calls["n"] == 4:
            calls["lost"] = (record["conversation"], record["turn"])
            raise Killed()
        return real(self, record)

    monkeypatch.setattr(batch_io.JobOutput, "write_turn", dies_at_fourth_line)
    with pytest.raises(Killed):
        _run(tmp_path, inp, tmp_path / "out.jsonl")
    monkeypatch.setattr(batch_io.JobOutput, "write_turn", real)
    s, events = _run(tmp_path, inp, tmp_path / "out.jsonl")
    # Every conversation with a durable turn and no line (the lost one, and others whose commit was
    # durable and whose line was still to come) has that turn rebuilt from the store.
    assert s.turns_done_before == 3 and s.turns_recovered >= 1 and s.turns_recovered + s.turns_written == 6
    assert not s.skipped
    computed = [(e["conversation"], e["turn"]) for e in events if e["event"] == "compute"]
    recovered = {(e["conversation"], e["turn"]) for e in events if e["event"] == "recovered"}
    lost_c, lost_t = calls["lost"]
    assert (lost_c, lost_t) in recovered and not recovered & set(computed)
    # A history left by the killed process is read disk -> host as its conversation opens: its first turn
    # here loads it from host memory (the uninterrupted run's programs), none from disk.
    first = {}
    for e in events:
        if e["event"] == "written":
            first.setdefault(e["conversation"], e["result"])
    resumed = [r for r in first.values() if r.history_tokens > 0]
    assert resumed and all(r.source == "host" and r.reused_tokens == r.history_tokens for r in resumed)
    if lost_t < 2:
        assert (lost_c, lost_t + 1) in computed                  # and the conversation goes on from it
    _, out, (summary,) = _lines(tmp_path / "out.jsonl")
    assert sorted((r["conversation"], r["turn"], r["reply"]) for r in out) == \
        sorted((r["conversation"], r["turn"], r["reply"]) for r in ref)
    assert {(r["conversation"], r["turn"]) for r in out if r.get("recovered")} == recovered
    for r in out:
        if r.get("recovered"):
            assert r["generated_tokens"] == next(x for x in ref if (x["conversation"], x["turn"]) ==
                                                 (r["conversation"], r["turn"]))["generated_tokens"]

    # A failure inside the engine before a commit: every turn in flight is given up, and computed
    # again on the next run; nothing written is computed again.
    out2 = tmp_path / "out2.jsonl"
    eng = tiny_engine(str(tmp_path / "store2"))
    real_commit, n = eng.store.commit_turn, {"n": 0}

    def fails_fifth(*a, **k):
        n["n"] += 1
        if n["n"] == 5:
            raise Killed()
        return real_commit(*a, **k)

    eng.store.commit_turn = fails_fifth
    with pytest.raises(Killed):
        _run(tmp_path, inp, out2, engine=eng)
    eng.close()
    before = {(r["conversation"], r["turn"]) for r in _lines(out2)[1]}
    assert 0 < len(before) < 9
    s, events = _run(tmp_path, inp, out2, store="store2")
    assert (s.turns_done_before, s.turns_recovered + s.turns_written) == (len(before), 9 - len(before))
    assert not s.skipped
    assert not {(e["conversation"], e["turn"]) for e in events if e["event"] in ("compute", "recovered")} & before
    _, out, _ = _lines(out2)
    assert sorted((r["conversation"], r["turn"], r["reply"]) for r in out) == \
        sorted((r["conversation"], r["turn"], r["reply"]) for r in ref)


def test_torn_last_line(tmp_path):
    inp = _kill_input(tmp_path, n=2)
    out = tmp_path / "out.jsonl"
    _run(tmp_path, inp, out, BatchOptions(max_new_tokens=6, keep_sessions=True))
    full = out.read_text(encoding="utf-8")
    _, ref, _ = _lines(out)
    # A run killed inside the write of k1's last line (the KV commit was durable before the write).
    body = full[: full.index('{"summary"')]
    last = body.rstrip("\n").rsplit("\n", 1)[1]
    out.write_text(body[: len(body) - len(last) - 1] + last[:20], encoding="utf-8")
    s, events = _run(tmp_path, inp, out)
    assert s.torn_line_dropped and s.turns_recovered == 1 and s.turns_written == 0 and not s.skipped
    assert not [e for e in events if e["event"] == "compute"]
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n") and last[:20] + "\n" not in text
    header, lines, summaries = _lines(out)
    assert len(summaries) == 1 and text.rstrip("\n").rsplit("\n", 1)[1].startswith('{"summary"')
    assert [(r["conversation"], r["turn"], r["reply"]) for r in lines] == \
        [(r["conversation"], r["turn"], r["reply"]) for r in ref]
    # Everything is written: a run again computes nothing and still ends with one summary.
    s, events = _run(tmp_path, inp, out)
    assert s.turns_done_before == 6 and not [e for e in events if e["event"] in ("compute", "recovered")]
    assert not s.skipped
    assert len(_lines(out)[2]) == 1


def test_output_of_another_job_or_settings_refused(tmp_path):
    inp = _kill_input(tmp_path, n=1)
    out = tmp_path / "out.jsonl"
    _run(tmp_path, inp, out)
    with pytest.raises(OutputFileError, match="max_new_tokens=6"):
        _run(tmp_path, inp, out, BatchOptions(max_new_tokens=5))
    other = tmp_path / "other.jsonl"
    other.write_text('{"hello": 1}\n')
    with pytest.raises(OutputFileError, match="not a cachedattn batch output"):
        _run(tmp_path, inp, other)
    assert other.read_text() == '{"hello": 1}\n'


def test_bad_input_skipped_or_strict(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(_chat("a", ("user", "fine"))) + "\n{oops\n" + json.dumps(_chat("b", ("user", "ok"))) + "\n")
    reports = []
    eng = tiny_engine(str(tmp_path / "store"))
    s = run_batch_job(eng, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=4), progress=False,
                      report=reports.append)
    eng.close()
    assert s.skipped and s.turns_written == 2 and reports == [s.bad_records[0] + " (skipped)"]
    assert s.bad_records[0].startswith("input line 2: bad JSON")
    eng = tiny_engine(str(tmp_path / "store2"))
    with pytest.raises(StrictStop, match="input line 2"):
        run_batch_job(eng, inp, tmp_path / "strict.jsonl", BatchOptions(strict=True), progress=False)
    eng.close()
    assert not (tmp_path / "strict.jsonl").exists()


def test_a_message_too_long_skips_its_conversation(tmp_path):
    """A conversation whose message cannot fit the context window is reported and skipped (exit 2 on
    the command line); the others finish."""
    inp = _jsonl(tmp_path / "in.jsonl", [
        _chat("before", ("user", "first")), _chat("huge", ("user", "h" * 1100)), _chat("after", ("user", "still runs")),
    ])
    reports = []
    eng = tiny_engine(str(tmp_path / "store"))
    s = run_batch_job(eng, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6), progress=False,
                      report=reports.append)
    eng.close()
    _, lines, _ = _lines(tmp_path / "out.jsonl")
    assert [(r["conversation"], r["turn"]) for r in lines] == [("before", 0), ("after", 0)]
    assert s.skipped and len(s.failed_conversations) == 1 and "'huge'" in reports[0] and "context" in reports[0]


@pytest.mark.slow  # another context window: every program compiles again (~40 s on 2 cores)
def test_truncation_as_the_engine_does_it(tmp_path):
    """Histories over the context window are truncated by the engine; the job goes on from the kept KV."""
    inp = _jsonl(tmp_path / "in.jsonl", [_chat("t", *[("user", f"{i} {'w' * 150}") for i in range(4)])])
    eng = tiny_engine(str(tmp_path / "store"), max_context=384)
    s = run_batch_job(eng, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6), progress=False)
    eng.close()
    _, lines, _ = _lines(tmp_path / "out.jsonl")
    assert [(r["conversation"], r["turn"]) for r in lines] == [("t", 0), ("t", 1), ("t", 2), ("t", 3)]
    assert any(r["truncated_tokens"] > 0 for r in lines) and not s.skipped
    cut = next(r for r in lines if r["truncated_tokens"] > 0)
    assert cut["reused_tokens"] == cut["history_tokens"] > 0   # the kept KV is reused, not recomputed


def test_sampling_keys_follow_the_conversation_not_the_order(tmp_path):
    recs = [_chat(f"p{i}", ("user", "same words"), ("user", "more")) for i in range(3)]
    a = _jsonl(tmp_path / "a.jsonl", recs)
    b = _jsonl(tmp_path / "b.jsonl", recs[::-1])
    opts = BatchOptions(max_new_tokens=6)   # the engine's seed: keys per session and turn
    _run(tmp_path, a, tmp_path / "a.out", opts, store="sa", temperature=1.0, seed=3)
    _run(tmp_path, b, tmp_path / "b.out", opts, store="sb", temperature=1.0, seed=3)
    ra = {(r["conversation"], r["turn"]): r["reply"] for r in _lines(tmp_path / "a.out")[1]}
    rb = {(r["conversation"], r["turn"]): r["reply"] for r in _lines(tmp_path / "b.out")[1]}
    assert ra == rb
    assert len({ra[(f"p{i}", 0)] for i in range(3)}) > 1   # same text, other conversation: other key


def test_cli_exit_status(tmp_path, monkeypatch):
    from jax_cachedattn import cli

    monkeypatch.setattr(cli, "_open", lambda args: tiny_engine(args.store))
    inp = _jsonl(tmp_path / "in.jsonl", [_chat("a", ("user", "hi"))])
    base = ["batch", "--output", str(tmp_path / "o.jsonl"), "--store", str(tmp_path / "s"), "--no-progress"]
    assert cli.main(base + ["--input", str(inp), "--max-new-tokens", "4"]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(inp.read_text() + "nope\n")
    assert cli.main(base + ["--input", str(bad), "--max-new-tokens", "4"]) == 2   # skipped a line
    assert cli.main(base + ["--input", str(tmp_path / "missing.jsonl")]) == 2
    assert cli.main(base + ["--input", str(inp), "--max-new-tokens", "5"]) == 2    # other settings


def _done(path):
    if not path.exists():
        return set()
    done = set()
    for raw in path.read_bytes().split(b"\n")[1:]:
        try:
            r = json.loads(raw)
        except ValueError:
            continue
        if "conversation" in r:
            done.add((r["conversation"], r["turn"]))
    return done


@pytest.mark.slow  # ~1-5 min (make test-all); a resumed job is also in test_batch_job_warmup, SIGKILLed writers in store/test_store_crash
def test_sigkill_at_random_points_then_resume(tmp_path):
    """>= 10 SIGKILLs at random moments of a running job (in a subprocess), each followed by a
    restart: the output ends equal to an uninterrupted run's, every turn exactly once, and no run
    computes a turn that was already written when it started (counted from the job's events). Without the
    job's warm-up, so each run spends its life on turns (after a warm-up the rest of the job ran so fast that
    it finished before the tenth kill); a resumed run after a warm-up: test_batch_job_warmup.py."""
    inp = _kill_input(tmp_path)
    xla = tmp_path / "xla"
    driver = [sys.executable, str(Path(__file__).parent / "_batch_driver.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}

    def start(store, out, events):
        return subprocess.Popen(driver + [str(store), str(inp), str(out), str(events), str(xla), "generated", "0", "1.0", "0"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    ref = start(tmp_path / "ref-store", tmp_path / "ref.jsonl", tmp_path / "ref-events")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]
    _, ref_lines, _ = _lines(tmp_path / "ref.jsonl")
    assert len(ref_lines) == 18

    out, events, rng = tmp_path / "out.jsonl", tmp_path / "events", random.Random(1)
    kills, runs = 0, []
    while True:
        before = _done(out)
        seen = len(events.read_text().splitlines()) if events.exists() else 0
        p = start(tmp_path / "store", out, events)
        if kills < 10:
            # Wait until this run works on turns, then kill at a random moment.
            deadline = time.monotonic() + 120
            while p.poll() is None and time.monotonic() < deadline:
                lines = events.read_text().splitlines()[seen:] if events.exists() else []
                if any(" compute " in x for x in lines):
                    break
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.25))
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        rc = p.wait(timeout=300)
        runs.append((p.pid, before, rc))
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    assert kills >= 10
    log = [x.split(" ", 3) for x in events.read_text().splitlines()]
    for pid, before, _ in runs:
        mine = {(c, int(t)) for p_, ev, c, t in log if int(p_) == pid and ev in ("compute", "recovered")}
        assert not mine & before, f"run {pid} computed turns already written: {sorted(mine & before)}"
    _, lines, summaries = _lines(out)
    assert len(summaries) == 1
    assert sorted((r["conversation"], r["turn"]) for r in lines) == sorted({(r["conversation"], r["turn"]) for r in lines})
    assert sorted((r["conversation"], r["turn"], r["reply"]) for r in lines) == \
        sorted((r["conversation"], r["turn"], r["reply"]) for r in ref_lines)
    computed = sum(1 for _, ev, _, _ in log if ev == "compute")
    # At most the turns in flight at each kill (one per conversation: 6) are computed twice.
    assert computed <= 18 + 6 * kills
