"""A queued job's host-memory history written into free pool pages while other slots decode
(engine/pool_preload.py): the job then starts as a device hit, reports ``source="host"`` with
``preload="pool"``, and its tokens and logits equal a batch-1 ``Engine.turn`` (a host hit). A preload
the session outdates is not used; a pool without room preloads nothing and still runs every job; a
preload's pages give way to a starting job; a failed preloaded turn leaves the session usable.
Tiny random model (fp32, 2 layers)."""

import threading

import numpy as np
import pytest

from _compiles import counting_compiles
from _tiny_engine import random_ids, tiny_model
from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.engine import programs, slots
from jax_cachedattn.model import forward
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-5


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def model():
    return tiny_model(7)


def _engine(cfg, params, root, **kw):
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-pool-preload")
    store = TieredStore(StoreConfig(root=str(root), host_bytes=1 << 26, token_block=16), lay)
    ec = dict(max_new_tokens=5, return_logits=True, max_slots=2, decode_steps=2, save_every=5, pool_tokens=4096)
    ec.update(kw)
    return Engine(cfg, params, store, None, EngineConfig(**ec)), store


def _with_history(eng, cfg, sid, n, seed):
    """A first turn of ``sid`` (``n`` prompt tokens + 4 reply), its pages given back: history in host memory."""
    eng.turn(sid, random_ids(cfg, n, seed), max_new_tokens=4)
    eng.flush()
    eng.evict(sid, "device")
    assert eng.store.lookup(sid).tier == "host" and eng.pool.entry(sid) is None


def _jobs(cfg, seed, p_len=25, tag="", q_new=2):
    # "d" decodes 12 tokens, "q" 2 (done after the first dispatch of 2 steps), "p" waits behind them for a slot.
    return [("d" + tag, random_ids(cfg, 20, seed), 12), ("q" + tag, random_ids(cfg, 18, seed + 1), q_new),
            ("p", random_ids(cfg, p_len, seed + 2), 5)]


def _reference(cfg, params, root, hist, jobs, change=None):
    """The probe's turn as a batch of one on a fresh engine with the same history (a host hit)."""
    eng, store = _engine(cfg, params, root, max_slots=1)
    _with_history(eng, cfg, "p", hist, 3)
    if change is not None:
        change(store)
    sid, msg, n = jobs[-1]
    res = eng.turn(sid, msg, max_new_tokens=n)
    eng.close()
    return res


def _same(got, want):
    assert got.reply_tokens == want.reply_tokens and got.history_tokens == want.history_tokens
    np.testing.assert_allclose(got.prompt_logits, want.prompt_logits, atol=TOL, rtol=0)
    assert len(got.decode_logits) == len(want.decode_logits)
    for x, y in zip(got.decode_logits, want.decode_logits):
        np.testing.assert_allclose(x, y, atol=TOL, rtol=0)


def _spy_writes(monkeypatch, eng, hook=None):
    """Record, per ``write_history`` call, how many slots were decoding; ``hook(n)`` runs before call n."""
    real, seen = programs.write_history, []

    def spy(*a, **k):
        if hook is not None:
            hook(len(seen))
        seen.append(len(eng._slots))
        return real(*a, **k)

    monkeypatch.setattr(programs, "write_history", spy)
    return seen


def test_queued_host_history_is_written_into_pages_while_slots_decode(model, tmp_path, monkeypatch):
    """One layer per round (pool_preload_rows below one layer's rows): the probe's two layers are
    written in two rounds, each while both other slots decode ("q" takes two dispatches); it starts as a device hit on those
    pages, reports where its KV came from (host) and how (pool), and equals the batch-1 host hit. A
    second round of the same shapes (a longer history in the same bucket) compiles nothing."""
    cfg, params = model
    eng, store = _engine(cfg, params, tmp_path / "b", pool_preload_rows=100)
    _with_history(eng, cfg, "p", 300, 3)
    jobs = _jobs(cfg, 40, q_new=4)
    seen = _spy_writes(monkeypatch, eng)
    got = eng.run_batch(jobs)
    assert seen == [2] * cfg.num_layers  # every layer written while two slots decoded
    p = got[-1]
    assert (p.source, p.preload, p.preloaded_layers, p.reused_tokens) == ("host", "pool", cfg.num_layers, p.history_tokens)
    assert eng.pool.stats["preloads"] == 1 and eng.pool.stats["preload_hits"] == 1
    assert eng.pool.stats["preloads_dropped"] == 0
    # Round 2: the same shapes again (new sessions beside; the probe's longer history in the same bucket;
    # the same prompt lengths: return_logits slices each prompt's logits outside the programs).
    eng.evict("p", "device")
    with counting_compiles() as h:
        again = eng.run_batch(_jobs(cfg, 60, tag="2", q_new=4))
    assert again[-1].preload == "pool" and eng.pool.stats["preload_hits"] == 2
    assert h.n == 0, dict(h.count)
    eng.close()
    monkeypatch.undo()
    _same(p, _reference(cfg, params, tmp_path / "r", 300, jobs))
    assert _reference(cfg, params, tmp_path / "r2", 300, jobs).preload != "pool"  # batch 1: nothing waits


