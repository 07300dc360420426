"""Continuous batching: many sessions through max_slots slots == the same jobs one at a time.

Tiny random model (fp32). Histories of 0, 300, 2000 and 4000 tokens coming from the device pool, the
host tier and disk; more jobs than slots with different reply budgets (slots finish and are refilled
mid-decode); two jobs of one session in the batch; a truncation in the batch.
"""

import jax
import numpy as np
import pytest

from _compiles import counting_compiles

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.model import ModelConfig, forward, init_params
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", max_context=4608, rope_theta=30000.0)
    return cfg, init_params(cfg, jax.random.key(11), norm_noise=0.3)


def _store(cfg, root):
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-batch")
    return TieredStore(StoreConfig(root=str(root), host_bytes=1 << 26, token_block=64), lay)


def _ids(cfg, n, seed):
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, n).astype(np.int32)


# session -> (history tokens made by a first turn, where its KV is when the batch starts)
SESSIONS = {"h0": (0, None), "h300": (300, "device"), "h2000": (2000, "host"), "h4000": (4000, "disk"),
            "t": (4590, "host")}


def _setup(cfg, params, root, max_slots):
    store = _store(cfg, root)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=6, return_logits=True, max_slots=max_slots,
                                                        save_every=5, pool_tokens=16384))
    for i, (sid, (n, _)) in enumerate(SESSIONS.items()):
        if n:
            eng.turn(sid, _ids(cfg, n - 8, 100 + i), max_new_tokens=6)  # n - 8 prompt + 6 reply (+ 0 closing)
    eng.flush()
    for sid, (_, where) in SESSIONS.items():
        if where in ("host", "disk"):
            eng.evict(sid, "device" if where == "host" else "host")
    return eng, store


def _jobs(cfg):
    budgets = [3, 9, 5, 12, 7, 4, 10, 6]
    # Prompts in one bucket (17-32 tokens) keep the compiled shapes few; "t" overflows the context.
    jobs = [("h0", 30), ("h300", 25), ("h2000", 20), ("h4000", 28), ("t", 30), ("h300", 17), ("new2", 31), ("h0", 20)]
    return [(sid, _ids(cfg, n, 7 + i), budgets[i]) for i, (sid, n) in enumerate(jobs)]


def test_batched_equals_sequential(model, tmp_path):
    cfg, params = model
    jobs = _jobs(cfg)
    batched_eng, _ = _setup(cfg, params, tmp_path / "b", max_slots=4)
    batched = batched_eng.run_batch(jobs)
    batched_eng.close()
    seq_eng, _ = _setup(cfg, params, tmp_path / "s", max_slots=1)
    sequential = [seq_eng.turn(sid, msg, max_new_tokens=n) for sid, msg, n in jobs]
    seq_eng.close()
    assert [r.session for r in batched] == [j[0] for j in jobs]  # results in job order
    got = [r.source for r in batched]
    # h4000 is on disk when the batch starts; the queue's look-ahead may have brought it to host already.
    assert got[:3] == ["new", "device", "host"] and got[3] in ("disk", "host") and got[4] == "host", got
    assert batched[4].truncated_tokens > 0 and batched[4].history_tokens < 4590
    # The second job of a session ran against the history the first left.
    assert batched[5].history_tokens == batched[1].history_tokens + 25 + len(batched[1].reply_tokens)
    assert batched[7].history_tokens == 30 + len(batched[0].reply_tokens)
    for b, s in zip(batched, sequential):
        assert b.reply_tokens == s.reply_tokens
        assert (b.history_tokens, b.truncated_tokens, b.generated_tokens) == (s.history_tokens, s.truncated_tokens, s.generated_tokens)
        np.testing.assert_allclose(b.prompt_logits, s.prompt_logits, atol=TOL, rtol=0)
        assert len(b.decode_logits) == len(s.decode_logits) == b.generated_tokens
        for x, y in zip(b.decode_logits, s.decode_logits):
            np.testing.assert_allclose(x, y, atol=TOL, rtol=0)
    # And both equal the full forward (the job against a 2000-token history loaded from host).
    store = _store(cfg, tmp_path / "b")
    full = np.asarray(store.lookup("h2000").token_ids)
    store.close()
    n_new, gen = len(jobs[2][1]), np.asarray(batched[2].reply_tokens, np.int32)
    ref = np.asarray(forward(params, cfg, full[: len(full) - len(gen)]))
    np.testing.assert_allclose(batched[2].prompt_logits, ref[-n_new:], atol=TOL, rtol=0)


