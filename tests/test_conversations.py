"""Conversation files: ShareGPT (JSON array, JSONL, id_N parts) and OpenAI chat JSONL, read record by record."""

import json

import pytest

import jax_cachedattn.conversations as conversations
from jax_cachedattn.conversations import BadRecord, Conversation, Message, read_conversations


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


SHAREGPT_ARRAY = """[
  {"id": "a_0", "conversations": [
     {"from": "system", "value": "Réponds en français."},
     {"from": "human", "value": "Bonjour ☃ — ça va ?"},
     {"from": "gpt", "value": "Oui, merci !"}]},
  {"id": "a_1", "conversations": [
     {"from": "human", "value": "Et toi ?"},
     {"from": "gpt", "value": "   "},
     {"from": "human", "value": "你好"}]},
  {"id": "b", "conversations": [
     {"from": "gpt", "value": "I open the conversation."},
     {"from": "user", "value": "ok"},
     {"from": "chatgpt", "value": "fine"}]},
  {"id": "c", "conversations": [{"from": "tool", "value": "?"}]},
  {"id": "d", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "alone"}]},
  {"id": 7, "conversations": [{"from": "human", "value": "int id"}]}
]
"""


def test_sharegpt_json_array(tmp_path):
    items = list(read_conversations(_write(tmp_path / "s.json", SHAREGPT_ARRAY)))
    a, b, bad_c, bad_d, e = items
    # a_0 and a_1 are parts of one conversation: merged under the base id, in order.
    assert a == Conversation("a", (
        Message("system", "Réponds en français."), Message("user", "Bonjour ☃ — ça va ?"),
        Message("assistant", "Oui, merci !"), Message("user", "Et toi ?"), Message("user", "你好")), 2, "sharegpt")
    assert a.user_turns == 3  # the whitespace-only gpt turn is skipped, the two user turns stay
    assert b.messages[0] == Message("assistant", "I open the conversation.")  # a leading assistant turn is kept
    assert [m.role for m in b.messages] == ["assistant", "user", "assistant"] and b.line == 10
    assert bad_c == BadRecord(14, bad_c.reason) and "'tool'" in bad_c.reason
    assert bad_d == BadRecord(15, "conversation 'd' has no user turn")
    assert e.id == "7" and e.line == 16


def test_parts_merged_only_when_consecutive_and_numbered_in_order(tmp_path):
    recs = [{"id": i, "conversations": [{"from": "human", "value": i}]} for i in ("x_0", "x_2", "y_1", "y_2", "y_3")]
    p = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n")
    got = [(c.id, [m.content for m in c.messages]) for c in read_conversations(p)]
    assert got == [("x_0", ["x_0"]), ("x_2", ["x_2"]), ("y", ["y_1", "y_2", "y_3"])]
    got = [c.id for c in read_conversations(p, merge_parts=False)]
    assert got == ["x_0", "x_2", "y_1", "y_2", "y_3"]


