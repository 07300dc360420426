"""Chunked prefill: a job with more new tokens than ``prefill_budget`` is prefilled chunk by chunk,
between decode steps of the other slots, and gives the logits of the unchunked prefill.

Tiny random model (fp32), ``prefill_budget`` 64, prompts of 150-200 tokens (3-4 chunks).
"""

import numpy as np
import pytest

from _tiny_engine import random_ids, tiny_model
from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.engine import programs as P
from jax_cachedattn.engine import slots as SL
from jax_cachedattn.model import forward
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model(5)


_ids = random_ids


def _engine(cfg, params, root, chunked: bool, max_slots: int = 2):
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-chunk")
    store = TieredStore(StoreConfig(root=str(root), host_bytes=1 << 26, token_block=64), lay)
    return Engine(cfg, params, store, None, EngineConfig(
        max_new_tokens=4, return_logits=True, max_slots=max_slots, prefill_budget=64, chunked_prefill=chunked,
        save_every=5, pool_tokens=4096))


def _conversation(eng, cfg):
    """A new session with a 150-token prompt; then turns of 200 new tokens against a history from the
    device pool and from host memory."""
    out = [eng.turn("a", _ids(cfg, 150, 1)), eng.turn("b", _ids(cfg, 70, 2))]
    out.append(eng.turn("a", _ids(cfg, 200, 3)))  # device
    eng.flush()
    eng.evict("b", "device")
    out.append(eng.turn("b", _ids(cfg, 200, 4)))  # host
    return out


def test_chunked_equals_unchunked_and_reference(model, tmp_path):
    cfg, params = model
    chunked, plain = (_engine(cfg, params, tmp_path / n, c) for n, c in (("c", True), ("p", False)))
    calls = []
    real = chunked._resume
    chunked._resume = lambda s: calls.append(s.plan.sid) or real(s)
    got, want = _conversation(chunked, cfg), _conversation(plain, cfg)
    assert calls.count("a") == 3 + 4 and calls.count("b") == 2 + 4  # 150, 200 in 64s; 70 and 200 in 64s
    assert [r.source for r in got] == ["new", "new", "device", "host"]
    for g, w in zip(got, want):
        assert g.source == w.source and g.reply_tokens == w.reply_tokens
        np.testing.assert_allclose(g.prompt_logits, w.prompt_logits, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(np.stack(g.decode_logits), np.stack(w.decode_logits), atol=TOL, rtol=TOL)
    # Against the cache-free reference: the whole conversation of "a" as one sequence.
    ids = np.concatenate([_ids(cfg, 150, 1), got[0].reply_tokens, _ids(cfg, 200, 3)])
    ref = np.asarray(forward(params, cfg, ids))
    np.testing.assert_allclose(got[2].prompt_logits, ref[-200:], atol=TOL, rtol=TOL)
    chunked.close()
    plain.close()


def test_long_prefill_runs_between_decode_steps(model, tmp_path, monkeypatch):
    """While "c" decodes, the second job of "a" (200 new tokens) is prefilled one 64-token chunk per
    round with decode steps in between; every result equals the same jobs one at a time, unchunked."""
    cfg, params = model
    eng = _engine(cfg, params, tmp_path / "i", True)
    events = []
    real_resume, real_gen = eng._resume, SL.generate

    def resume(s):
        events.append(("chunk", s.plan.sid, s.done))
        return real_resume(s)

    def gen(*a, **k):
        events.append(("decode",))
        return real_gen(*a, **k)

    eng._resume = resume
    monkeypatch.setattr(SL, "generate", gen)
    jobs = [("a", _ids(cfg, 10, 1), 2), ("c", _ids(cfg, 10, 2), 40), ("a", _ids(cfg, 200, 3), 3)]
    got = eng.run_batch(jobs)
    eng.close()
    long_chunks = [i for i, e in enumerate(events) if e[0] == "chunk" and e[1] == "a"][1:]  # the 200-token job's
    assert len(long_chunks) == 4, events
    between = [e for e in events[long_chunks[0]:long_chunks[-1]] if e[0] == "decode"]
    assert len(between) >= 3, events  # at least one decode dispatch between consecutive chunks
    monkeypatch.setattr(SL, "generate", real_gen)
    seq = _engine(cfg, params, tmp_path / "s", False, max_slots=1)
    want = [seq.turn(sid, msg, max_new_tokens=n) for sid, msg, n in jobs]
    seq.close()
    for g, w in zip(got, want):
        assert g.reply_tokens == w.reply_tokens and g.history_tokens == w.history_tokens
        np.testing.assert_allclose(g.prompt_logits, w.prompt_logits, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(np.stack(g.decode_logits), np.stack(w.decode_logits), atol=TOL, rtol=TOL)


def test_failure_in_a_middle_chunk_leaves_the_session_usable(model, tmp_path, monkeypatch):
    """A chunk that fails (its pages written for the earlier chunks, some rows saved) gives up the turn:
    the pool gets every page back, the session stays at its last committed turn, and its next turn
    equals an engine that never saw the failure."""
    cfg, params = model
    eng = _engine(cfg, params, tmp_path / "f", True)
    eng.turn("a", _ids(cfg, 40, 1))
    eng.flush()
    before = eng.store.lookup("a")
    real = P.write_pages
    n = {"calls": 0}

    def failing(*a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise RuntimeError("injected: the third chunk fails")
        return real(*a, **k)

    monkeypatch.setattr(P, "write_pages", failing)
    with pytest.raises(RuntimeError, match="injected"):
        eng.run_batch([("c", _ids(cfg, 10, 2), 30), ("a", _ids(cfg, 200, 3), 3)])
    monkeypatch.setattr(P, "write_pages", real)
    assert n["calls"] >= 3
    # Every page is back, once: the slots' and the failed job's (its device copy was taken, then freed).
    assert eng.pool.used_pages() == 0 and len(set(eng.pool._free)) == eng.pool.num_pages - 1
    eng.flush()
    after = eng.store.lookup("a")
    assert (after.turn, after.num_tokens) == (before.turn, before.num_tokens)
    got = eng.turn("a", _ids(cfg, 200, 3))
    eng.close()
    ref_eng = _engine(cfg, params, tmp_path / "r", True)
    ref_eng.turn("a", _ids(cfg, 40, 1))
    want = ref_eng.turn("a", _ids(cfg, 200, 3))
    ref_eng.close()
    assert got.reply_tokens == want.reply_tokens
    np.testing.assert_allclose(got.prompt_logits, want.prompt_logits, atol=TOL, rtol=TOL)