def test_compile_count_fixed_across_jobs(model, tmp_path):
    """After one round of jobs, jobs of other lengths in the same buckets compile nothing; the decode
    step and the insert are compiled once per engine shape, never per job."""
    cfg, params = model
    store = _store(cfg, tmp_path)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=5, max_slots=4))

    def round_(r):
        # New sessions (17-24 tokens), then a second turn of each against its 22-29 token history in
        # the pool (17-32 new tokens), with different reply budgets: one prompt and one history bucket.
        eng.run_batch([(f"r{r}s{i}", _ids(cfg, 17 + (i + r) % 8, 40 * r + i), 2 + (i + r) % 4) for i in range(4)])
        eng.run_batch([(f"r{r}s{i}", _ids(cfg, 17 + 4 * i + r, 40 * r + 9 + i), 5 - i % 3) for i in range(4)])

    with counting_compiles() as h:
        round_(0)
        warm = dict(h.count)
        round_(1)
        round_(2)
    # The decode step: one program per batch size the busy slots needed (buckets 1, 2, 4 of max_slots
    # 4; which ones a round meets depends on when its slots finish), never per job.
    assert 1 <= warm.get("generate", 0) and h.count["generate"] <= 3 and warm.get("insert", 0) <= 2
    rest = {k: v for k, v in h.count.items() if k != "generate"}
    warm.pop("generate")
    assert rest == warm, {k: rest.get(k, 0) - warm.get(k, 0) for k in set(rest) | set(warm) if rest.get(k) != warm.get(k)}
    eng.close()


def test_warmup_compiles_what_later_jobs_run(model, tmp_path):
    """After ``Engine.warmup`` for one prompt bucket and one history bucket, batches of new sessions
    and of turns against histories from host and from the pool, all of other lengths in those buckets,
    compile nothing."""
    cfg, params = model
    store = _store(cfg, tmp_path)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=5, max_slots=4, pool_tokens=8192))
    with counting_compiles() as h:
        out = eng.warmup(prompt_lengths=(20,), history_lengths=(300,))
        warm = dict(h.count)
        assert out["turns"] == 4  # new; host with none and with the read-ahead's layers preloaded; device
        assert eng.pool.cached_tokens() == 0 and eng.pool.used_pages() == 0  # nothing left over
        # Histories of 300-450 tokens (bucket 512), committed the way a turn commits them.
        for i, n in enumerate((300, 347, 401, 450)):
            for layer in range(cfg.num_layers):
                kv = np.random.RandomState(i).randn(2, n, cfg.num_kv_heads, cfg.head_dim).astype(np.float32)
                store.save_layer(f"h{i}", layer, kv, start=0)
            store.commit_turn(f"h{i}", _ids(cfg, n, 60 + i)).result()
        new = eng.run_batch([(f"n{i}", _ids(cfg, 17 + 5 * i, 70 + i), 2 + i) for i in range(4)])
        host = eng.run_batch([(f"h{i}", _ids(cfg, 32 - 4 * i, 80 + i), 5 - i) for i in range(4)])
        dev = eng.run_batch([(f"h{i}", _ids(cfg, 18 + 3 * i, 90 + i), 3) for i in range(4)])
    assert [r.source for r in new + host + dev] == ["new"] * 4 + ["host"] * 4 + ["device"] * 4
    assert dict(h.count) == warm, {k: h.count[k] - warm.get(k, 0) for k in h.count if h.count[k] != warm.get(k, 0)}
    eng.close()


def test_decode_steps_only_the_busy_slots(model, tmp_path, monkeypatch):
    """The decode step runs the rows of the busy slots' bucket (1, 2, 4, 8 of max_slots 8), not every
    slot: one turn steps one row; a batch shrinks its step as its slots finish; results equal the
    same jobs one at a time."""
    from jax_cachedattn.engine import slots as SL

    cfg, params = model
    actives = []
    real = SL.generate

    def spy(*a, **k):
        actives.append(k.get("active"))
        return real(*a, **k)

    monkeypatch.setattr(SL, "generate", spy)
    eng = Engine(cfg, params, _store(cfg, tmp_path / "b"), None,
                 EngineConfig(max_new_tokens=5, max_slots=8, return_logits=True, pool_tokens=4096))
    one = eng.turn("x", _ids(cfg, 20, 1))
    assert set(actives) == {1}
    actives.clear()
    jobs = [(f"j{i}", _ids(cfg, 18 + i, 2 + i), n) for i, n in enumerate((2, 12, 5))]
    got = eng.run_batch(jobs)
    eng.close()
    assert actives[0] == 4 and actives[-1] == 2 and set(actives) == {2, 4}, actives
    monkeypatch.setattr(SL, "generate", real)
    seq = Engine(cfg, params, _store(cfg, tmp_path / "s"), None,
                 EngineConfig(max_new_tokens=5, max_slots=1, return_logits=True, pool_tokens=4096))
    want = [seq.turn("x", _ids(cfg, 20, 1))] + [seq.turn(sid, m, max_new_tokens=n) for sid, m, n in jobs]
    seq.close()
    for g, w in zip([one] + got, want):
        assert g.reply_tokens == w.reply_tokens
        np.testing.assert_allclose(np.stack(g.decode_logits), np.stack(w.decode_logits), atol=TOL, rtol=TOL)
