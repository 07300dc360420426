"""Batch jobs: run a file of conversations through the engine, one JSON line per reply, resumable.

A conversation is one session of the store; its user turns are the jobs, in order. The history is
the model's own replies (``history="generated"``) or the file's assistant turns (``"given"``,
teacher forcing). Every message that is history but not a reply (system prompts, a leading assistant
turn, the file's replies under ``"given"``) is rendered with the chat template and prefilled, with no
sampling, as the front of the next prompt the model answers: the engine takes it in (prefill + save)
in the same pass as that prompt. With ``reply_all`` under ``"given"`` the model also answers the
user turns the file answers; that reply is computed on a copy of the session (its KV copied through
the store, never recomputed) and dropped, so the session keeps the file's reply.

Many conversations at once. The jobs go to the continuous-batching engine (``Engine.serve``), up to
``max_slots`` decoding together. A conversation's next turn is handed to the engine once its previous
turn's line is written (its history is that turn's reply), so the feed is a generator over many
conversations: the next turns that are ready first, then a new conversation, so the slots stay full.
Lines are written in finish order.

Prompts. A turn's tokens are what the model's chat template adds to the conversation so far:
``render(history + new)`` minus ``render(history)`` (``chat_template.render_turn``), after the tokens
that close the previous reply (the template's ``assistant_end``; a reply that stopped on its first
token needs only the rest). The history's replies are the model's own tokens; the template only says
which tokens come between them. A template that renders earlier turns differently once a turn is added
(Mistral's moves the system prompt into the last user turn) cannot continue a stored history: such a
conversation is reported and skipped.

Resuming. The output file starts with a header line (the job id and the settings that change the
replies), then one line per reply, appended whole (one ``write``, then ``fsync``), and a summary line
at the end. A reply's line is written only after the turn's KV commit is durable. Started again,
the job drops a torn last line and the old summary, skips every turn that has a line, and reads each
session's committed turn count from the store: equal to the conversation's written main turns, the
conversation continues from the stored KV; one more (killed between the durable commit and the line)
means the reply is in the store, and its line is rebuilt from the stored tokens (``"recovered":
true``) instead of being computed again. So every turn is written exactly once and no finished turn
is recomputed. A finished conversation's sessions are deleted (``keep_sessions`` keeps them).

Sampling keys are derived by the engine from its seed (``EngineConfig.seed``), the conversation id
and the user turn's index (``sample_name``), so a resumed or re-sharded run samples the same replies.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from jax_cachedattn.batch_io import BatchSummary, JobOutput, OutputFileError, progress_bar
from jax_cachedattn.chat_template import ChatTemplateError, render_turn
from jax_cachedattn.conversations import BadRecord, Conversation, Message, read_conversations
from jax_cachedattn.engine import ContextOverflow, Engine, InputError, plan_truncation
from jax_cachedattn.model import TokenError, validate_tokens

__all__ = ["BatchOptions", "BatchSummary", "OutputFileError", "StrictStop", "Unit", "plan_units", "run_batch_job",
           "session_ids", "turn_tokens"]

FORMAT_VERSION = 1


class StrictStop(ValueError):
    """``strict``: the input has a bad record; nothing was run."""


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """history: ``generated`` (the model's replies are the history) or ``given`` (the file's).
    reply_all: with ``given``, also answer the user turns that the file answers.
    max_new_tokens: reply budget per turn.
    strict: stop at the first bad input record instead of skipping it.
    keep_sessions: keep each finished conversation's KV in the store (default: delete it).
    window: jobs queued in the engine beyond its decode slots (``Engine.serve``'s look-ahead)."""

    history: str = "generated"
    reply_all: bool = False
    max_new_tokens: int = 64
    strict: bool = False
    keep_sessions: bool = False
    window: int = 4

    def __post_init__(self) -> None:
        if self.history not in ("generated", "given"):
            raise ValueError(f"history must be 'generated' or 'given', got {self.history!r}")
        if self.reply_all and self.history != "given":
            raise ValueError("reply_all applies to history='given' only")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got {self.window!r}")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One reply to compute: user turn ``turn`` (0-based among the conversation's user turns).

    ``before``: the messages rendered ahead of the user message (history not yet in the session).
    ``scratch``: the reply is computed on a copy of the session and not kept as history."""

    turn: int
    before: tuple[Message, ...]
    user: Message
    scratch: bool = False


def plan_units(conv: Conversation, history: str, reply_all: bool = False) -> list[Unit]:
    """The replies a conversation asks for, in order (see the module docstring)."""
    msgs, units, pending, i, t = conv.messages, [], [], 0, 0
    while i < len(msgs):
        if msgs[i].role != "user":
            pending.append(msgs[i])      # system turns, a leading assistant turn
            i += 1
            continue
        j = i + 1
        while j < len(msgs) and msgs[j].role == "assistant":
            j += 1
        given = list(msgs[i + 1 : j])
        if history == "generated" or not given:
            units.append(Unit(t, tuple(pending), msgs[i]))   # the file's reply, if any, is replaced
            pending = []
        else:
            if reply_all:
                units.append(Unit(t, tuple(pending), msgs[i], scratch=True))
            pending += [msgs[i]] + given
        i, t = j, t + 1
    return units


def session_ids(job: str, conv_id: str) -> tuple[str, str]:
    """(session, scratch session) of a conversation: store-safe, unique per job and conversation."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", conv_id)[:64]
    h = hashlib.sha1(conv_id.encode("utf-8")).hexdigest()[:10]
    sid = f"bj-{job}.{safe}.{h}"
    return sid, sid + ".r"


