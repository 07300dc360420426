"""A batch job's warm-up compiles every program its turns run: neither an uninterrupted nor a resumed run
compiles anything after it (tiny model)."""

import json
import random
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _batch_model import byte_tokenizer, tiny_engine  # noqa: E402
from _compiles import counting_compiles  # noqa: E402
from test_batch_job import _kill_input, _lines, _run  # noqa: E402

from jax_cachedattn import batch_io  # noqa: E402
from jax_cachedattn.batch import BatchOptions, run_batch_job  # noqa: E402
from jax_cachedattn.batch_plan import plan_units, turn_shapes  # noqa: E402
from jax_cachedattn.conversations import Conversation, read_conversations  # noqa: E402
from jax_cachedattn.engine.warmup import TurnShape, programs_for  # noqa: E402


def _counting(fn):
    """Run ``fn(on_event)`` with every in-process compiled program forgotten, counting compiles."""
    jax.clear_caches()
    with counting_compiles() as h:
        out = fn(h.event)
    return out, h


def test_turn_shapes_bound_the_real_lengths(tmp_path):
    """Every turn's history and prompt length as run lies in the range the warm-up planned for it."""
    inp = _kill_input(tmp_path, n=4)
    s, events = _run(tmp_path, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6, warmup=False))
    got = {(e["conversation"], e["turn"]): e["result"] for e in events if e["event"] == "written"}
    tok = byte_tokenizer()
    for conv in read_conversations(inp):
        assert isinstance(conv, Conversation)
        units = plan_units(conv, "generated")
        shapes, uncovered = turn_shapes(tok, units, 6, 1024)
        assert uncovered == 0 and len(shapes) == len(units) == 3
        for u, sh in zip(units, shapes):
            r = got[(conv.id, u.turn)]
            assert sh.history[0] <= r.history_tokens <= sh.history[1], (u.turn, sh, r.history_tokens)
            assert sh.prompt[0] <= r.prompt_tokens <= sh.prompt[1], (u.turn, sh, r.prompt_tokens)
        # Written turns are left out; a context too small for the longest history stops the cover.
        assert turn_shapes(tok, units, 6, 1024, frozenset({0}))[0] == shapes[1:]
        short, n = turn_shapes(tok, units, 6, shapes[2].history[1] + shapes[2].prompt[1])
        assert (short, n) == (shapes[:2], 1)


def test_programs_for_chunks_and_sources(tmp_path):
    eng = tiny_engine(str(tmp_path / "s"), prompt_bucket=16, prefill_budget=40)
    try:
        # A first turn of 100 tokens: chunks 40 + 40 + 20, the later ones against the rows before them.
        assert programs_for(eng, [TurnShape((0, 0), (100, 100))]) == {
            ("new", 0, 48), ("device", 64, 48), ("device", 128, 32)}
        # A later turn: its history from the pool or host memory, in either bucket of its range.
        assert programs_for(eng, [TurnShape((60, 70), (10, 11))]) == {
            (k, S, 16) for k in ("host", "device") for S in (64, 128)}
        assert programs_for(eng, [TurnShape((60, 70), (10, 11))], ("host",)) == {("host", 64, 16), ("host", 128, 16)}
    finally:
        eng.close()
    rec = tiny_engine(str(tmp_path / "r"), prompt_bucket=16, prefill_budget=40, use_cache=False)
    try:   # --no-cache: the history is prefilled again with the prompt, chunked as one
        assert programs_for(rec, [TurnShape((60, 62), (10, 10))]) == {("new", 0, 48), ("device", 64, 32)}
    finally:
        rec.close()


