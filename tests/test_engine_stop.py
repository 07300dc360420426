"""How a turn ends: a stop token is replaced by the chat template's closing tokens in the stored
history (``<|endoftext|>`` is not followed by ``<|im_end|>``); the stored KV matches a recompute."""

import jax
import numpy as np
import pytest

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.model import ModelConfig, forward, init_params
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

IM_START, IM_END, NL = 1, 2, 3


class FakeChat:
    """The tokenizer surface the engine uses, over a tiny vocabulary: text -> ids by a fixed hash."""

    turn_boundary_id = IM_START

    def __init__(self, eot: int):
        self.stop_ids = {eot, IM_END}

    def token_to_id(self, tok):
        return IM_START if tok == "<|im_start|>" else None

    def chat_turn(self, text, first_turn):
        r = np.random.RandomState(sum(map(ord, text)) % 1000)
        return [IM_START] + r.randint(10, 500, 30).tolist() + [IM_END, NL, IM_START]

    def assistant_end(self):
        return [IM_END, NL]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny", max_context=512)
    return cfg, init_params(cfg, jax.random.key(2), norm_noise=0.3)


@pytest.mark.parametrize("stop", ["endoftext", "budget"])
def test_turn_end_is_the_rendered_template(tiny, stop):
    cfg, params = tiny
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "stop")
    probe = Engine(cfg, params, None, FakeChat(eot=4), EngineConfig(max_new_tokens=4))
    first = probe.turn("p", "hello there").reply_tokens[1]  # the model's second greedy token for this prompt
    eot = first if stop == "endoftext" else 5
    store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 24, token_block=64), lay)
    eng = Engine(cfg, params, store, FakeChat(eot=eot), EngineConfig(max_new_tokens=4, return_logits=True))
    r = eng.turn("s", "hello there")
    new = FakeChat(eot).chat_turn("hello there", True)
    ids = store.lookup("s").token_ids.tolist()
    # Either way the stored history is the conversation as the template renders it; a stop token
    # (here <|endoftext|>) is not stored, the template's end is.
    assert ids == new + r.reply_tokens + [IM_END, NL]
    if stop == "endoftext":
        assert r.generated_tokens == len(r.reply_tokens) + 1 == 2 and eot not in ids[len(new):]
    # The stored KV is the KV of exactly those ids: the next turn equals a recompute.
    r2 = eng.turn("s", "and then?")
    full = ids + FakeChat(eot).chat_turn("and then?", False)
    ref = np.asarray(forward(params, cfg, np.asarray(full, np.int32)))
    np.testing.assert_allclose(r2.prompt_logits, ref[len(ids):], atol=1e-5, rtol=0)
    eng.close()


def test_save_every_larger_than_the_turn(tiny):
    cfg, params = tiny
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "save-every")
    store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 24, token_block=64), lay)
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=5, save_every=1000))
    r = eng.turn("s", [7, 8, 9])
    eng.flush()
    assert store.lookup("s").num_tokens == 3 + r.generated_tokens
    eng.close()
