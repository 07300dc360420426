"""Pages on demand: a decoding slot holds the pages its rows fill (and the next dispatch's), the rest
of its reply budget promised by the pool; a job is admitted only when its whole budget fits beside
every promise, so growing slots never find the pool empty. Tiny random model (fp32)."""

import numpy as np
import pytest

from _tiny_engine import random_ids, tiny_model
from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.engine import slots as SL
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


_ids = random_ids


def _engine(cfg, params, root, pool_tokens):
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-pages")
    store = TieredStore(StoreConfig(root=str(root), host_bytes=1 << 26, token_block=16), lay)
    return Engine(cfg, params, store, None, EngineConfig(max_new_tokens=4, return_logits=True, max_slots=3,
                                                         decode_steps=2, save_every=5, pool_tokens=pool_tokens))


def test_pages_follow_the_reply_and_promises_hold(model, tmp_path, monkeypatch):
    """Three 60-token replies in a pool that holds two whole budgets: the third waits (its budget does
    not fit beside the promises) though free pages would hold its prompt; at every dispatch each slot
    holds only the pages its rows and the dispatch need, and held + promised pages never exceed the
    pool. Results equal a pool big enough for all three at once."""
    cfg, params = model
    jobs = [(f"s{i}", _ids(cfg, 20 + i, i), 60) for i in range(3)]
    # Each job: 20-22 prompt + 60 reply + 1 -> 6 pages of 16 tokens; the pool: 13 pages (+ trash).
    eng = _engine(cfg, params, tmp_path / "small", pool_tokens=13 * 16)
    seen = []
    real = SL.generate

    def spy(*a, **k):
        pool = eng.pool
        held = sum(len(x.pages) for x in eng._slots.values())
        assert held + pool.promised <= pool.num_pages - 1
        assert pool.promised == sum(x.promise for x in eng._slots.values())
        for x in eng._slots.values():
            assert len(x.pages) == min(pool.pages_for(x.length + 2), len(x.pages) + x.promise)
            assert list(x.table[: len(x.pages)]) == x.pages
        seen.append((len(eng._slots), held, pool.promised))
        return real(*a, **k)

    monkeypatch.setattr(SL, "generate", spy)
    got = eng.run_batch(jobs)
    assert max(n for n, _, _ in seen) == 2  # the third job waited for a slot's pages
    assert seen[0][1] == 2 * 2 and seen[0][2] == 2 * 4  # 2 pages held, 4 promised per slot at first
    assert eng.pool.promised == 0
    eng.close()
    monkeypatch.setattr(SL, "generate", real)
    big = _engine(cfg, params, tmp_path / "big", pool_tokens=4096)
    want = big.run_batch(jobs)
    big.close()
    for g, w in zip(got, want):
        assert g.reply_tokens == w.reply_tokens
        np.testing.assert_allclose(np.stack(g.decode_logits), np.stack(w.decode_logits), atol=TOL, rtol=TOL)


def test_growth_evicts_cached_sessions(model, tmp_path):
    """A slot that grows onto pages held by a finished session's device copy evicts that copy (the
    store still has it): the session's next turn loads from host and equals a recompute-free run."""
    cfg, params = model
    eng = _engine(cfg, params, tmp_path / "e", pool_tokens=8 * 16)
    eng.turn("old", _ids(cfg, 40, 9), max_new_tokens=4)  # 3 pages kept as its device copy
    assert eng.pool.holds("old", *(lambda i: (i.turn, i.num_tokens))(eng.store.lookup("old")))
    r = eng.turn("grow", _ids(cfg, 20, 10), max_new_tokens=70)  # 6 pages: 2 at first, then grows
    assert r.generated_tokens == 70 and eng.pool.promised == 0
    info = eng.store.lookup("old")
    assert not eng.pool.holds("old", info.turn, info.num_tokens) and eng.pool.stats["evictions"] >= 1
    again = eng.turn("old", _ids(cfg, 10, 11), max_new_tokens=4)
    eng.close()
    assert again.source == "host"
    ref = _engine(cfg, params, tmp_path / "r", pool_tokens=4096)
    ref.turn("old", _ids(cfg, 40, 9), max_new_tokens=4)
    want = ref.turn("old", _ids(cfg, 10, 11), max_new_tokens=4)
    ref.close()
    assert again.reply_tokens == want.reply_tokens
    np.testing.assert_allclose(again.prompt_logits, want.prompt_logits, atol=TOL, rtol=TOL)


def test_pages_smaller_than_the_store_block(model, tmp_path):
    """The pool's page need not be the store's block: with 64-token store blocks and 16-row pages
    (the default), turns from new, device and host histories equal a pool of 64-row pages, and one
    short session holds at most 1.25x its tokens' bytes at every dispatch (64-row pages: ~1.4x)."""
    cfg, params = model
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-pages")

    def run(root, page, ratios):
        store = TieredStore(StoreConfig(root=str(root), host_bytes=1 << 26, token_block=64), lay)
        eng = Engine(cfg, params, store, None, EngineConfig(
            max_new_tokens=16, return_logits=True, max_slots=2, decode_steps=4, pool_tokens=2048,
            **({} if page is None else {"page_size": page})))
        real = SL.generate

        def spy(*a, **k):
            out = real(*a, **k)
            held = sum(int(x) for x in np.asarray(out[0].lengths)) + eng.pool.cached_tokens()
            ratios.append(eng.pool.used_bytes() / (held * cfg.kv_bytes_per_token))
            return out

        SL.generate = spy
        try:
            res = [eng.turn("a", _ids(cfg, 64, 20)), eng.turn("a", _ids(cfg, 24, 21))]  # new, then device
            eng.evict("a", "device")
            res.append(eng.turn("a", _ids(cfg, 24, 22)))  # from host
        finally:
            SL.generate = real
        assert eng.pool.page_size == (page or 16)
        eng.close()
        return res

    small, big = [], []
    got, want = run(tmp_path / "p16", None, small), run(tmp_path / "p64", 64, big)
    assert [r.source for r in got] == ["new", "device", "host"]
    for g, w in zip(got, want):
        assert g.reply_tokens == w.reply_tokens
        np.testing.assert_allclose(g.prompt_logits, w.prompt_logits, atol=TOL, rtol=TOL)
        np.testing.assert_allclose(np.stack(g.decode_logits), np.stack(w.decode_logits), atol=TOL, rtol=TOL)
    assert max(small) <= 1.25 < max(big), (max(small), max(big))
