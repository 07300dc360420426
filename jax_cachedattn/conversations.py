"""Reading files of multi-turn conversations, record by record.

Two formats, told apart by each record's keys (so the file's format is detected from its content):

- ShareGPT: ``{"id": ..., "conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}]}``,
  as a JSON array (the published ``ShareGPT_V3_*.json`` files) or as JSON Lines. Roles ``human``/``user``
  are the user, ``gpt``/``assistant``/``chatgpt``/``bard``/``bing`` the assistant, ``system`` the system.
  Long ShareGPT conversations were split into parts ``ID_0, ID_1, ...``; consecutive records whose ids
  are ``B_k`` then ``B_{k+1}`` are merged into one conversation with id ``B`` (``merge_parts=False``
  turns this off, e.g. for files whose distinct conversations are named ``conv_0, conv_1, ...``).
- OpenAI-style chat JSON Lines: ``{"id": ..., "messages": [{"role": "system"|"developer"|"user"|
  "assistant", "content": str | [{"type": "text", "text": ...}, ...]}]}``. A record without ``id``
  is named ``line-N`` after the line it starts on.

Turns whose text is empty (or whitespace only) are skipped; every other turn is kept as given, in
order: a conversation may start with an assistant turn (it is history, not a reply) and may hold two
user turns in a row. A record that cannot be read (bad JSON, wrong shape, an unknown role, no user
turn, a repeated id) is yielded as a :class:`BadRecord` with the line it starts on, and reading goes
on with the next record. Records are read one at a time, so a file cut short keeps every whole record
before the cut (the torn one is a BadRecord). Usage::

    for item in read_conversations("chats.jsonl"):
        if isinstance(item, BadRecord):
            print(f"line {item.line}: {item.reason}")
            continue
        for m in item.messages:            # Message(role, content), role in ROLES
            ...
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROLES = ("system", "user", "assistant")

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                   "system": "system"}
_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_PART = re.compile(r"^(.*)_(\d+)$")
_ARRAY_READ = 1 << 20          # bytes read at a time from a JSON array
_ARRAY_MAX_RECORD = 64 << 20   # a record of a JSON array larger than this is reported as malformed


@dataclass(frozen=True)
class Message:
    role: str      # one of ROLES
    content: str   # the turn's text, never empty


@dataclass(frozen=True)
class Conversation:
    id: str                          # the input's id (the merged base id for ShareGPT parts)
    messages: tuple[Message, ...]    # in file order, empty turns removed; at least one user turn
    line: int                        # 1-based line where the (first) record starts
    format: str                      # "sharegpt" or "openai"

    @property
    def user_turns(self) -> int:
        """How many user turns (jobs of a batch run) the conversation has."""
        return sum(m.role == "user" for m in self.messages)


@dataclass(frozen=True)
class BadRecord:
    line: int      # 1-based line where the record starts
    reason: str    # one line, says what is wrong


class _Bad(ValueError):
    pass


def read_conversations(path: str | Path, *, merge_parts: bool = True
                       ) -> Iterator[Conversation | BadRecord]:
    """Yield the file's conversations in order, and a BadRecord for each record that cannot be read.

    The format (ShareGPT JSON array, ShareGPT JSONL, OpenAI-style chat JSONL) is detected from the
    content. Raises OSError if the file cannot be opened; everything inside it is reported per record.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    records = _array_records(path) if head.startswith(b"[") else _jsonl_records(path)
    yield from _conversations(records, merge_parts)


def _jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON or _Bad) for each non-blank line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                yield n, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield n, _Bad(f"not UTF-8 ({e.reason} at byte {e.start})")
            except json.JSONDecodeError as e:
                yield n, _Bad(_json_error(e, raw.endswith(b"\n")))