def test_no_compile_after_the_warmup_uninterrupted_or_resumed(tmp_path, monkeypatch):
    """The job's first run (killed at its fourth line) and its resumed run each compile every program
    in their warm-up (in-process caches cleared before each, so nothing is left from earlier) and
    nothing after it, though the resumed run loads histories from host memory and starts new ones."""
    inp = _kill_input(tmp_path, n=4)
    real = batch_io.JobOutput.write_turn
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def dies_at_fourth_line(self, record):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed()
        return real(self, record)

    monkeypatch.setattr(batch_io.JobOutput, "write_turn", dies_at_fourth_line)
    opts = BatchOptions(max_new_tokens=6)

    # The killed run: the hook is the event callback, so run it through run_batch_job directly.
    from jax_cachedattn.batch import run_batch_job

    def killed(on_event):
        eng = tiny_engine(str(tmp_path / "store"), max_slots=2)
        try:
            with pytest.raises(Killed):
                run_batch_job(eng, inp, tmp_path / "out.jsonl", opts, progress=False, on_event=on_event,
                              report=lambda _: None)
        finally:
            eng.close()

    _, h1 = _counting(killed)
    assert h1.at_warm is not None and h1.at_warm > 0 and h1.n == h1.at_warm, (h1.at_warm, h1.n)
    monkeypatch.setattr(batch_io.JobOutput, "write_turn", real)
    events = []

    def resumed(on_event):
        eng = tiny_engine(str(tmp_path / "store"), max_slots=2)
        try:
            return run_batch_job(eng, inp, tmp_path / "out.jsonl", opts, progress=False,
                                 on_event=lambda e: (events.append(e), on_event(e)), report=lambda _: None)
        finally:
            eng.close()

    s, h2 = _counting(resumed)
    assert h2.at_warm is not None and h2.at_warm > 0 and h2.n == h2.at_warm, (h2.at_warm, h2.n)
    assert s.turns_done_before == 3 and s.turns_written + s.turns_recovered == 9 and not s.skipped
    assert s.warmup_programs > 0 and s.turns_not_warmed == 0
    results = [e["result"] for e in events if e["event"] == "written"]
    assert any(r.source == "host" for r in results)          # histories read back from the store
    _, lines, _ = _lines(tmp_path / "out.jsonl")
    assert sorted((r["conversation"], r["turn"]) for r in lines) == [(f"k{c}", t) for c in range(4) for t in range(3)]


@pytest.mark.slow  # make test-all: a 6-layer model's programs, compiled once in-process (~1-3 min on 2 cores)
def test_no_compile_when_the_read_ahead_picks_a_count_between_default_and_all(tmp_path):
    """A read-ahead between its default and every layer (loads measured a little slower than compute)
    is rounded to one of ``ReadAhead.counts`` and the warm-up compiled that count's program: the job
    preloads that many layers of the queued histories and compiles nothing after its warm-up."""
    inp = _kill_input(tmp_path, n=4)
    events = []

    def job(on_event):
        # keep_pages=False: every later turn's history comes from host memory, so the queue's next job
        # is preloaded into the read buffer (the preload into pool pages off: it would take its place).
        eng = tiny_engine(str(tmp_path / "store"), max_slots=2, keep_pages=False, num_layers=6, pool_preload_rows=0)
        try:
            counts = eng.read_ahead.counts()
            assert counts == (2, 3, 6)
            eng.read_ahead.layers = lambda *a, **k: counts[1]   # the measured rates asked for 3 of 6 layers
            return run_batch_job(eng, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6), progress=False,
                                 on_event=lambda e: (events.append(e), on_event(e)), report=lambda _: None)
        finally:
            eng.close()

    from jax_cachedattn.batch import run_batch_job

    s, h = _counting(job)
    assert h.at_warm is not None and h.at_warm > 0 and h.n == h.at_warm, (h.at_warm, h.n)
    assert s.turns_written == 12 and not s.skipped and s.turns_not_warmed == 0
    # The summary's warm-up account: host programs once per preload count (0, 2, 3, 6 layers).
    assert s.warmup_turns == sum(n for n, _ in s.warmup_by_kind.values()) > s.warmup_programs
    assert s.warmup_by_kind["host"][0] > 0 and s.warmup_by_kind["host"][0] % 4 == 0
    results = [e["result"] for e in events if e["event"] == "written"]
    assert any(r.source == "host" and r.preloaded_layers == 3 for r in results), \
        sorted({(r.source, r.preloaded_layers) for r in results})


