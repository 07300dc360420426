"""Engine on a tiny random model: cached turns == recompute, across tiers, truncation, async saves, bad input."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cachedattn.engine import ContextOverflow, Engine, EngineConfig, InputError, plan_truncation
from jax_cachedattn.engine.prefill import group_sizes, prompt_bucket_length
from jax_cachedattn.model import ModelConfig, TokenError, forward, init_params, prefill
from jax_cachedattn.store import InvalidSessionId, KVLayout, StoreConfig, TieredStore, UnknownSession

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny", max_context=1024, rope_theta=30000.0)
    return cfg, init_params(cfg, jax.random.key(7), norm_noise=0.3)


def _store(cfg, tmp_path=None, **kw):
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-test")
    sc = dict(host_bytes=1 << 24, device_bytes=0, token_block=64)
    sc.update(kw)
    if tmp_path is None:
        return TieredStore(StoreConfig(kvstore={"driver": "memory"}, **sc), lay)
    return TieredStore(StoreConfig(root=str(tmp_path), **sc), lay)


def _messages(cfg, n, length=90, seed=0):
    r = np.random.RandomState(seed)
    return [r.randint(0, cfg.vocab_size, length).astype(np.int32) for _ in range(n)]


def _check_turn(cfg, params, conversation, msg, res):
    """Compare the turn's prompt and decode logits with a full recompute of the conversation."""
    full = np.concatenate(conversation + [msg]) if conversation else msg
    gen = np.asarray(res.reply_tokens, np.int32)
    ref = np.asarray(forward(params, cfg, np.concatenate([full, gen])))
    got_prompt = res.prompt_logits
    assert got_prompt.shape == (len(msg), cfg.vocab_size)
    assert float(np.abs(got_prompt - ref[len(full) - len(msg) : len(full)]).max()) <= TOL
    for i, lg in enumerate(res.decode_logits):
        assert float(np.abs(lg - ref[len(full) - 1 + i]).max()) <= TOL
        if i + 1 < len(gen):
            assert int(np.argmax(ref[len(full) - 1 + i])) == gen[i]
    return full, gen


@pytest.mark.parametrize("where", ["host", "disk", "device", "reopen", "disk-in-program", "host-in-program"])
def test_multi_turn_equals_recompute(tiny, tmp_path, where):
    cfg, params = tiny
    where, _, mode = where.partition("-")
    dev = 1 << 24 if where == "device" else 0
    store = _store(cfg, tmp_path, device_bytes=dev)
    ec = EngineConfig(max_new_tokens=12, return_logits=True, save_every=5, preload=mode.replace("-", "_") or "layerwise")
    eng = Engine(cfg, params, store, None, ec)
    conversation = []
    sources = []
    for t, msg in enumerate(_messages(cfg, 5)):
        res = eng.turn("conv-1", msg)
        sources.append(res.source)
        assert res.history_tokens == sum(len(x) for x in conversation)
        full, gen = _check_turn(cfg, params, conversation, msg, res)
        conversation += [msg, gen]
        if where == "disk":
            eng.flush()
            eng.evict("conv-1", "host")
        elif where == "host":
            eng.evict("conv-1", "device")  # the pages leave the device pool: the next turn loads from host
        elif where == "reopen":
            eng.close()
            store = _store(cfg, tmp_path)
            eng = Engine(cfg, params, store, None, ec)
    eng.flush()
    info = store.lookup("conv-1")
    np.testing.assert_array_equal(info.token_ids, np.concatenate(conversation))
    expected = {"host": "host", "disk": "disk", "device": "device", "reopen": "disk"}[where]
    assert sources[0] == "new" and set(sources[2:]) == {expected}
    # A new session's first save goes to host (and disk); the device copy is made on its first load.
    assert sources[1] in ({expected, "host"} if where == "device" else {expected})
    eng.close()


