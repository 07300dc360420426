"""The GGUF-built tokenizer equals transformers' tokenizer from the same file; ChatML template and turns."""

from __future__ import annotations

import pytest

from jax_cachedattn.tokenizer import DEFAULT_SYSTEM_PROMPT, Tokenizer

TEXTS = [
    "Hello world",
    " 12345 abc 1,000,000.5 x2 3.14159",
    "héllo wörld — naïve café 日本語のテキスト 🤖👍🏽 \u00a0nbsp",
    "def f(x):\n    return x**2  # square\n\n\tif x != 0: pass\r\n",
    "I'm sure they'll've done it; don't   panic   ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "   leading and trailing spaces\n\n\n",
    "",
]

CONVO = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Japan? Answer in 3 words."},
    {"role": "assistant", "content": "Tokyo, of course."},
    {"role": "user", "content": "def f(x): return x  # ünïcode 🙂"},
]


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def theirs(smollm2_gguf):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_basic_properties(ours):
    assert ours.vocab_size == 49152
    assert ours.eos_id == ours.token_to_id("<|im_end|>") == 2
    assert {2, 0} <= ours.stop_ids
    assert ours.encode("<|im_start|>") == [1]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(ours, theirs, text):
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text


def _ids(x):
    return list(x["input_ids"]) if not isinstance(x, list) else x


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_transformers_template(ours, theirs, n, gen):
    msgs = CONVO[:n]
    want = _ids(theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))
    assert ours.chat(msgs, add_generation_prompt=gen) == want
    assert ours.render_chat(msgs, gen) == theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


def test_chat_with_system_message_has_no_default(ours, theirs):
    msgs = [{"role": "system", "content": "Be terse."}] + CONVO[:1]
    assert ours.chat(msgs) == _ids(theirs.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))
    assert DEFAULT_SYSTEM_PROMPT not in ours.decode(ours.chat(msgs))
    assert DEFAULT_SYSTEM_PROMPT in ours.decode(ours.chat(CONVO[:1]))


def test_chat_turns_concatenate_to_whole_conversation(ours):
    ids: list[int] = []
    for i, m in enumerate(CONVO):
        if m["role"] == "user":
            ids += ours.chat_turn(m["content"], first_turn=(i == 0))
            assert ids == ours.chat(CONVO[: i + 1], add_generation_prompt=True)
        else:
            ids += ours.encode(m["content"]) + ours.assistant_end()
            assert ids == ours.chat(CONVO[: i + 1], add_generation_prompt=False)


def test_fields_round_trip(ours):
    again = Tokenizer.from_gguf_fields(ours.to_fields())
    assert again.chat(CONVO) == ours.chat(CONVO) and again.stop_ids == ours.stop_ids


def test_rejects_non_bpe_tokenizer():
    with pytest.raises(ValueError, match="only 'gpt2'"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]})
