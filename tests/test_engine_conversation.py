"""A whole conversation as messages (OpenAI style): the engine renders it with the model's chat template,
reuses the longest common prefix with the session's stored tokens, drops the stored tail past it and
prefills the rest. Tiny random Hugging Face models with small tokenizers trained here (tests/byom_fixtures)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from byom_fixtures import load_byom
from jax_cachedattn import cli
from jax_cachedattn.chat_template import plan_turn
from jax_cachedattn.engine import Engine, EngineConfig, InputError
from jax_cachedattn.model import forward
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

TOL = 1e-4
SYS = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
U1 = {"role": "user", "content": "What is the capital of France?"}
U2 = {"role": "user", "content": "Tell me a joke about cats."}
U3 = {"role": "user", "content": "Hello there! How are you today?"}


@pytest.fixture(autouse=True)
def _no_xla_cache(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_NO_XLA_CACHE", "1")


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):  # the system prompt goes into the LAST user turn: earlier turns re-render
    return load_byom(tmp_path_factory.mktemp("mistral"), "mistral", "mistral", 5)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):  # every turn renders on its own: a stable template
    return load_byom(tmp_path_factory.mktemp("chatml"), "qwen2", "chatml", 11)


def _engine(m, max_new=5, max_context=None, **kw):
    _, cfg, params, tok = m
    cfg = cfg if max_context is None else cfg.replace(max_context=max_context)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "conv-test")
    store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=1 << 24, device_bytes=0, token_block=16), lay)
    return Engine(cfg, params, store, tok, EngineConfig(max_new_tokens=max_new, return_logits=True, **kw)), store


def _equals_recompute(m, messages, res):
    """The turn's prompt logits, decode logits and greedy tokens equal a full forward of the new render."""
    _, cfg, params, tok = m
    ids = np.asarray(tok.chat(messages, add_generation_prompt=True), np.int32)
    gen = list(res.reply_tokens)
    stopped = res.generated_tokens > len(gen)
    ref = np.asarray(forward(params, cfg, np.concatenate([ids, np.asarray(gen, np.int32)])))
    n = res.prompt_tokens
    assert res.history_tokens + n == len(ids)
    np.testing.assert_allclose(res.prompt_logits, ref[len(ids) - n : len(ids)], atol=TOL, rtol=0)
    assert len(res.decode_logits) == res.generated_tokens
    for i, lg in enumerate(res.decode_logits):
        row = ref[len(ids) - 1 + i]
        np.testing.assert_allclose(np.asarray(lg).reshape(-1), row, atol=TOL, rtol=0)
        want = int(np.argmax(row))
        assert (want == gen[i]) if i < len(gen) else (stopped and want in tok.stop_ids)
    return ids


@pytest.mark.parametrize("device", [False, True])
def test_rerendered_earlier_turns_reuse_the_common_prefix_and_equal_a_recompute(mistral, device):
    eng, store = _engine(mistral)
    tok = mistral[3]
    r1 = eng.turn("c", [SYS, U1])
    assert r1.source == "new" and r1.reused_tokens == r1.dropped_tokens == 0
    _equals_recompute(mistral, [SYS, U1], r1)
    stored = store.lookup("c").token_ids
    # The next render moves the system prompt to the new last user turn: only "<s>[INST]" is shared.
    msgs = [SYS, U1, {"role": "assistant", "content": r1.reply}, U2]
    whole = tok.chat(msgs)
    k = plan_turn(stored, whole).reuse
    if not device:
        eng.evict("c", "device")  # the pages leave the pool: the kept prefix is loaded from host memory
    assert k == 2 and tok.decode(whole[:k]) == "<s>[INST]"
    r2 = eng.turn("c", msgs)
    assert (r2.reused_tokens, r2.history_tokens, r2.dropped_tokens) == (k, k, len(stored) - k)
    assert r2.source == ("device" if device else "host")
    ids = _equals_recompute(mistral, msgs, r2)
    eng.flush()
    info = store.lookup("c")  # the store holds the new render and the reply, nothing of the stale tail
    assert info.token_ids[: len(ids)].tolist() == ids.tolist()
    assert info.num_tokens == len(ids) + r2.generated_tokens + (0 if r2.generated_tokens > len(r2.reply_tokens) else 1)
    # Serving the stale KV would have been wrong: its logits are not the recompute's.
    stale = np.asarray(forward(mistral[2], mistral[1], np.concatenate([stored, ids[k:]])))[-1]
    assert float(np.abs(stale - np.asarray(r2.decode_logits[0]).reshape(-1)).max()) > 1e-3
    eng.close()