def _dicts(msgs) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in msgs]


def turn_tokens(tok, history: list[dict], new: list[dict], last_token: int | None) -> tuple[list[int], list[int]]:
    """``(closing, rendered)``: the token ids that continue a session holding ``history`` (the chat
    messages already in it, the last one a reply whose last token is ``last_token``) with the ``new``
    messages and the generation prompt. ``rendered`` is what the chat template adds; ``closing`` ends
    the previous reply as the template does (empty for a new session: ``history`` empty,
    ``last_token`` None). Raises ChatTemplateError when the template renders ``history`` (or the
    prompt before its last reply) otherwise once ``new`` follows it: the stored tokens would not be a
    prefix of the conversation."""
    if last_token is None:
        return [], tok.chat(history + new)
    plan = render_turn(tok, history, new)
    # The session holds the previous prompt (``history`` less its last reply, rendered with the
    # generation prompt), the reply, and its closing: both renders must still be there.
    if plan.drop or not tok.render_chat(history + new).startswith(tok.render_chat(history[:-1])):
        raise ChatTemplateError("the chat template renders the earlier turns differently once this turn follows "
                                "(e.g. it moves the system prompt into the last user turn): a stored history "
                                "cannot continue")
    end = tok.assistant_end()
    closing = end[1:] if end and last_token == end[0] else end
    return list(closing), list(plan.compute)


def run_batch_job(engine: Engine, input_path: str | Path, output_path: str | Path,
                  options: BatchOptions = BatchOptions(), *, progress: bool = True,
                  report: Callable[[str], None] | None = None,
                  on_event: Callable[[dict], None] | None = None) -> BatchSummary:
    """Run (or resume) the job; returns what this run did. See the module docstring.

    ``report`` receives one line per skipped record or conversation (default: stderr). ``on_event``
    receives ``{"event": "compute"|"written"|"recovered", "conversation", "turn"}`` as turns go
    ("written" also has ``result``, the engine's TurnResult).
    Raises `StrictStop` (strict and a bad record), `OutputFileError`, and the store's `DiskFull`.
    """
    if engine.tokenizer is None or engine.store is None:
        raise InputError("a batch job needs an engine with a tokenizer (chat template) and a store")
    say = report or _stderr
    summary = BatchSummary()
    plans, total = _first_pass(input_path, options, say, summary)   # strict stops before any output
    out = JobOutput(output_path, _header(engine, options), job=secrets.token_hex(4))
    summary.torn_line_dropped = out.torn_line_dropped
    if out.torn_line_dropped:
        say(f"output: dropped a torn last line of {output_path}")
    summary.turns_total = total
    summary.turns_done_before = sum(len(v) for v in out.done.values())
    t0 = time.perf_counter()
    runner = _Runner(engine, out, options, summary, on_event or (lambda e: None), say)
    with progress_bar(progress, total, summary.turns_done_before) as advance:
        runner.advance = advance
        runner.run(plans())
    engine.flush()
    summary.wall_s = time.perf_counter() - t0
    out.write_summary(summary.to_json())
    out.close()
    return summary