def test_no_cache_recomputes_with_same_answer(tiny):
    cfg, params = tiny
    msgs = _messages(cfg, 3, seed=3)
    out = {}
    for use_cache in (True, False):
        eng = Engine(cfg, params, _store(cfg), None, EngineConfig(max_new_tokens=8, use_cache=use_cache, return_logits=True))
        out[use_cache] = [eng.turn("s", m) for m in msgs]
        eng.close()
    assert [r.source for r in out[False]] == ["new", "recompute", "recompute"]
    assert [r.source for r in out[True]] == ["new", "device", "device"]  # the pages stayed in the pool
    for a, b in zip(out[True], out[False]):
        assert a.reply_tokens == b.reply_tokens
        np.testing.assert_allclose(a.prompt_logits, b.prompt_logits, atol=TOL)
    assert out[True][2].reused_tokens > 0 and out[False][2].reused_tokens == 0


def test_group_sizes_and_prompt_buckets():
    assert group_sizes(30, 4, 2.0) == [2, 4, 8, 16]
    assert group_sizes(30, 3, 1.0) == [10, 10, 10]
    assert group_sizes(30, 3, 2.0) == [4, 9, 17]
    assert group_sizes(2, 4, 2.0) == [1, 1]
    for L, g, r in [(7, 4, 2.0), (5, 5, 3.0), (30, 6, 1.5), (1, 3, 2.0)]:
        sz = group_sizes(L, g, r)
        assert sum(sz) == L and min(sz) >= 1 and sz == sorted(sz)
    assert [prompt_bucket_length(n) for n in (1, 16, 17, 100, 256, 257, 2148)] == [16, 16, 32, 112, 256, 384, 2176]
    assert prompt_bucket_length(100, 128) == 128 and prompt_bucket_length(0) == 0
    # an eighth of an octave, never finer than the step: a short prompt is padded little, 16 buckets to 256 at step 8
    assert [prompt_bucket_length(n, 8) for n in (1, 8, 9, 13, 17, 63, 65, 129, 200, 255)] == \
        [8, 8, 16, 16, 24, 64, 80, 160, 224, 256]
    for step, count in ((8, 16), (16, 12), (64, 4)):
        buckets = {prompt_bucket_length(n, step) for n in range(1, 257)}
        assert len(buckets) == count and all(b % step == 0 for b in buckets)
        assert all(prompt_bucket_length(n, step) - n < max(step, n / 4) for n in range(1, 257))


def test_growing_program_groups_from_disk_equal_layerwise(tmp_path):
    """From disk the in-program path runs the layers as several programs of growing size; on a model
    with enough layers for uneven groups it computes exactly what per-layer dispatch computes."""
    cfg = ModelConfig.preset("tiny", num_layers=7, max_context=1024)
    params = init_params(cfg, jax.random.key(3), norm_noise=0.3)
    msgs = _messages(cfg, 3, seed=21)
    out = {}
    for name, extra in (("layerwise", {"preload": "layerwise"}), ("4x2", {}), ("3x1", {"program_groups": 3, "group_growth": 1.0}),
                        ("7x1.5", {"program_groups": 7, "group_growth": 1.5})):
        store = _store(cfg, tmp_path / name)
        eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=5, return_logits=True, **extra))
        rs = []
        for m in msgs:
            rs.append(eng.turn("g", m))
            eng.flush()
            eng.evict("g", "host")
        assert [r.source for r in rs] == ["new", "disk", "disk"]
        out[name] = ([r.reply_tokens for r in rs], rs[-1].prompt_logits, rs[-1].read_ahead)
        eng.close()
    assert out["4x2"][2] == 1 and out["3x1"][2] == 2  # the first program's size: [1, 1, 2, 3] and [2, 2, 3]
    for name in ("4x2", "3x1", "7x1.5"):
        assert out[name][0] == out["layerwise"][0]
        np.testing.assert_array_equal(out[name][1], out["layerwise"][1])