@pytest.mark.slow  # make test-all
def test_identical_rerender_reuses_everything(chatml):
    eng, store = _engine(chatml, max_new=4)
    tok = chatml[3]
    a1 = {"role": "assistant", "content": "The capital of France is Paris."}
    r1 = eng.turn("c", [U1, a1, U2])  # a new session given a whole history
    assert r1.source == "new" and r1.reused_tokens == 0
    eng.flush()
    stored = store.lookup("c").token_ids
    # The same conversation again (a regenerate): the whole render is the stored prefix; the last token
    # is computed again (its logits start the reply), the old reply is dropped; same greedy reply.
    r2 = eng.turn("c", [U1, a1, U2])
    n = len(tok.chat([U1, a1, U2]))
    assert (r2.reused_tokens, r2.prompt_tokens, r2.dropped_tokens) == (n - 1, 1, len(stored) - (n - 1))
    assert r2.reply_tokens == r1.reply_tokens
    _equals_recompute(chatml, [U1, a1, U2], r2)
    # The conversation goes on with the reply as the client got it (text): a stable template re-renders
    # every stored token, so all of them are reused and nothing is dropped.
    eng.flush()
    stored = store.lookup("c").token_ids
    msgs = [U1, a1, U2, {"role": "assistant", "content": r2.reply}, U3]
    assert tok.encode(r2.reply) == r2.reply_tokens  # the reply's text re-encodes to its tokens (this seed)
    r3 = eng.turn("c", msgs)
    assert (r3.reused_tokens, r3.dropped_tokens) == (len(stored), 0) and r3.source == "device"
    _equals_recompute(chatml, msgs, r3)
    # A str message keeps the incremental behaviour, on the same session.
    r4 = eng.turn("c", "And in Spain?")
    closed = 1 if r3.generated_tokens > len(r3.reply_tokens) else 2  # <|im_end|> replaces the stop, "\n" follows
    assert r4.dropped_tokens == 0 and r4.reused_tokens == r3.history_tokens + r3.prompt_tokens + r3.generated_tokens + closed
    eng.close()


