"""A checkpoint's tokenizer and chat template: text <-> token ids, conversations -> token ids.

From a Hugging Face folder: ``tokenizer.json`` through the ``tokenizers`` library, the special tokens and
the Jinja chat template from ``tokenizer_config.json`` (or ``chat_template.jinja``), the stop tokens from
``generation_config.json``. From a GGUF: the vocabulary (``tokenizer.ggml.tokens``), the merges, the
token types (3 = control, 4 = user-defined) and the special ids are metadata, rebuilt as a byte-level BPE
(``tokenizer.ggml.model == "gpt2"``, what Llama-3, Qwen2 and SmolLM files use); the template is
``tokenizer.chat_template``. Conversations are rendered by :mod:`jax_cachedattn.chat_template`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from jax_cachedattn.chat_template import ChatTemplate, ChatTemplateError, select_template

DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system message SmolLM2's chat template adds when a conversation does not start with one."""

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                      "chat_template.jinja")
"""The files of a Hugging Face folder that make up its tokenizer and chat template (``import-hf`` keeps them)."""

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# End-of-generation tokens llama.cpp recognises by their text when a GGUF names no eot id.
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")
_SENTINEL_USER, _SENTINEL_REPLY = "Hello", "Hi there"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable."""

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
    """Text <-> token ids for one model, and its chat template.

    ``Tokenizer(tok, special_tokens=..., chat_template=..., eos_ids=...)`` wraps a ``tokenizers.Tokenizer``;
    use :meth:`from_hf_folder`, :meth:`from_gguf` or :meth:`from_gguf_fields`.
    """

    def __init__(self, tok: _HFTokenizer, *, special_tokens: Mapping[str, Any] | None = None,
                 chat_template: str | None = None, eos_ids: Iterable[int] = (), fields: Mapping[str, Any] | None = None) -> None:
        self._tok = tok
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_template = chat_template
        self._template = ChatTemplate(chat_template, self.special_tokens) if chat_template else None
        self._fields = dict(fields) if fields is not None else None
        self.bos_id = self._id_of(self.special_tokens.get("bos_token"))
        self.eos_id = self._id_of(self.special_tokens.get("eos_token"))
        self.pad_id = self._id_of(self.special_tokens.get("pad_token"))
        self._eos_ids = {int(i) for i in eos_ids}
        self.im_start_id = self.token_to_id("<|im_start|>")
        self.im_end_id = self.token_to_id("<|im_end|>")

    def _id_of(self, token: Any) -> int | None:
        return None if token is None else self._tok.token_to_id(str(token))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, path: Any) -> "Tokenizer":
        """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``special_tokens_map.json``, ``generation_config.json``,
        ``chat_template.jinja``) of a Hugging Face folder."""
        folder = Path(path).expanduser()
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{folder} has no tokenizer.json (only fast tokenizers saved as tokenizer.json load)")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{tj} is not a readable tokenizer: {str(e).splitlines()[0] if str(e) else e!r}") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        special = {k: _token_text(v) for k, v in _read_json(folder / "special_tokens_map.json").items() if k in _SPECIAL_NAMES}
        special.update({k: _token_text(cfg[k]) for k in _SPECIAL_NAMES if cfg.get(k) is not None})
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text() if jinja.is_file() else select_template(cfg.get("chat_template"))
        gen = _read_json(folder / "generation_config.json").get("eos_token_id")
        eos = [gen] if isinstance(gen, int) else list(gen or [])
        return cls(tok, special_tokens=special, chat_template=template, eos_ids=eos)

    @classmethod
    def from_gguf_fields(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build from decoded GGUF metadata (``{key: value}``, arrays as lists)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer model {model!r}: only 'gpt2' (byte-level BPE) is supported")
        for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
            if k not in meta:
                raise ValueError(f"GGUF metadata lacks {k!r}; cannot build the tokenizer")
        tokens = list(meta["tokenizer.ggml.tokens"])
        tok = _bpe_from_gguf(tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.token_type"),
                             meta.get("tokenizer.ggml.pre"))

        def text(key: str) -> str | None:
            i = meta.get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        special = {"bos_token": text("tokenizer.ggml.bos_token_id"), "eos_token": text("tokenizer.ggml.eos_token_id"),
                   "pad_token": text("tokenizer.ggml.padding_token_id"), "unk_token": text("tokenizer.ggml.unknown_token_id")}
        eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                      "tokenizer.ggml.eom_token_id") if meta.get(k) is not None]
        eos += [i for i in map(tok.token_to_id, _EOG_TEXTS) if i is not None]
        keep = ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.pre", "tokenizer.chat_template")
        return cls(tok, special_tokens=special, chat_template=meta.get("tokenizer.chat_template"), eos_ids=eos,
                   fields={k: meta[k] for k in keep if meta.get(k) is not None})

    def to_fields(self) -> dict[str, Any]:
        """The GGUF metadata a GGUF-built tokenizer came from (JSON-able); ``from_gguf_fields`` inverts it."""
        if self._fields is None:
            raise TypeError("to_fields() is only defined for a tokenizer built from GGUF metadata")
        return dict(self._fields)

    @classmethod
    def from_gguf(cls, path: Any) -> "Tokenizer":
        """Read only the tokenizer from a GGUF file."""
        from jax_cachedattn.gguf_file import read_gguf_metadata
        return cls.from_gguf_fields(read_gguf_metadata(path))

    # ---- basics ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end a reply: the eos ids of ``generation_config.json`` (GGUF: eos/eot/eom and llama.cpp's
        end-of-generation texts), the tokenizer's eos, and the template's end-of-turn token."""
        ids = set(self._eos_ids) | ({self.eos_id} if self.eos_id is not None else set())
        eot = self.end_of_turn_id
        return ids | ({eot} if eot is not None else set())

    @functools.cached_property
    def end_of_turn_id(self) -> int | None:
        """The first token the template writes after an assistant reply, when it is a special token."""
        if self._template is None:
            return None
        end = self.assistant_end()
        return end[0] if end and end[0] in self._special_ids else None

    @functools.cached_property
    def _special_ids(self) -> set[int]:
        return {int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) stay whole. No BOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat (the checkpoint's own template) ----------------------------------------------
    def _need_template(self) -> ChatTemplate:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template (a base model?): pass token ids, not chat messages")
        return self._template

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The template's text for ``messages``, as ``apply_chat_template(..., tokenize=False)``."""
        return self._need_template().render(messages, add_generation_prompt, **kwargs)

    def chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a whole conversation, as ``apply_chat_template(..., tokenize=True)``."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))

    def chat_turn(self, user_text: str, first_turn: bool) -> list[int]:
        """The tokens one new user message appends to a conversation (generation prompt included).

        A later turn's tokens are ``render(H + [user]) - render(H)`` over a stand-in history ``H`` of one
        exchange: this holds for templates that render each turn on its own (ChatML, Llama 3, Mistral
        without a system prompt). Concatenating turns, each assistant reply followed by
        ``assistant_end()``, then equals ``chat()`` of the whole conversation. A template that re-renders
        earlier turns is refused here; render the whole conversation and use
        :func:`jax_cachedattn.chat_template.plan_turn` instead.
        """
        if first_turn:
            return self.chat([{"role": "user", "content": user_text}])
        history = [{"role": "user", "content": _SENTINEL_USER}, {"role": "assistant", "content": _SENTINEL_REPLY}]
        before = self.chat(history, add_generation_prompt=False)
        whole = self.chat(history + [{"role": "user", "content": user_text}])
        if whole[:len(before)] != before:
            raise ChatTemplateError("this chat template re-renders earlier turns, so a turn's tokens depend on the "
                                    "whole conversation: render it whole (Tokenizer.chat) and plan the turn with plan_turn")
        return whole[len(before):]

    def assistant_end(self) -> list[int]:
        """The tokens the template writes after an assistant reply (ChatML ``<|im_end|>\\n``, Llama 3 ``<|eot_id|>``)."""
        return list(self._assistant_end)

    @functools.cached_property
    def _assistant_end(self) -> tuple[int, ...]:
        text = self.render_chat([{"role": "user", "content": _SENTINEL_USER},
                                 {"role": "assistant", "content": _SENTINEL_REPLY}], add_generation_prompt=False)
        at = text.rfind(_SENTINEL_REPLY)
        if at < 0:
            raise ChatTemplateError("the chat template does not write the assistant's reply")
        return tuple(self.encode(text[at + len(_SENTINEL_REPLY):]))

    @property
    def turn_boundary_id(self) -> int | None:
        """The special token that opens a user turn (``<|im_start|>``, ``<|start_header_id|>``, ``[INST]``): where
        truncation may cut a history. None without a template or when the turn opens with plain text."""
        if self._template is None:
            return None
        try:
            first = self.chat_turn(_SENTINEL_USER, first_turn=False)
        except ChatTemplateError:
            return None
        return first[0] if first and first[0] in self._special_ids else None


def _token_text(v: Any) -> Any:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return v.get("content") if isinstance(v, dict) else v


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    return d


def _bpe_from_gguf(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None, pre: str | None) -> _HFTokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` from GGUF vocabulary, merges and token types."""
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
    return tok