def test_preload_modes_agree(tiny):
    cfg, params = tiny
    msgs = _messages(cfg, 3, seed=4)
    replies = {}
    for mode in ("layerwise", "in_program", "upfront"):
        # layerwise: read_ahead; in_program: how many programs the layers are split into.
        for ra in (None, 1, 3) if mode != "upfront" else (None,):
            extra = {"read_ahead": ra} if mode == "layerwise" else {"program_groups": ra}
            eng = Engine(cfg, params, _store(cfg), None, EngineConfig(max_new_tokens=6, preload=mode, return_logits=True,
                                                                       keep_pages=False, **extra))
            rs = [eng.turn("s", m) for m in msgs]
            replies[(mode, ra)] = ([r.reply_tokens for r in rs], rs[-1].prompt_logits)
            eng.close()
    # auto: in-program, as one program from host memory and as several from disk.
    store = _store(cfg)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=6, return_logits=True, keep_pages=False))
    rs = [eng.turn("s", msgs[0]), eng.turn("s", msgs[1])]
    eng.flush()
    eng.evict("s", "host")
    rs.append(eng.turn("s", msgs[2]))
    assert [(r.source, r.preload) for r in rs] == [("new", "none"), ("host", "in_program"), ("disk", "in_program")]
    replies[("auto", None)] = ([r.reply_tokens for r in rs], rs[-1].prompt_logits)
    eng.close()
    base_tokens, base_logits = replies[("layerwise", None)]
    for toks, lg in replies.values():
        assert toks == base_tokens
        np.testing.assert_array_equal(lg, base_logits)


@pytest.mark.parametrize("verify_on_open", [True, False])
def test_kv_lost_falls_back_to_recompute(tiny, tmp_path, verify_on_open):
    cfg, params = tiny
    store = _store(cfg, tmp_path)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=6, return_logits=True))
    msgs = _messages(cfg, 3, seed=5)
    r0 = eng.turn("s", msgs[0])
    eng.flush()
    eng.close()
    # Corrupt one stored chunk on disk: the store detects it on read and the engine recomputes.
    chunks = sorted(p for p in tmp_path.rglob("c.*") if p.is_file() and p.parent.name == "kv")
    assert chunks, "no chunk files found"
    # The last layer's chunk (keys c.<layer group>.0.<token chunk>.0.0): without verify_on_open the damage
    # is found mid-prefill, after earlier layers already started saving this turn's KV.
    last_group = (cfg.num_layers - 1) // store.disk.chunk_layers
    bad = [p for p in chunks if p.name.split(".")[1] == str(last_group)]
    assert bad, "no chunk of the last layer found"
    data = bytearray(bad[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad[0].write_bytes(bytes(data))
    store = _store(cfg, tmp_path, verify_on_open=verify_on_open)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=6, return_logits=True))
    r1 = eng.turn("s", msgs[1])
    assert r1.source == "recompute"
    _check_turn(cfg, params, [msgs[0], np.asarray(r0.reply_tokens, np.int32)], msgs[1], r1)
    r2 = eng.turn("s", msgs[2])
    assert r2.source == "device"  # the recomputed KV stayed in the pool
    eng.close()


# ---- truncation ---------------------------------------------------------------------------------

def test_plan_truncation():
    h = np.array([5, 1, 1, 5, 1, 1, 1, 5, 1, 1], np.int32)
    assert plan_truncation(h, 3, 2, 20, 0.5) == (0, 0)
    assert plan_truncation(h, 5, 2, 15, 0.2) == (0, 2)  # overflow 2 > ratio*10
    assert plan_truncation(h, 5, 2, 15, 0.2, boundary_id=5) == (0, 3)  # next turn boundary
    assert plan_truncation(h, 5, 2, 15, 0.5, boundary_id=5) == (0, 7)
    assert plan_truncation(h, 8, 2, 12, 0.5) == (0, 8)
    with pytest.raises(ContextOverflow):
        plan_truncation(h, 11, 2, 12, 0.5)


def test_truncation_keeps_stored_kv_and_restarts_positions(tiny):
    cfg0, params = tiny
    cfg = cfg0.replace(max_context=220)
    store = _store(cfg)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=8, return_logits=True, truncation_sink=0))
    msgs = _messages(cfg, 3, length=70, seed=9)
    eng.turn("t", msgs[0])
    eng.turn("t", msgs[1])
    eng.flush()
    before = store.lookup("t")
    kv_before = [np.asarray(store.load_layer("t", l)) for l in range(cfg.num_layers)]
    res = eng.turn("t", msgs[2])
    assert res.truncated_tokens > 0 and res.source == "host"
    n_drop = res.truncated_tokens
    kept = before.num_tokens - n_drop
    assert res.history_tokens == kept and res.reused_tokens == kept
    # The kept KV is bit-for-bit the stored KV of the kept tokens.
    for l in range(cfg.num_layers):
        got = np.asarray(store.load_layer("t", l))[:, :kept]
        np.testing.assert_array_equal(got, kv_before[l][:, n_drop:])
    # Positions restart at 0: the turn equals a prefill of the new tokens against the kept
    # pre-RoPE cache with the history at positions 0..kept-1.
    cache = jnp.stack([jnp.asarray(kv[:, n_drop:]) for kv in kv_before])
    ref, _ = prefill(params, cfg, jnp.asarray(msgs[2]), cache, jnp.int32(kept))
    np.testing.assert_allclose(res.prompt_logits, np.asarray(ref), atol=TOL)
    eng.close()