@pytest.mark.slow  # make test-all
def test_a_truncated_session_continues_from_the_realigned_render(chatml):
    """The client re-sends the whole (growing) conversation; once it outgrows the window the engine truncates
    (the sink kept), and the next render, which does not fit either, is realigned with the stored tail: those
    rows are served, the turns the truncation dropped stay out, and the prefill is exact over the served KV."""
    import jax.numpy as jnp

    from jax_cachedattn.model import prefill

    _, cfg0, params, tok = chatml
    eng, store = _engine(chatml, max_new=4, max_context=150)
    cfg = eng.model_config
    texts = ["The capital of France is Paris.", "Why did the cat sit on the computer? To keep an eye on the mouse!",
             "I am fine, thank you.", "Sure, here it is.", "The quick brown fox jumps over the lazy dog."]
    users = [U1, U2, U3, {"role": "user", "content": "def f(x): what does it return?"},
             {"role": "user", "content": "Answer briefly and politely."}, {"role": "user", "content": "And in Spain?"}]
    msgs, truncated, realigned = [], False, 0
    for i, u in enumerate(users):
        msgs = msgs + [u]
        info = store.lookup("c")
        whole = tok.chat(msgs)
        res_kv = None if info is None else [np.asarray(store.load_layer("c", l)) for l in range(cfg.num_layers)]
        r = eng.turn("c", msgs)
        assert r.history_tokens + r.prompt_tokens + 4 + 2 <= cfg.max_context
        if truncated and len(whole) + 6 > cfg.max_context:  # a render that does not fit, after a truncation
            assert r.history_tokens + r.prompt_tokens < len(whole)  # the truncated turns stay out ...
            assert r.reused_tokens > eng.config.truncation_sink + 16  # ... and the kept tail is served
            assert r.prompt_tokens <= len(whole) - len(tok.chat(msgs[:-2]))  # the last reply (as the client wrote it) and the new turn
            realigned += 1
            if not r.truncated_tokens:  # exact over the served rows: a prefill of the rest against them
                cache = jnp.asarray(np.stack(res_kv)[:, :, : r.reused_tokens])
                ref, _ = prefill(params, cfg, jnp.asarray(whole[-r.prompt_tokens:], jnp.int32), cache,
                                 jnp.int32(r.reused_tokens))
                np.testing.assert_allclose(r.prompt_logits, np.asarray(ref), atol=TOL, rtol=0)
                assert list(store.lookup("c").token_ids[r.reused_tokens : r.reused_tokens + r.prompt_tokens]) == \
                    whole[-r.prompt_tokens:]
        truncated = truncated or r.truncated_tokens > 0
        eng.flush()
        msgs = msgs + [{"role": "assistant", "content": texts[i % len(texts)]}]
    assert truncated and realigned >= 1
    eng.close()


@pytest.mark.parametrize("bad,match", [
    ([{"role": "user"}], "content must be a string"),
    ([{"role": "wizard", "content": "x"}], "role must be one of"),
    ([U1, 5], "message 1 is a int"),
    ([U1, {"role": "assistant", "content": "hi"}], "the last message is the assistant's"),
    ([U1, {"role": "user", "content": "   "}], "is empty"),
    ([U1, U1], "roles must alternate"),  # the template's own raise_exception (Mistral)
])
def test_bad_message_lists_are_one_line_input_errors(mistral, bad, match):
    eng, store = _engine(mistral)
    with pytest.raises(InputError, match=match) as e:
        eng.turn("c", bad)
    assert "\n" not in str(e.value)
    assert store.lookup("c") is None  # nothing was started
    eng.close()


def test_cli_messages_json_fields_and_exit_2(tmp_path, capsys, chatml):
    folder = str(chatml[0])
    base = ["run", "--model", folder, "--store", str(tmp_path / "s"), "--session", "a", "--max-new-tokens", "3", "--json"]
    for text, match in (("{not json", "not JSON"), ('[{"role": "user", "content": 3}]', "content must be a string"),
                        ("[]", "non-empty list")):
        (tmp_path / "bad.json").write_text(text)
        assert cli.main(base + ["--messages", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert cli.main(base) == 2 and "either --prompt" in capsys.readouterr().err
    assert cli.main(base + ["--prompt", "hi", "--messages", "x"]) == 2
    capsys.readouterr()
    (tmp_path / "m.json").write_text(json.dumps([U1]))
    assert cli.main(base + ["--messages", str(tmp_path / "m.json")]) == 0
    r1 = json.loads(capsys.readouterr().out)
    assert r1["reused_tokens"] == 0 and r1["dropped_tokens"] == 0
    (tmp_path / "m.json").write_text(json.dumps([U1, {"role": "assistant", "content": r1["reply"]}, U2]))
    assert cli.main(base + ["--messages", str(tmp_path / "m.json")]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["reused_tokens"] >= r1["prompt_tokens"] and r2["source"] == "disk"
    assert r2["history_tokens"] == r2["reused_tokens"] and isinstance(r2["dropped_tokens"], int)