def test_warmup_decodes_once_and_samples_once_per_prompt_bucket(tmp_path):
    """Only the warm-up's first scratch turn decodes; the first turn of each other (kind, prompt bucket)
    samples its first token (``logits_at`` is compiled per bucket and per committed input) and the rest
    prefill and commit only
    (``Engine.append``). Prompts of several buckets (step 16): a job over them compiles nothing after
    the warm-up, and the warm-up ran a handful of decode dispatches, not some per scratch turn."""
    r = random.Random(1)
    words = "alpha beta gamma delta data cache token".split()
    recs = []
    for c in range(3):   # a first turn of ~50 bytes, follow-ups of ~5, ~20 and ~40: several prompt buckets
        turns = [("user", " ".join(r.choice(words) for _ in range(8)))]
        for n in (1, 3, 7):
            turns.append(("user", " ".join(r.choice(words) for _ in range(n))))
        recs.append({"id": f"b{c}", "messages": [{"role": ro, "content": co} for ro, co in turns]})
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in recs), encoding="utf-8")
    rounds = {}

    def job(on_event):
        eng = tiny_engine(str(tmp_path / "store"), max_slots=2, prompt_bucket=16)

        def event(e):
            if e["event"] == "warmed":
                rounds["warm"] = eng.loop_time["decode_rounds"]
            on_event(e)

        try:
            return run_batch_job(eng, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6), progress=False,
                                 on_event=event, report=lambda _: None)
        finally:
            eng.close()

    s, h = _counting(job)
    assert h.at_warm is not None and h.at_warm > 0 and h.n == h.at_warm, (h.at_warm, h.n)
    assert s.turns_written == 12 and not s.skipped and s.turns_not_warmed == 0
    buckets = {(kind, T) for kind, S, T in _programs_of(tmp_path, inp)}
    assert len({T for _, T in buckets}) >= 3 and s.warmup_turns > len(buckets) + 2, (buckets, s.warmup_turns)
    # One full turn (6 tokens, 4 steps a dispatch: 2 dispatches) and one dispatch per other (kind, bucket)'s
    # first turn; a warm-up that decoded in every scratch turn would run at least one per turn.
    assert rounds["warm"] <= 2 + len(buckets) - 1 < s.warmup_turns, (rounds, buckets, s.warmup_turns)


def _programs_of(tmp_path, inp):
    eng = tiny_engine(str(tmp_path / "plan-store"), max_slots=2, prompt_bucket=16)
    try:
        shapes = set()
        for conv in read_conversations(inp):
            got, _ = turn_shapes(eng.tokenizer, plan_units(conv, "generated"), 6, eng.model_config.max_context)
            shapes.update(got)
        return programs_for(eng, shapes, ("host", "device"))
    finally:
        eng.close()


def test_loop_account_adds_up_to_the_wall(tmp_path):
    """The summary's ``loop`` splits the job's wall into parts that do not overlap: their sum is the wall
    (``other_s`` is the rest, never negative beyond rounding), every turn's line was timed and the decode
    dispatches are at least what the longest conversation's replies need."""
    inp = _kill_input(tmp_path, n=3)
    s, events = _run(tmp_path, inp, tmp_path / "out.jsonl", BatchOptions(max_new_tokens=6, warmup=False))
    loop = s.to_json()["summary"]["loop"]
    parts = ("prefill_s", "decode_s", "finish_s", "preload_s", "write_s", "commit_wait_s", "feed_s", "flush_s")
    assert all(loop[k] >= 0 for k in parts), loop
    assert loop["other_s"] >= -0.01 and abs(sum(loop[k] for k in parts) + loop["other_s"] - s.wall_s) < 0.01, loop
    assert loop["write_s"] > 0 and loop["decode_s"] > 0 and loop["prefill_s"] > 0
    gen = {}
    for e in events:
        if e["event"] == "written":
            gen[e["conversation"]] = gen.get(e["conversation"], 0) + e["result"].generated_tokens
    assert loop["decode_rounds"] * 4 >= max(gen.values()) - 3 * 1, (loop, gen)   # 3 turns' first tokens come from prefill