def test_naive_rope_truncation_differs(tiny):
    cfg0, params = tiny
    cfg = cfg0.replace(max_context=220)
    msgs = _messages(cfg, 3, length=70, seed=9)
    out = {}
    for mode in ("decoupled", "naive"):
        eng = Engine(cfg, params, _store(cfg), None, EngineConfig(max_new_tokens=8, rope_mode=mode, return_logits=True))
        out[mode] = [eng.turn("t", m) for m in msgs]
        eng.close()
    # Before truncation both modes are exact, so they agree...
    for a, b in zip(out["decoupled"][:2], out["naive"][:2]):
        assert a.truncated_tokens == b.truncated_tokens == 0
        np.testing.assert_allclose(a.prompt_logits, b.prompt_logits, atol=TOL)
    # ...after it, post-RoPE keys carry stale positions and the naive logits are wrong.
    a, b = out["decoupled"][2], out["naive"][2]
    assert a.truncated_tokens == b.truncated_tokens > 0
    # (The decoupled turn is exact to 1e-5, see the test above; the naive one is off by 100x that.)
    assert float(np.abs(a.prompt_logits - b.prompt_logits).max()) > 100 * TOL


def test_runs_three_times_past_the_context_window(tiny):
    cfg0, params = tiny
    cfg = cfg0.replace(max_context=200)
    store = _store(cfg)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=10))
    total = 0
    results = []
    for msg in _messages(cfg, 16, length=40, seed=11):
        res = eng.turn("long", msg)
        results.append(res)
        total += res.prompt_tokens + res.generated_tokens
        assert res.history_tokens + res.prompt_tokens + 10 + 2 <= cfg.max_context
    assert total > 3 * cfg.max_context
    assert sum(r.truncated_tokens > 0 for r in results) >= 2
    assert all(r.source in ("new", "device", "host") for r in results)  # never a recompute
    assert any(r.source == "host" for r in results)  # a truncated history is reloaded from the store
    assert store.lookup("long").num_tokens <= cfg.max_context
    eng.close()


# ---- asynchronous saving ------------------------------------------------------------------------

def test_flush_makes_everything_durable(tiny, tmp_path):
    cfg, params = tiny
    store = _store(cfg, tmp_path)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=9, save_every=4))
    for m in _messages(cfg, 2, seed=13):
        eng.turn("d", m)
    eng.flush()
    info = store.lookup("d")
    assert info.durable
    kv = [np.asarray(store.load_layer("d", l)) for l in range(cfg.num_layers)]
    eng.close()
    reopened = _store(cfg, tmp_path)
    info2 = reopened.lookup("d")
    assert info2.tier == "disk" and info2.turn == info.turn
    np.testing.assert_array_equal(info2.token_ids, info.token_ids)
    for l in range(cfg.num_layers):
        np.testing.assert_array_equal(np.asarray(reopened.load_layer("d", l)), kv[l])
    reopened.close()


