"""Batch jobs: run a file of conversations through the engine, one JSON line per reply, resumable.

A conversation is one session of the store; its user turns are the jobs, in order. The history is
the model's own replies (``history="generated"``) or the file's assistant turns (``"given"``,
teacher forcing). Every message that is history but not a reply (system prompts, a leading assistant
turn, the file's replies under ``"given"``) is rendered with the chat template and prefilled, with no
sampling, as the front of the next prompt the model answers: the engine takes it in (prefill + save)
in the same pass as that prompt. With ``reply_all`` under ``"given"`` the model also answers the
user turns the file answers; that reply is computed on a copy of the session (its KV copied through
the store, never recomputed) and dropped, so the session keeps the file's reply.

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
and the user turn's index (``Engine.turn(..., sample_name=)``), so a resumed or re-sharded run
samples the same replies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jax_cachedattn.batch_io import BatchSummary, JobOutput, OutputFileError, progress_bar
from jax_cachedattn.conversations import BadRecord, Conversation, Message, read_conversations
from jax_cachedattn.engine import ContextOverflow, Engine, InputError
from jax_cachedattn.model import TokenError

__all__ = ["BatchOptions", "BatchSummary", "OutputFileError", "StrictStop", "Unit", "plan_units", "run_batch_job",
           "session_ids"]

FORMAT_VERSION = 1


class StrictStop(ValueError):
    """``strict``: the input has a bad record; nothing was run."""


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """history: ``generated`` (the model's replies are the history) or ``given`` (the file's).
    reply_all: with ``given``, also answer the user turns that the file answers.
    max_new_tokens: reply budget per turn.
    strict: stop at the first bad input record instead of skipping it.
    keep_sessions: keep each finished conversation's KV in the store (default: delete it)."""

    history: str = "generated"
    reply_all: bool = False
    max_new_tokens: int = 64
    strict: bool = False
    keep_sessions: bool = False

    def __post_init__(self) -> None:
        if self.history not in ("generated", "given"):
            raise ValueError(f"history must be 'generated' or 'given', got {self.history!r}")
        if self.reply_all and self.history != "given":
            raise ValueError("reply_all applies to history='given' only")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")


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
        for conv, units in plans():
            runner.conversation(conv, units)
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