def _stderr(line: str) -> None:
    import sys

    print(f"cachedattn batch: {line}", file=sys.stderr, flush=True)


def _header(engine: Engine, o: BatchOptions) -> dict:
    ec, mc = engine.config, engine.model_config
    return {"version": FORMAT_VERSION, "history": o.history, "reply_all": o.reply_all,
            "max_new_tokens": o.max_new_tokens, "seed": ec.seed, "temperature": ec.temperature,
            "top_p": ec.top_p, "max_context": mc.max_context, "truncation_ratio": ec.truncation_ratio,
            "model": engine.store.layout.fingerprint}


def _first_pass(path, o: BatchOptions, say, summary: BatchSummary):
    """Count the replies (for the progress bar) and report bad records; strict stops here."""
    total = 0
    for item in read_conversations(path):
        if isinstance(item, BadRecord):
            msg = f"input line {item.line}: {item.reason}"
            if o.strict:
                raise StrictStop(f"{msg} (--strict: nothing was run)")
            say(msg + " (skipped)")
            summary.bad_records.append(msg)
            continue
        total += len(plan_units(item, o.history, o.reply_all))

    def plans() -> Iterator[tuple[Conversation, list[Unit]]]:
        for item in read_conversations(path):
            if isinstance(item, Conversation):
                yield item, plan_units(item, o.history, o.reply_all)
    return plans, total


class _Mismatch(ValueError):
    pass


_CONV_ERRORS = (ContextOverflow, InputError, TokenError, ChatTemplateError, _Mismatch)


@dataclasses.dataclass
class _Conv:
    """A conversation in progress: its units, sessions, written turns and the messages its session holds."""

    conv: Conversation
    units: list[Unit]
    sid: str
    scratch: str
    done: set[int]
    hist: list[dict] = dataclasses.field(default_factory=list)
    at: int = 0   # the next unit to run