def test_turn_while_previous_saves_in_flight(tiny, tmp_path):
    cfg, params = tiny
    store = _store(cfg, tmp_path)
    real_write = store.disk.write_rows
    in_flight = threading.Event()

    def slow_write(*a, **k):  # disk writes lag well behind compute
        in_flight.set()
        time.sleep(0.05)
        return real_write(*a, **k)

    store.disk.write_rows = slow_write
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=7, return_logits=True, save_every=3))
    conversation = []
    for m in _messages(cfg, 3, seed=17):
        res = eng.turn("f", m)  # no flush between turns
        _, gen = _check_turn(cfg, params, conversation, m, res)
        conversation += [m, gen]
    assert in_flight.is_set()
    eng.flush()
    assert store.lookup("f").durable
    eng.close()


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "sid,msg,exc",
    [
        ("", [1, 2], InvalidSessionId),
        ("../etc", [1, 2], InvalidSessionId),
        ("a/b", [1, 2], InvalidSessionId),
        (None, [1, 2], InvalidSessionId),
        ("ok", [], TokenError),
        ("ok", [1, 512], TokenError),
        ("ok", [-3], TokenError),
        ("ok", list(range(100)) * 11, ContextOverflow),
        ("ok", "hello", InputError),  # no tokenizer: text is not accepted
    ],
)
def test_bad_input_leaves_store_untouched(tiny, sid, msg, exc):
    cfg, params = tiny
    store = _store(cfg)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=4))
    eng.turn("ok", [1, 2, 3])
    eng.flush()
    before = (store.sessions(), store.lookup("ok").num_tokens, store.lookup("ok").turn, dict(store.usage()))
    with pytest.raises(exc):
        eng.turn(sid, msg)
    eng.flush()
    after = (store.sessions(), store.lookup("ok").num_tokens, store.lookup("ok").turn, dict(store.usage()))
    assert before == after
    eng.close()


def test_unknown_session_errors(tiny):
    cfg, params = tiny
    store = _store(cfg)
    with pytest.raises(UnknownSession):
        store.load_layer("nobody", 0)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=4))
    assert eng.preload("nobody") is False
    eng.close()


def test_model_change_recomputes_from_token_ids(tiny, tmp_path):
    """A store written by another model: its KV is never served, the conversation continues."""
    cfg, params = tiny
    msgs = _messages(cfg, 3, seed=21)
    eng = Engine(cfg, params, _store(cfg, tmp_path), None, EngineConfig(max_new_tokens=5))
    r0 = eng.turn("m", msgs[0])
    r1 = eng.turn("m", msgs[1])
    eng.close()
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "another-model")
    from jax_cachedattn.store import FingerprintMismatch

    with pytest.raises(FingerprintMismatch):
        TieredStore(StoreConfig(root=str(tmp_path), token_block=64), lay)
    store = TieredStore(StoreConfig(root=str(tmp_path), token_block=64, keep_tokens_on_mismatch=True), lay)
    info = store.lookup("m")
    assert info is not None and not info.kv_valid and info.tier is None
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=5, return_logits=True))
    r2 = eng.turn("m", msgs[2])
    assert r2.source == "recompute" and r2.history_tokens == info.num_tokens
    conversation = [msgs[0], np.asarray(r0.reply_tokens, np.int32), msgs[1], np.asarray(r1.reply_tokens, np.int32)]
    _check_turn(cfg, params, conversation, msgs[2], r2)
    eng.evict("m", "device")
    r3 = eng.turn("m", msgs[0])
    assert r3.source == "host"  # the recomputed KV was saved under the new fingerprint
    eng.close()


def test_next_job_preloaded_while_current_decodes(tiny):
    cfg, params = tiny
    store = _store(cfg)
    # One slot and no pages kept after a turn: every job loads its history from the host tier, and the
    # next queued job's first layers are loaded into the read buffer while the current one decodes (the
    # preload into pool pages off: it would take the read buffer's place; tests/test_engine_pool_preload.py).
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=6, read_ahead=2, return_logits=True,
                                                        max_slots=1, keep_pages=False, pool_preload_rows=0))
    a, b = _messages(cfg, 2, seed=23)
    eng.turn("A", a)
    eng.turn("B", b)
    res = eng.run_batch([("A", b), ("B", a), ("A", a)])
    assert [r.source for r in res] == ["host", "host", "host"]
    # B's first layers were loaded while A decoded, and A's while B decoded.
    assert res[1].preloaded_layers == 2 and res[2].preloaded_layers == 2
    assert res[0].preloaded_layers == 0
    # The preloaded turn computes the same thing as a plain one.
    ref = Engine(cfg, params, _store(cfg), None, EngineConfig(max_new_tokens=6, return_logits=True, keep_pages=False))
    ref.turn("A", a)
    ref.turn("B", b)
    ref.turn("A", b)
    rb = ref.turn("B", a)
    np.testing.assert_array_equal(rb.prompt_logits, res[1].prompt_logits)
    assert rb.reply_tokens == res[1].reply_tokens
    ref.close()
    eng.close()