class _Runner:
    """Runs the units of one conversation after another against the engine and the output."""

    def __init__(self, engine: Engine, out, o: BatchOptions, summary: BatchSummary, event, say):
        self.engine, self.store, self.tok = engine, engine.store, engine.tokenizer
        self.out, self.o, self.s, self.event, self.say = out, o, summary, event, say
        self.end = list(self.tok.assistant_end())
        self.stop = self.tok.stop_ids
        self.advance: Callable[[int], None] = lambda n: None

    def conversation(self, conv: Conversation, units: list[Unit]) -> None:
        self.s.conversations += 1
        sid, scratch = session_ids(self.out.job, conv.id)
        done = self.out.done.get(conv.id, set())
        if all(u.turn in done for u in units):
            self._drop_sessions(sid, scratch)   # finished before (a kill may have come before the delete)
            return
        try:
            self._resume_check(conv, units, sid, done)
            for u in units:
                if u.turn in done:
                    continue
                self._scratch_turn(conv, u, sid, scratch) if u.scratch else self._main_turn(conv, u, sid)
                done.add(u.turn)
        except (ContextOverflow, InputError, TokenError, _Mismatch) as e:
            msg = f"conversation {conv.id!r} (input line {conv.line}): {e}"
            self.say(msg + " (skipped)")
            self.s.failed_conversations.append(msg)
            return
        self._drop_sessions(sid, scratch)

    def _drop_sessions(self, *sids: str) -> None:
        if not self.o.keep_sessions:
            for s in sids:
                if self.store.lookup(s) is not None:
                    self.store.delete(s)

    # ---- resuming ---------------------------------------------------------------------------------
    def _resume_check(self, conv: Conversation, units: list[Unit], sid: str, done: set[int]) -> None:
        """Match the store's committed turns with the written lines; rebuild the one line a kill
        between a durable commit and its line can leave missing."""
        main = [u for u in units if not u.scratch]
        info = self.store.lookup(sid)
        committed = info.turn if info is not None else 0
        written = 0
        while written < len(main) and main[written].turn in done:
            written += 1
        if any(u.turn in done for u in main[written:]):
            raise _Mismatch("the output has a later turn without an earlier one")
        if committed == written + 1 and written < len(main):
            self._recover(conv, main[written], sid, first=written == 0)
            done.add(main[written].turn)
        elif committed != written:
            raise _Mismatch(f"the store holds {committed} turns of it but the output has {written}: "
                            "run with the --store and --output the job started with")

    def _recover(self, conv: Conversation, u: Unit, sid: str, first: bool) -> None:
        toks = self.store.lookup(sid).token_ids.tolist()
        segs = self._render(u.before + (u.user,), first)
        for g in range(1, self.o.max_new_tokens + 1):
            gen = toks[len(toks) - g:]
            if any(t in self.stop for t in gen[:-1]):
                break  # a reply ends at its first stop token: no longer reply is possible
            if (gen[-1] in self.stop or g == self.o.max_new_tokens) and toks[len(toks) - g - len(segs):len(toks) - g] == segs:
                reply = self.tok.decode([t for t in gen if t not in self.stop], skip_special_tokens=True)
                self.out.write_turn({"conversation": conv.id, "turn": u.turn, "reply": reply, "prompt_tokens": None,
                                     "history_tokens": None, "generated_tokens": g, "reused_tokens": None,
                                     "ttft_s": None, "total_s": None, "source": None, "truncated_tokens": None,
                                     "recovered": True})
                self.s.turns_recovered += 1
                self.advance(1)
                self.event({"event": "recovered", "conversation": conv.id, "turn": u.turn})
                return
        raise _Mismatch(f"turn {u.turn} is committed in the store but its reply cannot be found there")

    # ---- turns --------------------------------------------------------------------------------------
    def _render(self, msgs: tuple[Message, ...], first: bool) -> list[int]:
        """Template tokens of ``msgs`` plus the generation prompt; ``first``: the conversation's start
        (with the template's default system block when it does not open with a system turn)."""
        if first:
            return self.tok.chat([{"role": m.role, "content": m.content} for m in msgs])
        return self.tok.encode("".join(_block(m) for m in msgs) + "<|im_start|>assistant\n")

    def _prompt(self, info, u: Unit) -> list[int]:
        """The tokens of ``u`` over a session whose state is ``info`` (None: no session yet)."""
        if info is None:
            return self._render(u.before + (u.user,), True)
        last = int(info.token_ids[-1]) if len(info.token_ids) else None
        closing = self.end[1:] if last == self.end[0] else self.end   # as the engine closes a chat reply
        return closing + self._render(u.before + (u.user,), False)

    def _turn(self, conv: Conversation, u: Unit, sid: str, ids: list[int]):
        self.event({"event": "compute", "conversation": conv.id, "turn": u.turn, "scratch": u.scratch})
        # Sampling keys: the engine derives each reply's key from its seed, the name given here (the
        # conversation id and the user turn) and the turn index, so a resumed or re-sharded job
        # samples the same replies.
        return self.engine.turn(sid, ids, max_new_tokens=self.o.max_new_tokens, sample_name=f"{conv.id}\x00{u.turn}")

    def _main_turn(self, conv: Conversation, u: Unit, sid: str) -> None:
        info = self.store.lookup(sid)
        res = self._turn(conv, u, sid, self._prompt(info, u))
        # The line only after the commit is durable: a kill before that leaves the store one turn
        # behind the plan (the turn is computed again, nothing was written); a kill after it and
        # before the line is repaired by _recover.
        self.store.flush()
        now = self.store.lookup(sid)
        if now is None or now.turn != (info.turn if info is not None else 0) + 1 or not now.durable:
            from jax_cachedattn.store import DiskFull

            raise DiskFull(f"the store could not make turn {u.turn} of {conv.id!r} durable (disk full?)")
        self._write(conv, u, res)

    def _scratch_turn(self, conv: Conversation, u: Unit, sid: str, scratch: str) -> None:
        """A reply that is not history: computed on a copy of the session, then dropped."""
        if self.store.lookup(scratch) is not None:
            self.store.delete(scratch)   # left by a run killed before this reply's line
        info = self.store.lookup(sid)
        ids = self._prompt(info, u)
        if info is not None and info.kv_valid:
            _copy_session(self.store, sid, scratch, info)
        elif info is not None:           # no valid KV to copy: the engine computes the whole history
            ids = info.token_ids.tolist() + ids
        res = self._turn(conv, u, scratch, ids)
        self.store.delete(scratch)
        self._write(conv, u, res)

    def _write(self, conv: Conversation, u: Unit, res) -> None:
        self.out.write_turn({"conversation": conv.id, "turn": u.turn, "reply": res.reply,
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
        self.event({"event": "written", "conversation": conv.id, "turn": u.turn, "result": res})


class _Mismatch(ValueError):
    pass


def _block(m: Message) -> str:
    return f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n"


def _copy_session(store, src: str, dst: str, info) -> None:
    """Copy ``src``'s KV (state ``info``) into a new session ``dst`` through the store: loads and
    saves, no compute."""
    for layer in range(store.layout.num_layers):
        store.save_layer(dst, layer, store.load_layer(src, layer), start=0)
    store.commit_turn(dst, info.token_ids)
