"""The read buffer follows measured times; the engine holds each layer's weights once."""

import time

import jax
import numpy as np
import pytest

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.engine.read_buffer import ReadAhead
from jax_cachedattn.model import ModelConfig, init_params
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore


def test_read_ahead_grows_when_loads_are_slower_than_compute():
    ra = ReadAhead(num_layers=30)
    assert ra.layers(1 << 20, 64) == 2  # nothing measured yet
    ra.observe_compute(new_tokens=64, layers=1, seconds=0.010)  # 10 ms per layer for 64 tokens
    ra.observe_load(nbytes=1 << 20, seconds=0.005)  # 5 ms per MiB: loads hide behind compute
    assert ra.layers(1 << 20, 64) == 2
    slow = ReadAhead(num_layers=30)
    slow.observe_compute(64, 1, 0.010)
    slow.observe_load(1 << 20, 0.040)  # 40 ms per layer's MiB: 4x slower than compute
    k = slow.layers(1 << 20, 64)
    # The last load lands when compute needs it (1 + ceil(30 * 0.75) = 24), rounded up to a count
    # the warm-up compiles (ReadAhead.counts: default, half, every layer).
    assert slow.counts() == (2, 15, 30) and k == 30
    assert slow.layers(1 << 20, 256) < k  # more new tokens: more compute to hide the loads behind
    assert ReadAhead(30, fixed=5).layers(1 << 30, 1) == 5 and ReadAhead(30, fixed=5).counts() == (5,)


def test_read_ahead_picks_only_its_counts():
    """Whatever the measured rates, the count is one of counts() (each is one compiled in-program
    prefill, warmed up front), and never fewer layers than the loads need."""
    r = np.random.RandomState(0)
    for L in (1, 2, 3, 6, 30):
        ra = ReadAhead(L)
        seen = set()
        for _ in range(300):
            ra.load_s_per_byte, ra.comp_s_per_token = 10 ** r.uniform(-12, -6), 10 ** r.uniform(-8, -3)
            hb, n = int(10 ** r.uniform(2, 8)), int(r.randint(1, 512))
            k = ra.layers(hb, n)
            seen.add(k)
            t_load, t_comp = ra.load_s_per_byte * hb, ra.comp_s_per_token * n
            need = min(L, 2) if t_load <= t_comp else min(L, 1 + int(np.ceil(L * (1 - t_comp / t_load))))
            assert k in ra.counts() and k >= need
        assert seen == set(ra.counts()), (L, seen)   # every count is reachable


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny", max_context=1024, num_layers=6)
    return cfg, init_params(cfg, jax.random.key(1))


@pytest.mark.slow  # make test-all
def test_engine_read_ahead_follows_measured_load_times(tiny, monkeypatch):
    """Per-layer prefill from host: when the store's loads get slow, the next turn keeps more layers
    in flight."""
    cfg, params = tiny
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "rb")
    store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 24, token_block=64), lay)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=3, preload="layerwise", keep_pages=False))
    r = np.random.RandomState(0)
    msgs = [r.randint(0, cfg.vocab_size, 200).astype(np.int32) for _ in range(5)]
    eng.turn("s", msgs[0])
    eng.turn("s", msgs[4][:100])  # compiles the per-layer shapes: a compile is never taken for compute
    fast = eng.turn("s", msgs[1])
    assert fast.source == "host" and fast.read_ahead == 2  # tiny loads: default
    real = store.load_layer

    def slow_load(*a, **k):
        out = real(*a, **k)
        out.block_until_ready()
        time.sleep(0.2)  # far slower than one tiny layer's compute
        return out

    monkeypatch.setattr(store, "load_layer", slow_load)
    eng.turn("s", msgs[2])  # measures the slow load
    eng.turn("s", msgs[2][:50])
    assert eng.read_ahead.load_s_per_byte is not None and eng.read_ahead.comp_s_per_token is not None
    assert eng.turn("s", msgs[3]).read_ahead == cfg.num_layers  # every layer in flight
    eng.close()


def test_weights_held_once(tiny):
    cfg, params = tiny
    eng = Engine(cfg, params, None, None, EngineConfig(max_new_tokens=2))
    assert "layers" not in eng.params  # the stacked copy is not kept
    held = sum(x.nbytes for x in jax.tree.leaves((eng.params, eng.layers)))
    assert held == sum(x.nbytes for x in jax.tree.leaves(params))
    assert eng.turn("x", [1, 2, 3]).generated_tokens == 2


def test_owned_params_are_freed_once_unstacked(tiny):
    cfg, params0 = tiny
    params = jax.tree.map(lambda a: a + 0, params0)  # a copy the engine may own
    eng = Engine(cfg, params, None, None, EngineConfig(max_new_tokens=2), own_params=True)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(params["layers"]))
    assert eng.turn("x", [1, 2, 3]).reply_tokens == Engine(cfg, params0, None, None, EngineConfig(max_new_tokens=2)).turn(
        "x", [1, 2, 3]).reply_tokens


def test_in_program_read_buffer_grows_when_loads_are_slow(tiny, monkeypatch):
    """The default path (in-program, history from host) feeds the estimator too: once its loads are
    slow, the next job's preload puts every layer in the read buffer, not the default two. Jobs of
    other history lengths in one bucket compile nothing (the blocks are padded), so each is measured."""
    cfg, params = tiny
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "rb2")
    store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 25, token_block=64), lay)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=3, keep_pages=False))
    r = np.random.RandomState(1)
    ids = lambda n: r.randint(0, cfg.vocab_size, n).astype(np.int32)  # noqa: E731
    eng.turn("s", ids(300))  # compiles the 384-token prefill
    eng.turn("t", ids(290))  # same bucket: a compute measurement
    assert eng.read_ahead.comp_s_per_token is not None
    first = eng.turn("s", ids(20))  # history 303 tokens from host: compiles the in-program prefill
    assert (first.source, first.preload) == ("host", "in_program")
    eng.turn("s", ids(18))  # history 326: another block count, the same program: a load measurement
    assert eng.read_ahead.load_s_per_byte is not None
    # From here the rates are pinned, so a loaded machine cannot tip either decision: compute at
    # 10 us per token and layer (it is measured no more), loads as fast as they can be until the
    # slow ones below are measured.
    monkeypatch.setattr(eng.read_ahead, "observe_compute", lambda *a, **k: None)
    eng.read_ahead.comp_s_per_token, eng.read_ahead.load_s_per_byte = 1e-5, 1e-15
    assert eng.preload("t") and eng.read_buffer.held_layers("t") < cfg.num_layers
    eng.read_buffer.drop("t")
    real = store.layer_blocks

    def slow_blocks(*a, **k):
        time.sleep(0.2)  # far slower than one tiny layer's compute
        return real(*a, **k)

    monkeypatch.setattr(store, "layer_blocks", slow_blocks)
    assert eng.turn("s", ids(25)).source == "host"  # measures the slow loads
    assert eng.read_ahead.load_s_per_byte > 1e-15
    assert eng.preload("t") and eng.read_buffer.held_layers("t") == cfg.num_layers
    eng.close()
