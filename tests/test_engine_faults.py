"""A turn that fails at any stage (prefill, decode, save, commit) leaves its session at its last
committed turn: the next turn works and equals a recompute of the committed conversation."""

import jax
import numpy as np
import pytest

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.engine import programs, slots
from jax_cachedattn.model import ModelConfig, forward, init_params
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore
from jax_cachedattn.store.errors import TurnFailed

TOL = 1e-5


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny", max_context=1024, rope_theta=30000.0)
    return cfg, init_params(cfg, jax.random.key(5), norm_noise=0.3)


def _msgs(cfg, n, seed):
    r = np.random.RandomState(seed)
    return [r.randint(0, cfg.vocab_size, 40 + 7 * i).astype(np.int32) for i in range(n)]


def _inject(stage, monkeypatch, store):
    """Make the next turn fail at ``stage``; returns nothing (the patch stays for one failure)."""
    fired = {"n": 0}

    def once():
        fired["n"] += 1
        return fired["n"] == 1

    if stage == "prefill":  # layer 1 of the per-layer prefill, after layer 0's KV went to the store
        real = programs.one_layer
        calls = {"n": 0}

        def one_layer(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2 and once():
                raise Boom("prefill")
            return real(*a, **k)

        monkeypatch.setattr(programs, "one_layer", one_layer)
    elif stage == "decode":  # the second decode dispatch, after a decode-time save
        real = slots.generate
        calls = {"n": 0}

        def generate(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2 and once():
                raise Boom("decode")
            return real(*a, **k)

        monkeypatch.setattr(slots, "generate", generate)
    elif stage == "save":  # a save of decoded tokens
        real = store.save_layer
        prompt_end = {}

        def save_layer(sid, layer, kv, start):
            prompt_end.setdefault(layer, start)
            if start > prompt_end[layer] and once():
                raise Boom("save")
            return real(sid, layer, kv, start)

        monkeypatch.setattr(store, "save_layer", save_layer)
    elif stage == "commit":  # the manifest write fails: the commit future raises, the store rolls back
        real = store.disk.write_manifest

        def write_manifest(*a, **k):
            if once():
                raise OSError(5, "injected I/O error")
            return real(*a, **k)

        monkeypatch.setattr(store.disk, "write_manifest", write_manifest)


@pytest.mark.parametrize("stage,keep_pages", [("prefill", True), ("decode", True), ("save", True), ("commit", True),
                                              ("decode", False)])
def test_failed_turn_leaves_session_usable(tiny, tmp_path, monkeypatch, stage, keep_pages):
    cfg, params = tiny
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "faults")
    store = TieredStore(StoreConfig(root=str(tmp_path), host_bytes=1 << 24, token_block=64), lay)
    preload = "layerwise" if stage == "prefill" else "auto"
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=7, save_every=2, decode_steps=1,
                                                        return_logits=True, preload=preload, keep_pages=keep_pages))
    m0, m1, m2 = _msgs(cfg, 3, seed=31)
    r0 = eng.turn("s", m0)
    eng.flush()
    committed = np.concatenate([m0, np.asarray(r0.reply_tokens, np.int32)])
    free_before = eng.pool.free_pages()
    _inject(stage, monkeypatch, store)
    if stage == "commit":
        eng.turn("s", m1)  # the turn itself returns; its commit fails on the committer thread
        with pytest.raises(TurnFailed) as failed:  # the store's one-line turn error, the I/O error its cause
            eng.flush()
        assert isinstance(failed.value.__cause__, OSError)
    else:
        with pytest.raises(Boom):
            eng.turn("s", m1)
        eng.flush()
    assert not eng._slots and eng.pool.free_pages() == free_before
    info = store.lookup("s")
    assert info.num_tokens == len(committed) and info.turn == 1
    np.testing.assert_array_equal(info.token_ids, committed)
    r2 = eng.turn("s", m2)
    assert r2.history_tokens == len(committed) and r2.source in ("host", "disk")
    full = np.concatenate([committed, m2])
    gen = np.asarray(r2.reply_tokens, np.int32)
    ref = np.asarray(forward(params, cfg, np.concatenate([full, gen])))
    np.testing.assert_allclose(r2.prompt_logits, ref[len(committed): len(full)], atol=TOL, rtol=0)
    for i, lg in enumerate(r2.decode_logits):
        np.testing.assert_allclose(lg, ref[len(full) - 1 + i], atol=TOL, rtol=0)
    eng.flush()
    assert store.lookup("s").turn == 2
    eng.close()
