"""Truncation that keeps the attention sink: the plan, and a truncating multi-turn conversation through
the engine and the store equal to the same conversation computed by hand over the kept KV (the first
``sink`` tokens and the tail, re-numbered from position 0): greedy tokens and logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cachedattn.engine import ContextOverflow, Engine, EngineConfig, plan_truncation
from jax_cachedattn.engine.truncation import Cut
from jax_cachedattn.model import ModelConfig, init_params, prefill
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny", max_context=200, rope_theta=30000.0)
    return cfg, init_params(cfg, jax.random.key(7), norm_noise=0.3)


def _store(cfg, **kw):
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-test")
    return TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 24, device_bytes=0, token_block=64, **kw), lay)


def test_plan_truncation_keeps_the_sink():
    h = np.array([5, 1, 1, 5, 1, 1, 1, 5, 1, 1, 5, 1], np.int32)
    assert plan_truncation(h, 3, 2, 20, 0.5, sink=4) == (0, 0)  # fits: nothing goes
    # overflow 2, ratio 0.25 of 12 -> 3 tokens after the sink of 4: [4, 7)
    assert plan_truncation(h, 5, 2, 16, 0.25, sink=4) == (4, 3)
    # the cut ends at the next turn boundary (token 5 at index 7) ... or later when none is near
    assert plan_truncation(h, 5, 2, 16, 0.2, boundary_id=5, sink=4) == (4, 3)
    assert plan_truncation(h, 5, 2, 16, 0.4, boundary_id=5, sink=2) == Cut(2, 5)
    # an overflow that leaves no room for the whole sink takes it too (only what the window needs stays)
    assert plan_truncation(h, 8, 2, 12, 0.1, sink=4) == (2, 10)
    assert plan_truncation(h, 9, 2, 11, 0.1, sink=4) == (0, 12)
    assert Cut(2, 3).keep(np.arange(8)).tolist() == [0, 1, 5, 6, 7]
    with pytest.raises(ContextOverflow):
        plan_truncation(h, 11, 2, 12, 0.5, sink=4)
    with pytest.raises(ValueError):
        plan_truncation(h, 5, 2, 16, 0.5, sink=-1)
    with pytest.raises(ValueError):
        EngineConfig(truncation_sink=-2)


class _ByHand:
    """The conversation computed with ``model.prefill`` over a KV buffer held here: each turn applies the
    engine's cut (``plan_truncation`` with the sink) to the buffer's rows, prefills the message and decodes
    greedily one token at a time, as the math says the engine must."""

    def __init__(self, cfg, params, sink, max_new, ratio=0.5):
        self.cfg, self.params, self.sink, self.max_new, self.ratio = cfg, params, sink, max_new, ratio
        self.S = 512
        self.kv = jnp.zeros((cfg.num_layers, 2, self.S, cfg.num_kv_heads, cfg.head_dim), cfg.jnp_dtype)
        self.ids = np.zeros(0, np.int32)

    def _feed(self, toks):
        n = len(self.ids)
        logits, new = prefill(self.params, self.cfg, jnp.asarray(toks, jnp.int32), self.kv, jnp.int32(n))
        self.kv = self.kv.at[:, :, n : n + len(toks)].set(new)
        self.ids = np.concatenate([self.ids, np.asarray(toks, np.int32)])
        return np.asarray(logits)

    def turn(self, msg):
        cut = plan_truncation(self.ids, len(msg), self.max_new + 2, self.cfg.max_context, self.ratio, None, self.sink)
        if cut.n:
            rows = jnp.concatenate([self.kv[:, :, : cut.start], self.kv[:, :, cut.stop :]], axis=2)
            self.kv = jnp.pad(rows, ((0, 0), (0, 0), (0, cut.n), (0, 0), (0, 0)))
            self.ids = cut.keep(self.ids)
        prompt = self._feed(msg)
        logits, gen = [prompt[-1]], []
        for _ in range(self.max_new):
            gen.append(int(np.argmax(logits[-1])))
            step = self._feed([gen[-1]])
            if len(gen) < self.max_new:
                logits.append(step[-1])
        return cut, prompt, logits, gen


@pytest.mark.parametrize("sink", [4, 0])
def test_truncating_conversation_equals_the_kept_kv_by_hand(tiny, sink):
    cfg, params = tiny
    max_new = 6
    store = _store(cfg)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=max_new, return_logits=True, truncation_sink=sink))
    ref = _ByHand(cfg, params, sink, max_new)
    r = np.random.RandomState(3)
    cuts = []
    for t in range(6):
        msg = r.randint(0, cfg.vocab_size, 48).astype(np.int32)  # one length: few compiled shapes
        before = store.lookup("c")
        kv_before = None if before is None else [np.asarray(store.load_layer("c", l)) for l in range(cfg.num_layers)]
        res = eng.turn("c", msg)
        cut, prompt, logits, gen = ref.turn(msg)
        assert res.truncated_tokens == cut.n
        assert res.reply_tokens == gen, t  # greedy tokens
        np.testing.assert_allclose(res.prompt_logits, prompt, atol=TOL, rtol=0)
        assert len(res.decode_logits) == len(logits)
        for a, b in zip(res.decode_logits, logits):
            np.testing.assert_allclose(np.asarray(a).reshape(-1), b, atol=TOL, rtol=0)
        if cut.n:
            cuts.append(cut)
            assert res.source == "host" and res.reused_tokens == res.history_tokens == before.num_tokens - cut.n
            info = store.lookup("c")
            np.testing.assert_array_equal(info.token_ids[: res.history_tokens], cut.keep(before.token_ids))
            for l in range(cfg.num_layers):  # the kept rows are the stored rows, bit for bit (no recompute)
                got = np.asarray(store.load_layer("c", l))[:, : res.history_tokens]
                np.testing.assert_array_equal(got, np.concatenate([kv_before[l][:, : cut.start], kv_before[l][:, cut.stop :]], axis=1))
        eng.flush()
    assert len(cuts) >= 2 and all(c.start == sink for c in cuts), cuts  # truncated twice, the sink kept each time
    np.testing.assert_array_equal(store.lookup("c").token_ids, ref.ids)
    eng.close()
