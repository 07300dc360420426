"""Chat templates (the Jinja ``chat_template`` that ships with a checkpoint) and multi-turn token stability.

``ChatTemplate.render`` renders a conversation the way transformers' ``apply_chat_template`` does: a
sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks`` and the loop-controls extension, the
globals ``raise_exception`` and ``strftime_now``, a ``tojson`` filter that keeps non-ASCII text, the
``{% generation %}`` block tag, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...)
as variables next to ``messages`` and ``add_generation_prompt``.

Multi-turn stability (the pure part of the engine's turn): a turn's tokens are the render of the whole
conversation; what may be served from the store is the longest common prefix of the stored token ids
and that render (:func:`plan_turn`). Templates that re-render earlier turns (a system prompt moved to the
last user turn, reasoning blocks dropped from earlier replies, a date that changed) shorten the prefix;
the rest is recomputed. KV is never served for a token that is not in the new render.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np


class ChatTemplateError(ValueError):
    """The template is missing, does not compile, or refuses the conversation (``raise_exception``)."""


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}…{% endgeneration %}``: marks assistant text for training masks; renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e.message} (line {e.lineno})") from e


def select_template(value: Any) -> str | None:
    """The default template from a ``tokenizer_config.json`` ``chat_template`` value (a string, or a list
    of ``{"name", "template"}`` as some checkpoints ship)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
        if "default" in named:
            return named["default"]
        raise ChatTemplateError(f"no 'default' among the chat templates {sorted(map(str, named))}")
    raise ChatTemplateError(f"chat_template must be a string or a list of named templates, got {type(value).__name__}")


class ChatTemplate:
    """One checkpoint's chat template with the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError("the chat template is empty")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = _compile(source)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation's text, as ``apply_chat_template(..., tokenize=False)`` gives it."""
        import jinja2

        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise ChatTemplateError(f"a chat message must be a mapping with a 'role', got {m!r}")
        try:
            return self._template.render(messages=[dict(m) for m in messages], tools=kwargs.pop("tools", None),
                                         documents=kwargs.pop("documents", None),
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from e


# ---- multi-turn token stability (pure; the engine calls these) -----------------------------------

def common_prefix_len(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token id sequences."""
    x, y = np.asarray(a, np.int64).reshape(-1), np.asarray(b, np.int64).reshape(-1)
    n = min(x.size, y.size)
    diff = np.flatnonzero(x[:n] != y[:n])
    return int(diff[0]) if diff.size else n


@dataclasses.dataclass(frozen=True)
class TurnPlan:
    """What a turn reuses and what it computes.

    ``ids``: the render of the whole conversation up to the generation prompt (what the model must see).
    ``reuse``: how many leading tokens of the stored history may be served from the store (they equal
    ``ids[:reuse]``, or ``ids[:p] + ids[p + skip : reuse + skip]`` when ``skip`` > 0). ``drop``: stored
    tokens past them, whose KV the store must discard. ``skip``: render tokens ``ids[p : p + skip]`` that an
    earlier truncation already dropped from the stored history (``p``: where the stored ids leave the
    render) and that stay out of the context. ``compute``: ``ids[reuse + skip:]``, the tokens to prefill.
    """

    ids: tuple[int, ...]
    reuse: int
    drop: int
    skip: int = 0

    @property
    def compute(self) -> tuple[int, ...]:
        return self.ids[self.reuse + self.skip:]


_PROBE = 8  # stored tokens that must match to align a truncated history with the render


def _realign(stored: np.ndarray, ids: np.ndarray, p: int) -> tuple[int, int]:
    """``(skip, m)``: the longest run ``stored[p : p + m] == ids[p + skip : p + skip + m]`` with ``skip > 0``,
    ``m >= min(_PROBE, len(stored) - p)`` and at least one render token left to compute; ``(0, 0)`` if none."""
    rest = stored[p:]
    k = min(_PROBE, rest.size)
    hay = ids[p + 1 : ids.size - 1]  # q >= p + 1; one token always stays to compute
    if k == 0 or hay.size < k:
        return 0, 0
    windows = np.lib.stride_tricks.sliding_window_view(hay, k)
    best = (0, 0)
    for off in np.flatnonzero((windows == rest[:k]).all(axis=1))[:64]:
        q = p + 1 + int(off)
        m = min(common_prefix_len(rest, ids[q:]), ids.size - 1 - q)
        if m > best[1]:
            best = (q - p, m)
    return best if best[1] >= k else (0, 0)


def plan_turn(stored_ids: Sequence[int] | np.ndarray, whole_ids: Sequence[int], budget: int | None = None) -> TurnPlan:
    """Longest-common-prefix reuse of ``stored_ids`` (the session's history in the store) for a turn whose
    whole conversation renders to ``whole_ids``. At least one token is always computed (the model needs
    the last position's logits), so ``reuse + skip <= len(whole_ids) - 1``.

    ``budget``: the tokens the context window leaves for the conversation (window minus the reply budget).
    When the render does not fit it and the stored history leaves the render before its end, the history
    may be one that an earlier turn truncated (the sink kept, the oldest turns after it dropped): its tail
    is searched for further on in the render and, found, reused, with the render tokens between left out of
    the context as that truncation left them (``skip``). A render that fits is never shortened: the prefix
    is reused and the rest recomputed."""
    ids = tuple(int(i) for i in whole_ids)
    if not ids:
        raise ChatTemplateError("the conversation rendered to no tokens")
    stored = np.asarray(stored_ids, np.int64).reshape(-1)
    n = min(common_prefix_len(stored, ids), len(ids) - 1)
    skip = 0
    if budget is not None and len(ids) > budget and n < stored.size:
        skip, m = _realign(stored, np.asarray(ids, np.int64), n)
        n += m
    return TurnPlan(ids=ids, reuse=n, drop=int(stored.size) - n, skip=skip)


ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """A conversation as OpenAI-style ``[{"role", "content"}, ...]`` ending with a message for the model to
    answer (not an assistant's). Raises ChatTemplateError with one line naming the first problem."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ChatTemplateError("the conversation must be a non-empty list of {\"role\", \"content\"} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}, not a {{\"role\", \"content\"}} object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatTemplateError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatTemplateError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        out.append(dict(m))
    if out[-1]["role"] == "assistant":
        raise ChatTemplateError("the last message is the assistant's: end the conversation with the message to answer")
    if not out[-1]["content"].strip():
        raise ChatTemplateError(f"the last message ({out[-1]['role']}) is empty")
    return out


def render_turn(tokenizer: Any, history: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]],
                stored_ids: Sequence[int] | np.ndarray | None = None, **kwargs: Any) -> TurnPlan:
    """The plan of one turn: ``render(history + new)`` with the generation prompt, against the stored ids
    (default: ``render(history)``, i.e. the turn's new tokens are ``render(whole) - render(history)``)."""
    whole = tokenizer.chat(list(history) + list(new), add_generation_prompt=True, **kwargs)
    if stored_ids is None:
        stored_ids = tokenizer.chat(list(history), add_generation_prompt=False, **kwargs) if history else []
    return plan_turn(stored_ids, whole)
