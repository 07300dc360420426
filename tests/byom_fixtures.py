"""Builders for bring-your-own-model tests: tiny random Llama/Qwen2/Mistral checkpoints saved with
``save_pretrained``, and small tokenizers trained here by ``tokenizers`` with real chat templates
(Llama 3, ChatML as Qwen2 ships it, Mistral ``[INST]``). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CHATML_TEMPLATE = (  # Qwen2-*-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # Mistral-7B-Instruct-v0.3's: the system prompt goes into the *last* user turn (earlier turns re-render)

THINK_TEMPLATE = (  # ChatML that drops reasoning from replies before the last user turn, as Qwen3's does
    "{%- set ns = namespace(last_user=0) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = m['content'] %}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")

KINDS = {
    # kind: (template, bos, eos, other special tokens, generation_config eos ids by token, metaspace)
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], ["<|end_of_text|>", "<|eot_id|>"], False),
    "chatml": (CHATML_TEMPLATE, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>"], ["<|im_end|>", "<|endoftext|>"], False),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", ["<unk>", "[INST]", "[/INST]"], ["</s>"], True),
    "think": (THINK_TEMPLATE, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>"], ["<|im_end|>"], False),
}

CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Why did the cat sit on the computer? To keep an eye on the mouse!",
    "You are a helpful assistant. Answer briefly and politely.",
    "def f(x):\n    return x * 2  # doubles the input\n",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "Multi-turn conversations re-send the whole history; caching the keys and values saves work.",
    "<think>The user wants a short answer.</think>Sure, here it is.",
    "Hello there! How are you today? I am fine, thank you.",
] * 4


def write_tokenizer(folder: Path, kind: str, vocab_size: int = 320) -> int:
    """Train a small BPE tokenizer and write tokenizer.json, tokenizer_config.json, generation_config.json.
    Returns the vocabulary size (the tiny model's ``vocab_size``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template, bos, eos, extra, gen_eos, metaspace = KINDS[kind]
    specials = [t for t in [bos, eos] + extra if t is not None]
    if metaspace:  # SentencePiece-style, as Llama 2 / Mistral tokenizer.json files are
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    else:  # byte-level, as Llama 3 / Qwen2 are
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "chat_template": template,
           "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    if bos is not None:
        cfg["bos_token"] = bos
    if metaspace:
        cfg["unk_token"] = "<unk>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(t) for t in gen_eos]}))
    return tok.get_vocab_size()


FAMILIES = ("llama3", "llama-linear", "qwen2", "mistral")
ATTN = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def save_tiny_model(folder: Path, family: str, attn: str = "gqa", *, vocab_size: int = 320, seed: int = 0,
                    tied: bool | None = None, max_pos: int = 1024, original_ctx: int = 128, std: float = 0.1):
    """A tiny random model of ``family`` saved with ``save_pretrained`` (fp32), norms and biases randomised
    so scaling and bias bugs show. Returns the torch model (eval mode)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    heads, kv = ATTN[attn]
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=64 // heads,
                  max_position_embeddings=max_pos, rms_norm_eps=1e-5, initializer_range=std)
    if family == "llama3":  # Llama 3.1-style scaling, original context far below the positions tested
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=bool(tied), rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=original_ctx))
        cls = transformers.LlamaForCausalLM
    elif family == "llama-linear":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=bool(tied),
                                       rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))
        cls = transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True if tied is None else tied,
                                       rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
                                       use_sliding_window=False)
        cls = transformers.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=bool(tied), sliding_window=None,
                                         rope_parameters=dict(rope_type="default", rope_theta=1000000.0))
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, mean=1.0, std=0.5)
            elif name.endswith("bias"):
                torch.nn.init.normal_(p, mean=0.0, std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def byom_folder(folder: Path, family: str, kind: str, attn: str = "gqa", seed: int = 0):
    """A complete Hugging Face folder: tiny model + trained tokenizer + chat template."""
    vocab = write_tokenizer(folder, kind)
    return save_tiny_model(folder, family, attn, vocab_size=vocab, seed=seed)


def load_byom(folder: Path, family: str, kind: str, seed: int):
    """``byom_folder`` written and loaded back: ``(folder, config, params, tokenizer)``."""
    from jax_cachedattn.checkpoint import load_hf
    from jax_cachedattn.tokenizer import Tokenizer

    byom_folder(folder, family, kind, seed=seed)
    cfg, params = load_hf(folder)
    return folder, cfg, params, Tokenizer.from_hf_folder(folder)