class _Runner:
    """Feeds the units of many conversations to ``Engine.serve`` and writes their lines."""

    def __init__(self, engine: Engine, out: JobOutput, o: BatchOptions, summary: BatchSummary, event, say):
        self.engine, self.store, self.tok = engine, engine.store, engine.tokenizer
        self.out, self.o, self.s, self.event, self.say = out, o, summary, event, say
        self.stop = self.tok.stop_ids
        self.advance: Callable[[int], None] = lambda n: None
        self.ready: collections.deque[_Conv] = collections.deque()      # next unit may start now
        self.waiting: collections.deque[tuple] = collections.deque()   # (conv, unit, result): commit not durable yet
        self.jobs: list[tuple[_Conv, Unit, str]] = []                   # this serve call's jobs, by index
        self.source: Iterator | None = None

    def run(self, plans: Iterator[tuple[Conversation, list[Unit]]]) -> None:
        self.source = iter(plans)
        while True:
            self.jobs = []
            for index, res in self.engine.serve(self._feed(), window=self.o.window):
                c, u, sess = self.jobs[index]
                if u.scratch:
                    self._drop(sess)
                    self._write(c, u, res)
                else:
                    self.waiting.append((c, u, res))
            # The feed ended with nothing ready (every open conversation had a turn in the engine);
            # those turns are done now: go on with their next ones.
            if not (self.ready or self.waiting):
                return

    # ---- the feed --------------------------------------------------------------------------------
    def _feed(self) -> Iterator[tuple]:
        """Jobs for ``Engine.serve``: ready next turns first, then new conversations; waits for a
        commit only when nothing else can start; ends when every open conversation is in the engine."""
        while True:
            self._collect(block=False)
            if self.ready:
                job = self._submit(self.ready.popleft())
                if job is not None:
                    yield job
            elif self.source is not None:
                try:
                    conv, units = next(self.source)
                except StopIteration:
                    self.source = None
                    continue
                self._open(conv, units)
            elif self.waiting:
                self._collect(block=True)
            else:
                return

    def _collect(self, block: bool) -> None:
        """Write the lines of finished turns whose commit is durable (``block``: wait for the oldest)."""
        for _ in range(len(self.waiting)):
            c, u, res = self.waiting.popleft()
            if res.commit is not None and not res.commit.done() and not block:
                self.waiting.append((c, u, res))
                continue
            block = False
            if res.commit is not None:
                res.commit.result()   # raises DiskFull / TurnFailed: the job stops, resumable
            self._write(c, u, res)

    def _open(self, conv: Conversation, units: list[Unit]) -> None:
        self.s.conversations += 1
        sid, scratch = session_ids(self.out.job, conv.id)
        c = _Conv(conv, units, sid, scratch, set(self.out.done.get(conv.id, set())))
        if all(u.turn in c.done for u in units):
            self._finish(c)   # finished before (a kill may have come before the delete)
            return
        try:
            self._resume(c)
        except _CONV_ERRORS as e:
            self._fail(c, e)
            return
        self._next(c)

    def _next(self, c: _Conv) -> None:
        while c.at < len(c.units) and c.units[c.at].turn in c.done:
            c.at += 1
        if c.at == len(c.units):
            self._finish(c)
        else:
            self.ready.append(c)

    def _submit(self, c: _Conv) -> tuple | None:
        """The engine job of ``c``'s next unit, or None when the conversation fails here."""
        u = c.units[c.at]
        try:
            if u.scratch:
                sess, ids = c.scratch, self._scratch_prompt(c, u)
            else:
                sess, ids = c.sid, self._main_prompt(c, u)
            self._check(ids)
        except _CONV_ERRORS as e:
            self._fail(c, e)
            return None
        self.event({"event": "compute", "conversation": c.conv.id, "turn": u.turn, "scratch": u.scratch})
        self.jobs.append((c, u, sess))
        # Sampling keys: the engine derives each reply's key from its seed, the name given here (the
        # conversation id and the user turn) and the turn index.
        return sess, np.asarray(ids, np.int32), self.o.max_new_tokens, f"{c.conv.id}\x00{u.turn}"

    def _check(self, ids: list[int]) -> None:
        """What the engine would refuse for this job alone, refused here (a refusal inside ``serve``
        gives up every turn in flight)."""
        mc = self.engine.model_config
        validate_tokens(np.asarray(ids, np.int32), mc, what="message")
        plan_truncation(np.zeros(0, np.int32), len(ids), self.o.max_new_tokens + 2, mc.max_context,
                        self.engine.config.truncation_ratio)

    def _tokens(self, c: _Conv, u: Unit, info) -> tuple[list[int], list[int]]:
        last = int(info.token_ids[-1]) if info is not None and len(info.token_ids) else None
        if (last is None) != (not c.hist):
            raise _Mismatch("the store and the output disagree on the conversation's history")
        return turn_tokens(self.tok, c.hist, _dicts(u.before + (u.user,)), last)

    def _main_prompt(self, c: _Conv, u: Unit) -> list[int]:
        closing, rendered = self._tokens(c, u, self.store.lookup(c.sid))
        return closing + rendered

    def _scratch_prompt(self, c: _Conv, u: Unit) -> list[int]:
        """A reply that is not history: computed on a copy of the session, then dropped."""
        self._drop(c.scratch)   # left by a run killed before this reply's line
        info = self.store.lookup(c.sid)
        closing, rendered = self._tokens(c, u, info)
        if info is None:
            return rendered
        if info.kv_valid:
            _copy_session(self.store, c.sid, c.scratch, info)
            return closing + rendered
        return info.token_ids.tolist() + closing + rendered   # no valid KV to copy: the engine computes it all

    # ---- lines and the end of a conversation -------------------------------------------------------
    def _write(self, c: _Conv, u: Unit, res) -> None:
        self.out.write_turn({"conversation": c.conv.id, "turn": u.turn, "reply": res.reply,
                             "prompt_tokens": res.prompt_tokens, "history_tokens": res.history_tokens,
                             "generated_tokens": res.generated_tokens, "reused_tokens": res.reused_tokens,
                             "ttft_s": round(res.ttft_s, 6), "total_s": round(res.total_s, 6),
                             "source": res.source, "truncated_tokens": res.truncated_tokens})
        s = self.s
        s.turns_written += 1
        s.history_tokens += res.history_tokens
        s.reused_tokens += res.reused_tokens
        s.prompt_tokens += res.prompt_tokens
        s.generated_tokens += res.generated_tokens
        computed = res.prompt_tokens + res.history_tokens - res.reused_tokens
        s.computed_tokens += computed
        if res.reused_tokens == 0:
            s.fresh_prefill_tokens += computed
            s.fresh_prefill_s += res.ttft_s
        self.advance(1)
        self.event({"event": "written", "conversation": c.conv.id, "turn": u.turn, "result": res})
        self._done(c, u, res.reply)
        self._next(c)

    def _done(self, c: _Conv, u: Unit, reply: str) -> None:
        c.done.add(u.turn)
        if not u.scratch:
            c.hist += _dicts(u.before + (u.user,)) + [{"role": "assistant", "content": reply}]

    def _finish(self, c: _Conv) -> None:
        if not self.o.keep_sessions:
            self._drop(c.sid)
        self._drop(c.scratch)

    def _drop(self, sid: str) -> None:
        if self.store.lookup(sid) is not None:
            self.engine.evict(sid, "disk")

    def _fail(self, c: _Conv, e: Exception) -> None:
        msg = f"conversation {c.conv.id!r} (input line {c.conv.line}): {e}"
        self.say(msg + " (skipped)")
        self.s.failed_conversations.append(msg)

    # ---- resuming ---------------------------------------------------------------------------------
    def _resume(self, c: _Conv) -> None:
        """Match the store's committed turns with the written lines, rebuild the history's messages
        from the written replies, and rebuild the one line a kill between a durable commit and its
        line can leave missing."""
        main = [u for u in c.units if not u.scratch]
        written = 0
        while written < len(main) and main[written].turn in c.done:
            written += 1
        if any(u.turn in c.done for u in main[written:]):
            raise _Mismatch("the output has a later turn without an earlier one")
        info = self.store.lookup(c.sid)
        committed = info.turn if info is not None else 0
        replies = self.out.replies.get(c.conv.id, {})
        for u in main[:written]:
            self._done(c, u, replies[u.turn])
        if committed == written + 1 and written < len(main):
            self._recover(c, main[written], info)
        elif committed != written:
            raise _Mismatch(f"the store holds {committed} turns of it but the output has {written}: "
                            "run with the --store and --output the job started with")

    def _recover(self, c: _Conv, u: Unit, info) -> None:
        toks = info.token_ids.tolist()
        hist = c.hist
        # The prompt's rendered part does not depend on the closing of the reply before it.
        segs = turn_tokens(self.tok, hist, _dicts(u.before + (u.user,)), None if not hist else -1)[1]
        for g in range(1, self.o.max_new_tokens + 1):
            gen = toks[len(toks) - g:]
            if any(t in self.stop for t in gen[:-1]):
                break  # a reply ends at its first stop token: no longer reply is possible
            if (gen[-1] in self.stop or g == self.o.max_new_tokens) and toks[len(toks) - g - len(segs):len(toks) - g] == segs:
                reply = self.tok.decode([t for t in gen if t not in self.stop], skip_special_tokens=True)
                self.out.write_turn({"conversation": c.conv.id, "turn": u.turn, "reply": reply, "prompt_tokens": None,
                                     "history_tokens": None, "generated_tokens": g, "reused_tokens": None,
                                     "ttft_s": None, "total_s": None, "source": None, "truncated_tokens": None,
                                     "recovered": True})
                self.s.turns_recovered += 1
                self.advance(1)
                self.event({"event": "recovered", "conversation": c.conv.id, "turn": u.turn})
                self._done(c, u, reply)
                return
        raise _Mismatch(f"turn {u.turn} is committed in the store but its reply cannot be found there")


def _copy_session(store, src: str, dst: str, info) -> None:
    """Copy ``src``'s KV (state ``info``) into a new session ``dst`` through the store: loads and
    saves, no compute."""
    for layer in range(store.layout.num_layers):
        store.save_layer(dst, layer, store.load_layer(src, layer), start=0)
    store.commit_turn(dst, info.token_ids)
