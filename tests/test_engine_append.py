"""``Engine.append``: finished turns taken in without a decode (teacher forcing). The appended rows are a
prefill of the given text against the stored history; the next turn then equals one recompute of the whole
text. Tiny random Hugging Face models with small tokenizers trained here (tests/byom_fixtures)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from byom_fixtures import load_byom
from jax_cachedattn.engine import Engine, EngineConfig, InputError
from jax_cachedattn.model import forward
from jax_cachedattn.model import prefill as model_prefill
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-4
U1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": "The capital of France is Paris."}
U2 = {"role": "user", "content": "Tell me a joke about cats."}


@pytest.fixture(autouse=True)
def _no_xla_cache(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_NO_XLA_CACHE", "1")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return load_byom(tmp_path_factory.mktemp("chatml"), "qwen2", "chatml", 11)


def _engine(m, store=True, **kw):
    _, cfg, params, tok = m
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "append-test")
    st = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 24, device_bytes=0, token_block=16),
                     lay) if store else None
    return Engine(cfg, params, st, tok, EngineConfig(max_new_tokens=4, return_logits=True, **kw)), st


def _kv(store, sid, layers):
    return [np.asarray(store.load_layer(sid, layer)) for layer in range(layers)]


def _equals_recompute(m, ids, res):
    """Prompt logits, decode logits and greedy tokens of ``res`` equal a full forward of ``ids`` + the reply."""
    _, cfg, params, tok = m
    gen = list(res.reply_tokens)
    ref = np.asarray(forward(params, cfg, np.concatenate([np.asarray(ids, np.int32), np.asarray(gen, np.int32)])))
    n = res.prompt_tokens
    assert res.history_tokens + n == len(ids)
    np.testing.assert_allclose(res.prompt_logits, ref[len(ids) - n : len(ids)], atol=TOL, rtol=0)
    for i, lg in enumerate(res.decode_logits):
        row = ref[len(ids) - 1 + i]
        np.testing.assert_allclose(np.asarray(lg).reshape(-1), row, atol=TOL, rtol=0)
        if i < len(gen):
            assert int(np.argmax(row)) == gen[i]


@pytest.mark.parametrize("keep_pages", [True, False])
def test_given_reply_replaces_the_generated_one_and_the_next_turn_equals_a_recompute(chatml, keep_pages):
    """A generated reply, then the file's reply appended in its place (the conversation as messages): the
    stale tail is dropped, the kept prefix's bytes are untouched, the appended rows are a prefill of the
    given text against it, no token is sampled, and the next turn serves all of it and equals a recompute."""
    _, cfg, params, tok = chatml
    eng, store = _engine(chatml, keep_pages=keep_pages)
    r1 = eng.turn("c", [U1])
    eng.flush()
    before = store.lookup("c").token_ids
    kv_before = _kv(store, "c", cfg.num_layers)
    given = tok.chat([U1, A1], add_generation_prompt=False)
    keep = int(np.flatnonzero(np.asarray(before[: len(given)]) != np.asarray(given[: len(before)]))[0])
    assert r1.reply != A1["content"] and keep < len(before)   # the generated reply differs from the file's
    ra = eng.append("c", [U1, A1])
    assert (ra.reused_tokens, ra.dropped_tokens, ra.prompt_tokens) == (keep, len(before) - keep, len(given) - keep)
    assert ra.generated_tokens == 0 and ra.reply_tokens == [] and ra.decode_logits is None
    assert ra.source == ("device" if keep_pages else "host")
    eng.flush()
    info = store.lookup("c")
    assert info.token_ids.tolist() == given and info.turn == 2
    kv_after = _kv(store, "c", cfg.num_layers)
    cache = jnp.asarray(np.stack(kv_before)[:, :, :keep])
    _, new_kv = model_prefill(params, cfg, jnp.asarray(given[keep:], jnp.int32), cache, jnp.int32(keep))
    for layer in range(cfg.num_layers):
        # The kept prefix: the same bytes. The appended rows: the given text's KV against it.
        assert kv_after[layer][:, :keep].tobytes() == kv_before[layer][:, :keep].tobytes()
        np.testing.assert_allclose(kv_after[layer][:, keep:], np.asarray(new_kv[layer]), atol=TOL, rtol=0)
    r2 = eng.turn("c", [U1, A1, U2])
    assert (r2.reused_tokens, r2.dropped_tokens) == (len(given), 0)
    _equals_recompute(chatml, tok.chat([U1, A1, U2]), r2)
    eng.close()


def test_appended_token_ids_then_a_turn_equal_one_recompute(chatml):
    """Token ids appended twice to a new session (each a prefill and a commit), then a turn: its logits
    equal one forward over all the text, and the store holds exactly the tokens given."""
    _, cfg, params, tok = chatml
    eng, store = _engine(chatml)
    a = tok.chat([U1, A1], add_generation_prompt=False)
    b = tok.encode("<|im_start|>user\nAnd a second recorded exchange.<|im_end|>\n")
    c = tok.chat([U2])  # a user turn with the generation prompt
    r0 = eng.append("t", a)
    assert (r0.source, r0.reused_tokens, r0.prompt_tokens) == ("new", 0, len(a))
    eng.evict("t", "device")
    r1 = eng.append("t", b)
    assert (r1.source, r1.reused_tokens, r1.prompt_tokens) == ("host", len(a), len(b))
    eng.flush()
    assert store.lookup("t").token_ids.tolist() == a + b and store.lookup("t").turn == 2
    r2 = eng.turn("t", np.asarray(c, np.int32))
    assert r2.reused_tokens == len(a) + len(b)
    _equals_recompute(chatml, a + b + c, r2)
    eng.close()


def test_bad_appends_are_refused_and_change_nothing(chatml):
    eng, store = _engine(chatml)
    eng.append("s", [U1, A1])
    eng.flush()
    held = store.lookup("s")
    for bad, match in [("some text", "not a string"), ([], "nothing to append"),
                       ([{"role": "robot", "content": "x"}], "role must be one of"),
                       ([U1, {"role": "assistant", "content": 3}], "content must be a string"),
                       (np.asarray([10 ** 7], np.int32), "appended tokens")]:
        with pytest.raises((InputError, ValueError), match=match):
            eng.append("s", bad)
    after = store.lookup("s")
    assert after.turn == held.turn and after.token_ids.tolist() == held.token_ids.tolist()
    no_store, _ = _engine(chatml, store=False)
    with pytest.raises(InputError, match="needs a store"):
        no_store.append("s", [U1, A1])
    eng.close()
