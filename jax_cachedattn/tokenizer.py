"""Byte-level BPE tokenizer built from a GGUF file's metadata, and SmolLM2's ChatML template.

A GGUF carries no ``tokenizer.json``: the vocabulary (``tokenizer.ggml.tokens``), the merges
(``tokenizer.ggml.merges``), the token types (3 = control, 4 = user-defined) and the special ids are
metadata. We rebuild the tokenizer with the ``tokenizers`` library. Only ``tokenizer.ggml.model ==
"gpt2"`` (byte-level BPE) is supported, which is what Llama-3 style and SmolLM files use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system message SmolLM2's chat template adds when a conversation does not start with one."""

_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer splits by llama.cpp's ``tokenizer.ggml.pre`` name. "smollm" (StarCoder lineage) splits
# every digit on its own before GPT-2's byte-level regex; names absent here get GPT-2's regex alone.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer(pre: str | None) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level


class Tokenizer:
    """Text <-> token ids for one model; ``chat``/``chat_turn`` implement SmolLM2's ChatML template."""

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None = None, *,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 pre: str | None = None, chat_template: str | None = None) -> None:
        alphabet = set(_bytes_to_unicode().values())
        spelling = _bytes_to_unicode()
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            # Tokens are stored in the byte alphabet; a few files store raw text, respell those.
            key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
            vocab.setdefault(key, i)
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        types = list(token_types) if token_types is not None else [1] * len(tokens)
        special = [AddedToken(t, normalized=False, special=True)
                   for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
        if special:
            tok.add_special_tokens(special)
        user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
        if user:
            tok.add_tokens(user)
        self._tok = tok
        self._tokens = list(tokens)
        self._fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": self._tokens,
                        "tokenizer.ggml.merges": list(merges), "tokenizer.ggml.token_type": types,
                        "tokenizer.ggml.bos_token_id": bos_id, "tokenizer.ggml.eos_token_id": eos_id,
                        "tokenizer.ggml.padding_token_id": pad_id, "tokenizer.ggml.pre": pre,
                        "tokenizer.chat_template": chat_template}
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        self.im_start_id = self.token_to_id("<|im_start|>")
        self.im_end_id = self.token_to_id("<|im_end|>")

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_gguf_fields(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build from decoded GGUF metadata (``{key: value}``, arrays as lists)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}: only 'gpt2' (byte-level BPE) is supported")
        for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if k not in meta:
                raise ValueError(f"GGUF metadata lacks {k!r}; cannot build the tokenizer")
        return cls(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.token_type"),
                   bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   pad_id=meta.get("tokenizer.ggml.padding_token_id"), pre=meta.get("tokenizer.ggml.pre"),
                   chat_template=meta.get("tokenizer.chat_template"))

    def to_fields(self) -> dict[str, Any]:
        """The GGUF metadata this tokenizer was built from (JSON-able); ``from_gguf_fields`` inverts it."""
        return {k: v for k, v in self._fields.items() if v is not None}

    @classmethod
    def from_gguf(cls, path: Any) -> "Tokenizer":
        """Read only the tokenizer from a GGUF file."""
        from jax_cachedattn.checkpoint.gguf import read_gguf_metadata
        return cls.from_gguf_fields(read_gguf_metadata(path))

    # ---- basics ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a reply: eos, ``<|im_end|>`` and ``<|endoftext|>`` where the vocabulary has them."""
        return {i for i in (self.eos_id, self.im_end_id, self.token_to_id("<|endoftext|>")) if i is not None}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) stay whole. No BOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat (ChatML, as SmolLM2's ``tokenizer.chat_template``) ---------------------------
    @staticmethod
    def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        """The template's text: a default system block first when the first message is not a system one."""
        out = []
        for i, m in enumerate(messages):
            if i == 0 and messages[0]["role"] != "system":
                out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    def chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a whole conversation rendered with the ChatML template."""
        return self.encode(self.render_chat(messages, add_generation_prompt))

    def chat_turn(self, user_text: str, first_turn: bool) -> list[int]:
        """The tokens one new user turn appends: ``[system block]<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n``.

        Concatenating turns, each assistant reply followed by ``assistant_end()``, equals ``chat()``
        of the whole conversation (special tokens bound every segment, so BPE never merges across).
        """
        return self.chat([{"role": "user", "content": user_text}]) if first_turn else \
            self.encode(f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n")

    def assistant_end(self) -> list[int]:
        """The tokens that close an assistant reply: ``<|im_end|>\\n``."""
        return self.encode("<|im_end|>\n")