def test_preload_outdated_by_a_change_of_the_session_is_not_used(model, tmp_path, monkeypatch):
    """While the probe's preload is between its two layers, another thread drops a range of its history
    (the caller's loop goes on after it): the writer sees the store's state changed and gives the pages
    back; the probe runs as a host hit against the new history and equals a batch-1 turn after the
    same drop."""
    cfg, params = model
    eng, store = _engine(cfg, params, tmp_path / "b", pool_preload_rows=100)
    _with_history(eng, cfg, "p", 300, 3)
    jobs = _jobs(cfg, 40)
    free = eng.pool.free_pages(evictable=False)

    def change(st):
        st.drop_range("p", 4, 68).result()

    def hook(n):
        if n == 1:  # layer 0 written, layer 1 next: the session changes on another thread now
            t = threading.Thread(target=change, args=(store,))
            t.start()
            t.join()

    seen = _spy_writes(monkeypatch, eng, hook)
    got = eng.run_batch(jobs)
    p = got[-1]
    assert len(seen) == 2 and p.source == "host" and p.preload != "pool"
    assert eng.pool.stats["preloads"] == 0 and eng.pool.stats["preloads_dropped"] == 1
    assert p.history_tokens == 304 - 64
    eng.flush()
    for sid in ("d", "q", "p"):
        eng.evict(sid, "device")
    assert eng.pool.free_pages(evictable=False) == free  # nothing left over
    eng.close()
    monkeypatch.undo()
    _same(p, _reference(cfg, params, tmp_path / "r", 300, jobs, change))


def test_completed_preload_outdated_before_its_turn_is_not_used(model, tmp_path):
    """The preload completes; before the probe's turn comes, its session is truncated (between two
    results of ``serve``): the plan no longer matches the pages, ``_begin`` frees them, and the probe
    equals a batch-1 turn after the same truncation."""
    cfg, params = model
    eng, store = _engine(cfg, params, tmp_path / "b")
    _with_history(eng, cfg, "p", 300, 3)
    jobs = _jobs(cfg, 40)

    def change(st):
        st.drop_range("p", 0, 32).result()

    out = {}
    for i, res in eng.serve(jobs):
        out[i] = res
        if i == 1:  # "q" finished; "p" is preloaded and starts in the next round
            assert eng.pool.stats["preloads"] == 1 and eng.pool.entry("p").ready
            change(store)
    p = out[2]
    assert p.source == "host" and p.preload != "pool" and p.history_tokens == 304 - 32
    assert eng.pool.stats["preload_hits"] == 0 and eng.pool.stats["preloads_dropped"] == 1
    eng.close()
    _same(p, _reference(cfg, params, tmp_path / "r", 300, jobs, change))