def _array_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line, parsed JSON or _Bad) for each element of a top-level JSON array, read incrementally.

    Bad JSON inside the array ends the reading (the next element's start cannot be found reliably):
    one _Bad at the element's line, then nothing more.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        buf, pos, line, eof = "", 0, 1, False

        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(_ARRAY_READ)
            buf, pos = buf[pos:] + chunk, 0
            eof = not chunk
            return bool(chunk)

        def skip(chars: str) -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    line += buf[pos] == "\n"
                    pos += 1
                if pos < len(buf) or not more():
                    return

        skip(" \t\r\n")
        if pos < len(buf) and buf[pos] == "[":   # always true: the caller saw "["
            pos += 1
        first = True
        while True:
            skip(" \t\r\n")
            if pos >= len(buf):
                yield line, _Bad("file ends inside the JSON array (no closing ']')")
                return
            if buf[pos] == "]":
                return
            if not first:
                if buf[pos] != ",":
                    yield line, _Bad(f"expected ',' or ']' between records, found {buf[pos]!r}")
                    return
                pos += 1
                skip(" \t\r\n")
            first = False
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > _ARRAY_MAX_RECORD:
                        cut = eof and (e.pos >= len(buf.rstrip()) - 1 or e.msg.startswith("Unterminated"))
                        yield line + buf.count("\n", pos, e.pos) * (not cut), _Bad(_json_error(e, not cut))
                        return
                    more()
            start_line = line
            line += buf.count("\n", pos, end)
            pos = end
            yield start_line, value


def _json_error(e: json.JSONDecodeError, complete: bool) -> str:
    """`complete` is False when the file ends inside the record (a last line without newline)."""
    if not complete:
        return f"record cut short, the file ends inside it ({e.msg})"
    return f"bad JSON: {e.msg} (column {e.colno})"


def _conversations(records: Iterator[tuple[int, object]], merge_parts: bool
                   ) -> Iterator[Conversation | BadRecord]:
    seen: dict[str, int] = {}
    held: tuple[str, int, Conversation] | None = None     # (base id, part number, merged so far)

    def release(item: tuple[str, int, Conversation] | None) -> Iterator[Conversation | BadRecord]:
        if item is None:
            return
        conv = item[2]
        if not any(m.role == "user" for m in conv.messages):
            yield BadRecord(conv.line, f"conversation {conv.id!r} has no user turn")
        elif conv.id in seen:
            yield BadRecord(conv.line, f"conversation id {conv.id!r} repeats line {seen[conv.id]}")
        else:
            seen[conv.id] = conv.line
            yield conv

    for line, value in records:
        try:
            if isinstance(value, _Bad):
                raise value
            conv = _parse(value, line)
        except _Bad as e:
            yield from release(held)   # in file order; parts around a bad record are not merged
            held = None
            yield BadRecord(line, str(e))
            continue
        part = _PART.match(conv.id) if merge_parts and conv.format == "sharegpt" else None
        if part and held and held[0] == part[1] and int(part[2]) == held[1] + 1:
            prev = held[2]
            held = (held[0], held[1] + 1, Conversation(held[0], prev.messages + conv.messages,
                                                       prev.line, prev.format))
            continue
        yield from release(held)
        held = None
        if part:
            held = (part[1], int(part[2]), conv)
        else:
            yield from release(("", 0, conv))
    yield from release(held)


def _parse(value: object, line: int) -> Conversation:
    if not isinstance(value, dict):
        raise _Bad(f"a record is a JSON object, found {type(value).__name__}")
    if "conversations" in value:
        fmt, turns, role_key, text_key, roles = "sharegpt", value["conversations"], "from", "value", _SHAREGPT_ROLES
    elif "messages" in value:
        fmt, turns, role_key, text_key, roles = "openai", value["messages"], "role", "content", _OPENAI_ROLES
    else:
        raise _Bad("record has neither 'conversations' (ShareGPT) nor 'messages' (OpenAI chat)")
    raw_id = value.get("id", value.get("conversation_id"))
    if raw_id is None:
        cid = f"line-{line}"
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) and str(raw_id).strip():
        cid = str(raw_id)
    else:
        raise _Bad(f"'id' must be a non-empty string or an integer, found {raw_id!r}")
    if not isinstance(turns, list):
        raise _Bad(f"'{'conversations' if fmt == 'sharegpt' else 'messages'}' must be a list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Bad(f"turn {i} is not an object")
        role = turn.get(role_key)
        if role not in roles:
            raise _Bad(f"turn {i} has unknown {role_key!r} {role!r} (known: {', '.join(roles)})")
        text = _text(turn.get(text_key), i, text_key)
        if text.strip():
            messages.append(Message(roles[role], text))
    return Conversation(cid, tuple(messages), line, fmt)


def _text(content: object, i: int, key: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):           # OpenAI content parts: only text parts are readable here
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _Bad(f"turn {i} has a content part that is not text")
            texts.append(part["text"])
        return "".join(texts)
    raise _Bad(f"turn {i}: {key!r} must be a string, found {type(content).__name__}")