def test_sharegpt_jsonl_and_repeated_id(tmp_path):
    lines = [{"id": "q", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
             {"id": "r", "conversations": [{"from": "human", "value": "x"}]},
             {"id": "q", "conversations": [{"from": "human", "value": "again"}]}]
    p = _write(tmp_path / "s.jsonl", "\ufeff" + "\n".join(json.dumps(x) for x in lines) + "\n")
    q, r, dup = read_conversations(p)
    assert (q.id, q.line, r.id, r.line) == ("q", 1, "r", 2)
    assert dup == BadRecord(3, "conversation id 'q' repeats line 1")


def test_openai_jsonl(tmp_path):
    text = "\n".join([
        json.dumps({"id": "o1", "messages": [{"role": "developer", "content": "Be terse."},
                                             {"role": "user", "content": [{"type": "text", "text": "Grüß "},
                                                                          {"type": "text", "text": "Gott"}]},
                                             {"role": "assistant", "content": None},
                                             {"role": "user", "content": "⌘?"}]}, ensure_ascii=False),
        "{not json",
        "",
        json.dumps({"messages": [{"role": "user", "content": "no id"}]}),
        json.dumps({"id": "o3", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
        json.dumps({"id": "o4", "messages": {"role": "user"}}),
        json.dumps(["a list"]),
        json.dumps({"id": "o5", "text": "neither"}),
        json.dumps({"id": "o6", "messages": [{"role": "user", "content": "kept after the bad lines"}]}),
    ]) + "\n"
    items = list(read_conversations(_write(tmp_path / "o.jsonl", text)))
    o1, bad2, o2, bad5, bad6, bad7, bad8, o6 = items
    assert o1 == Conversation("o1", (Message("system", "Be terse."), Message("user", "Grüß Gott"),
                                     Message("user", "⌘?")), 1, "openai")
    assert bad2.line == 2 and bad2.reason.startswith("bad JSON")
    assert o2.id == "line-4" and o2.line == 4
    assert (bad5.line, bad6.line, bad7.line, bad8.line) == (5, 6, 7, 8)
    assert "not text" in bad5.reason and "must be a list" in bad6.reason and "found list" in bad7.reason
    assert "neither" in bad8.reason
    assert o6.messages == (Message("user", "kept after the bad lines"),)


def test_cut_short_jsonl_keeps_whole_records(tmp_path):
    whole = [json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": f"m{i}"}]}) for i in range(3)]
    text = "\n".join(whole) + "\n"
    p = _write(tmp_path / "cut.jsonl", text + whole[0][:25])
    items = list(read_conversations(p))
    assert [c.id for c in items[:3]] == ["c0", "c1", "c2"]
    assert items[3].line == 4 and items[3].reason.startswith("record cut short")
    # Bytes that are not UTF-8 spoil their own line only.
    q = tmp_path / "bytes.jsonl"
    q.write_bytes(whole[0].encode() + b"\n" + b'{"id": "\xff"}\n' + whole[1].encode() + b"\n")
    a, bad, b = read_conversations(q)
    assert (a.id, b.id, bad.line) == ("c0", "c1", 2) and "UTF-8" in bad.reason


@pytest.mark.parametrize("chunk", [3, 64, 1 << 20])
def test_json_array_read_in_chunks(tmp_path, monkeypatch, chunk):
    """Records split across read boundaries decode the same; line numbers count every newline."""
    monkeypatch.setattr(conversations, "_ARRAY_READ", chunk)
    items = list(read_conversations(_write(tmp_path / "s.json", SHAREGPT_ARRAY)))
    assert [(type(x).__name__, x.line) for x in items] == [
        ("Conversation", 2), ("Conversation", 10), ("BadRecord", 14), ("BadRecord", 15), ("Conversation", 16)]


def test_cut_short_json_array_keeps_whole_records(tmp_path, monkeypatch):
    monkeypatch.setattr(conversations, "_ARRAY_READ", 16)
    cut = SHAREGPT_ARRAY[: SHAREGPT_ARRAY.index('{"id": "c"') + 30]
    items = list(read_conversations(_write(tmp_path / "cut.json", cut)))
    assert [x.id for x in items[:2]] == ["a", "b"]
    assert items[2] == BadRecord(14, items[2].reason) and "cut short" in items[2].reason
    # Bad JSON in the middle of an array: reported at its line, and the array ends there.
    broken = SHAREGPT_ARRAY.replace('{"id": "b"', '{"id": "b",,')
    items = list(read_conversations(_write(tmp_path / "broken.json", broken)))
    assert [x.id for x in items[:1]] == ["a"] and isinstance(items[1], BadRecord) and len(items) == 2
    assert items[1].line == 10 and items[1].reason.startswith("bad JSON")


def test_empty_and_whitespace_files(tmp_path):
    assert list(read_conversations(_write(tmp_path / "e.jsonl", ""))) == []
    assert list(read_conversations(_write(tmp_path / "w.json", "  [ ]  \n"))) == []
    (bad,) = read_conversations(_write(tmp_path / "open.json", "[\n"))
    assert bad.line == 2 and "closing" in bad.reason
