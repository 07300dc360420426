"""Chat templates from the checkpoint, rendered with jinja2: our ids equal transformers' apply_chat_template
for Llama 3, ChatML (Qwen2) and Mistral [INST] templates (tokenizers trained here); multi-turn token
stability by longest-common-prefix reuse, down to logits equal to a recompute."""

from __future__ import annotations

import numpy as np
import pytest

from byom_fixtures import KINDS, byom_folder, write_tokenizer
from jax_cachedattn.chat_template import ChatTemplateError, common_prefix_len, plan_turn, render_turn
from jax_cachedattn.tokenizer import Tokenizer

CONVO = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "Why did the cat sit on the computer? To keep an eye on the mouse!"},
    {"role": "user", "content": "def f(x):\n    return x * 2  "},
]
SYSTEM = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]


@pytest.fixture(scope="module", params=["llama3", "chatml", "mistral"])
def pair(request, tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp(request.param)
    write_tokenizer(folder, request.param)
    return request.param, Tokenizer.from_hf_folder(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _ids(x):
    return list(x["input_ids"]) if not isinstance(x, list) else list(x)


@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("gen", [True, False])
def test_ids_equal_transformers(pair, system, n, gen):
    kind, ours, theirs = pair
    msgs = (SYSTEM if system else []) + CONVO[:n]
    assert ours.render_chat(msgs, gen) == theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    want = _ids(theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
    assert ours.chat(msgs, add_generation_prompt=gen) == want
    assert len(want) >= 5 * n  # the tokenizer really splits text, not one token per message


def test_turns_concatenate_to_whole_conversation(pair):
    kind, ours, _ = pair
    ids: list[int] = []
    for i, m in enumerate(CONVO):
        if m["role"] == "user":
            ids += ours.chat_turn(m["content"], first_turn=(i == 0))
            assert ids == ours.chat(CONVO[: i + 1], add_generation_prompt=True)
        else:
            # The reply as the model would produce it: its tokens in the context of the whole render.
            whole = ours.chat(CONVO[: i + 1], add_generation_prompt=False)
            reply = whole[len(ids):len(whole) - len(ours.assistant_end())]
            assert ours.decode(reply, skip_special_tokens=True).strip() == m["content"]
            ids += reply + ours.assistant_end()
            assert ids == whole


def test_stop_ids_and_turn_end(pair):
    kind, ours, theirs = pair
    _, bos, eos, extra, gen_eos, _ = KINDS[kind]
    end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": "</s>"}[kind]
    assert ours.decode(ours.assistant_end()).startswith(end)
    assert ours.end_of_turn_id == ours.token_to_id(end)
    assert {ours.token_to_id(t) for t in gen_eos} | {ours.token_to_id(end)} <= ours.stop_ids
    assert ours.eos_id == theirs.eos_token_id and ours.bos_id == theirs.bos_token_id
    opener = {"llama3": "<|start_header_id|>", "chatml": "<|im_start|>", "mistral": "[INST]"}[kind]
    assert ours.turn_boundary_id == ours.token_to_id(opener)


def test_template_errors_are_one_line_value_errors(tmp_path):
    write_tokenizer(tmp_path, "mistral")
    tok = Tokenizer.from_hf_folder(tmp_path)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # sandboxed: no escape
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_hf_folder(tmp_path).chat([{"role": "user", "content": "x"}])


def test_no_template_is_a_clear_error(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    import json
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.encode("hello") and tok.turn_boundary_id is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.chat_turn("hi", first_turn=True)


# ---- longest-common-prefix reuse ------------------------------------------------------------

def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_len([1, 2, 3], [1, 9, 3]) == 1
    assert common_prefix_len([], [1]) == 0 and common_prefix_len([5], [6]) == 0
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 3, rng.integers(0, 12)).tolist()
        b = rng.integers(0, 3, rng.integers(0, 12)).tolist()
        n = common_prefix_len(a, b)
        assert a[:n] == b[:n] and (n == min(len(a), len(b)) or a[n] != b[n])


def test_plan_always_computes_one_token():
    p = plan_turn([1, 2, 3, 4], [1, 2, 3, 4])
    assert (p.reuse, p.drop, p.compute) == (3, 1, (4,))
    with pytest.raises(ChatTemplateError):
        plan_turn([1], [])


def test_stable_template_reuses_all_history(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    tok = Tokenizer.from_hf_folder(tmp_path)
    plan = render_turn(tok, CONVO[:4], CONVO[4:])
    assert plan.reuse == len(tok.chat(CONVO[:4], add_generation_prompt=False)) and plan.drop == 0
    assert list(plan.compute) == tok.chat_turn(CONVO[4]["content"], first_turn=False)


def test_system_prompt_moved_by_mistral_template_is_recomputed(tmp_path):
    write_tokenizer(tmp_path, "mistral")
    tok = Tokenizer.from_hf_folder(tmp_path)
    history, new = SYSTEM + CONVO[:2], CONVO[2:3]
    # What turn 1 served: the system prompt inside the (then last) first user turn, the reply, its end.
    stored = tok.chat(SYSTEM + CONVO[:1]) + tok.encode(" " + CONVO[1]["content"]) + tok.assistant_end()
    assert tok.decode(stored) == tok.render_chat(SYSTEM + CONVO[:1], False) + " " + CONVO[1]["content"] + "</s>"
    plan = render_turn(tok, history, new, stored_ids=stored)
    assert plan.ids == tuple(tok.chat(history + new))
    # The system prompt moved to the new last user turn: only "<s>[INST]" survives.
    assert plan.reuse == 2 and plan.drop == len(stored) - 2 and stored[:2] == list(plan.ids[:2])
    assert tok.decode(plan.ids[:plan.reuse]) == "<s>[INST]"


def _think_case(tok):
    history = [{"role": "user", "content": "Tell me a joke about cats."},
               {"role": "assistant", "content": "<think>The user wants a short answer.</think>Sure, here it is."}]
    stored = tok.chat(history, add_generation_prompt=False)  # the reply as it was served: reasoning kept
    new = [{"role": "user", "content": "What is the capital of France?"}]
    return history, stored, new


def test_dropped_reasoning_is_recomputed_and_reply_equals_recompute(tmp_path):
    """A template that drops earlier reasoning: the prefix ends where the old reply began; prefilling only
    the rest over the reused KV gives the logits of a full recompute of the new render."""
    import jax.numpy as jnp

    from jax_cachedattn.checkpoint import load_hf
    from jax_cachedattn.model import forward, prefill

    byom_folder(tmp_path, "qwen2", "think", attn="gqa", seed=3)
    tok = Tokenizer.from_hf_folder(tmp_path)
    history, stored, new = _think_case(tok)
    plan = render_turn(tok, history, new, stored_ids=stored)
    reply_start = len(tok.chat(history[:1], add_generation_prompt=True))
    assert plan.reuse == reply_start and plan.drop == len(stored) - reply_start > 5
    assert "<think>" not in tok.decode(plan.compute)
    cfg, params = load_hf(tmp_path)
    ids = np.asarray(plan.ids, np.int32)
    K, Dh, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    # KV of the stored history (as the store holds it), then drop past the common prefix.
    _, kv = prefill(params, cfg, jnp.asarray(stored, jnp.int32), jnp.zeros((L, 2, 0, K, Dh)), jnp.int32(0))
    S = 128
    cache = jnp.zeros((L, 2, S, K, Dh)).at[:, :, :plan.reuse].set(kv[:, :, :plan.reuse])
    got, _ = prefill(params, cfg, jnp.asarray(plan.compute, jnp.int32), cache, jnp.int32(plan.reuse))
    ref = np.asarray(forward(params, cfg, ids))[plan.reuse:]
    assert float(np.abs(np.asarray(got) - ref).max()) <= 1e-4
    assert int(np.argmax(np.asarray(got)[-1])) == int(np.argmax(ref[-1]))
    # Serving the stale KV instead (what an engine without the common-prefix check would do) is wrong.
    stale = jnp.zeros((L, 2, S, K, Dh)).at[:, :, :len(stored)].set(kv)
    naive = tok.chat_turn(new[0]["content"], first_turn=False)
    assert list(ids[-len(naive):]) == naive
    wrong, _ = prefill(params, cfg, jnp.asarray(naive, jnp.int32), stale, jnp.int32(len(stored)))
    assert float(np.abs(np.asarray(wrong)[-1] - ref[-1]).max()) > 1e-3


def test_plan_realigns_a_truncated_history_only_when_the_render_does_not_fit():
    whole = list(range(100, 220))  # 120 distinct tokens
    stored = whole[:4] + whole[50:90]  # an earlier truncation kept the sink and a tail
    p = plan_turn(stored, whole)  # no budget: the render is never shortened
    assert (p.reuse, p.skip, p.drop) == (4, 0, 40) and p.compute == tuple(whole[4:])
    p = plan_turn(stored, whole, budget=120)  # it fits: recomputed whole
    assert (p.reuse, p.skip) == (4, 0)
    p = plan_turn(stored, whole, budget=100)  # it does not: the stored tail is found and continued
    assert (p.reuse, p.skip, p.drop) == (44, 46, 0) and p.compute == tuple(whole[90:])
    p = plan_turn(stored + [7, 7, 7], whole, budget=100)  # a stale tail past the match is dropped
    assert (p.reuse, p.skip, p.drop) == (44, 46, 3)
    edited = whole[:60] + [1] + whole[61:]  # an edited message inside the kept tail: reuse stops there
    p = plan_turn(stored, edited, budget=100)
    assert (p.reuse, p.skip, p.drop) == (14, 46, 30) and p.compute == tuple(edited[60:])
    p = plan_turn(whole[:4] + [5, 6, 7], whole, budget=100)  # a tail found nowhere: plain prefix
    assert (p.reuse, p.skip, p.drop) == (4, 0, 3)
    p = plan_turn(stored, whole[:92], budget=50)  # at least one token is always computed
    assert p.reuse + p.skip <= 91 and p.compute