def test_pool_without_room_runs_every_job(model, tmp_path, monkeypatch):
    """A pool whose free pages, less the decoding slots' promises, cannot hold the probe's history:
    nothing is preloaded and every job runs (no PoolFull), with the results of a batch-1 run. A pool
    with room for the preload but not beside the next job's budget: the preload's pages give way
    to the starting job (evicted), and again every result is the batch-1 one."""
    cfg, params = model
    jobs = _jobs(cfg, 40)
    # d: 20 + 12 + 1 -> 3 pages of 16 (2 held, 1 promised), q: 18 + 2 + 1 -> 2; p: 304 history -> 19
    # pages, its job 21. 22 pages: 18 free beside d and q, 17 not promised.
    eng, store = _engine(cfg, params, tmp_path / "small", pool_tokens=22 * 16)
    _with_history(eng, cfg, "p", 300, 3)
    seen = _spy_writes(monkeypatch, eng)
    got = eng.run_batch(jobs)
    assert seen == [] and eng.pool.stats["preloads"] == 0 and got[-1].source == "host"
    eng.close()
    # 36 pages: the preload (19) fits beside d and q (13 left free); then "r" (a new session of 220
    # tokens: 14 pages) starts in q's slot, and its pages come from evicting the preload.
    jobs2 = jobs[:2] + [("r", random_ids(cfg, 220, 9), 3)] + jobs[2:]
    eng, store = _engine(cfg, params, tmp_path / "mid", pool_tokens=36 * 16)
    _with_history(eng, cfg, "p", 300, 3)
    got2 = eng.run_batch(jobs2)
    assert eng.pool.stats["preloads"] >= 1 and eng.pool.stats["preloads_dropped"] >= 1
    assert eng.pool.stats["evictions"] >= 1 and got2[-1].source == "host"
    eng.close()
    monkeypatch.undo()
    ref = _reference(cfg, params, tmp_path / "r", 300, jobs)
    _same(got[-1], ref)
    _same(got2[-1], ref)
    big, _ = _engine(cfg, params, tmp_path / "big", max_slots=1)
    for g, (sid, msg, n) in zip(got2[:3], jobs2[:3]):
        _same(g, big.turn(sid, msg, max_new_tokens=n))
    big.close()


def test_failed_preloaded_turn_leaves_session_usable(model, tmp_path, monkeypatch):
    """The preloaded probe fails in its first decode dispatch: its pages go back, its session stays at
    its committed turn, and its next turn equals a recompute of the committed conversation."""
    cfg, params = model
    eng, store = _engine(cfg, params, tmp_path / "b")
    _with_history(eng, cfg, "p", 300, 3)
    committed = np.asarray(store.lookup("p").token_ids)
    jobs = _jobs(cfg, 40)
    real = slots.generate

    def generate(*a, **k):
        if any(x.plan.sid == "p" for x in eng._slots.values()):
            assert any(x.plan.pool_preloaded for x in eng._slots.values())
            raise Boom("decode")
        return real(*a, **k)

    monkeypatch.setattr(slots, "generate", generate)
    with pytest.raises(Boom):
        eng.run_batch(jobs)
    monkeypatch.undo()
    eng.flush()
    assert not eng._slots and eng.pool.promised == 0 and eng.pool.entry("p") is None
    info = store.lookup("p")
    assert info.turn == 1 and np.array_equal(info.token_ids, committed)
    msg = random_ids(cfg, 30, 77)
    r = eng.turn("p", msg)
    full = np.concatenate([committed, msg])
    ref = np.asarray(forward(params, cfg, np.concatenate([full, np.asarray(r.reply_tokens, np.int32)])))
    np.testing.assert_allclose(r.prompt_logits, ref[len(committed): len(full)], atol=TOL, rtol=0)
    for i, lg in enumerate(r.decode_logits):
        np.testing.assert_allclose(lg, ref[len(full) - 1 + i], atol=TOL, rtol=0)
    eng.close()


def test_warmup_compiles_the_preload_and_what_the_preloaded_job_runs(model, tmp_path):
    """``keep_pages=False``: no device hit but a preloaded one. After ``Engine.warmup`` for one prompt and
    one history bucket, a batch whose queued job is preloaded into the pool compiles nothing."""
    cfg, params = model
    eng, store = _engine(cfg, params, tmp_path / "b", keep_pages=False, return_logits=False)
    with counting_compiles() as h:
        eng.warmup(prompt_lengths=(20,), history_lengths=(300,))
        warm = dict(h.count)
        for layer in range(cfg.num_layers):  # a 310-token history (bucket 512), committed as a turn commits it
            kv = np.random.RandomState(layer).randn(2, 310, cfg.num_kv_heads, cfg.head_dim).astype(np.float32)
            store.save_layer("p", layer, kv, start=0)
        store.commit_turn("p", random_ids(cfg, 310, 1)).result()
        got = eng.run_batch(_jobs(cfg, 40))
    assert got[-1].preload == "pool" and eng.pool.stats["preload_hits"] == 1
    assert dict(h.count) == warm, {k: h.count[k] - warm.get(k, 0) for k in h.count if h.count[k] != warm.get(k, 0)}
    eng.close()
