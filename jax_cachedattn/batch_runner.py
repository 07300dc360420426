"""The loop of a batch job: feeds many conversations' turns to the continuous-batching engine
(``Engine.serve``), writes each reply's line once its commit is durable, and resumes conversations
from the store. See jax_cachedattn/batch.py for the job and its guarantees."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np

from jax_cachedattn.batch_io import BatchSummary, JobOutput
from jax_cachedattn.batch_plan import Unit, dicts, rerenders, session_ids, turn_tokens
from jax_cachedattn.chat_template import ChatTemplateError, check_messages, plan_turn
from jax_cachedattn.conversations import Conversation
from jax_cachedattn.engine import ContextOverflow, Engine, InputError, plan_truncation
from jax_cachedattn.model import TokenError, validate_tokens
from jax_cachedattn.store import KVLost, UnknownSession


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
    whole: bool = False   # the template re-renders earlier turns: each job is the whole conversation (messages)
    loading: concurrent.futures.Future | None = None   # a resumed session's disk -> host read

    def session(self, u: Unit) -> str:
        """Where ``u`` runs: the scratch copy for a reply that is not history (token route), else the
        conversation's session (on the messages route the next job's render drops that reply again)."""
        return self.scratch if u.scratch and not self.whole else self.sid


class Runner:
    """Feeds the units of many conversations to ``Engine.serve`` and writes their lines."""

    def __init__(self, engine: Engine, out: JobOutput, o, summary: BatchSummary, event, say):
        self.engine, self.store, self.tok = engine, engine.store, engine.tokenizer
        self.out, self.o, self.s, self.event, self.say = out, o, summary, event, say
        self.stop = self.tok.stop_ids
        self.advance: Callable[[int], None] = lambda n: None
        self.ready: collections.deque[_Conv] = collections.deque()      # next unit may start now
        self.waiting: collections.deque[tuple] = collections.deque()   # (conv, unit, result): commit not durable yet
        self.jobs: list[tuple[_Conv, Unit, str]] = []                   # this serve call's jobs, by index
        self.source: Iterator | None = None
        self.spent: collections.Counter = collections.Counter()   # write_s (lines: write + fsync), commit_wait_s

    def run(self, plans: Iterator[tuple[Conversation, list[Unit]]]) -> None:
        self.source = iter(plans)
        while True:
            self.jobs = []
            for index, res in self.engine.serve(self._feed(), window=self.o.window):
                c, u, sess = self.jobs[index]
                if sess == c.scratch:
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
                t = time.perf_counter()
                res.commit.result()   # raises DiskFull / TurnFailed: the job stops, resumable
                self.spent["commit_wait_s"] += time.perf_counter() - t
            self._write(c, u, res)

    def _open(self, conv: Conversation, units: list[Unit]) -> None:
        self.s.conversations += 1
        sid, scratch = session_ids(self.out.job, conv.id)
        c = _Conv(conv, units, sid, scratch, set(self.out.done.get(conv.id, set())))
        if all(u.turn in c.done for u in units):
            self._finish(c)   # finished before (a kill may have come before the delete)
            return
        try:
            c.whole = rerenders(self.tok, units)
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
        sess = c.session(u)
        if c.loading is not None:
            self._loaded(c)
        try:
            if c.whole:
                msg = self._whole_prompt(c, u)
            else:
                ids = self._scratch_prompt(c, u) if sess == c.scratch else self._main_prompt(c, u)
                self._check(ids)
                msg = np.asarray(ids, np.int32)
        except _CONV_ERRORS as e:
            self._fail(c, e)
            return None
        self.event({"event": "compute", "conversation": c.conv.id, "turn": u.turn, "scratch": u.scratch})
        self.jobs.append((c, u, sess))
        # Sampling keys: the engine derives each reply's key from its seed, the name given here (the
        # conversation id and the user turn) and the turn index.
        return sess, msg, self.o.max_new_tokens, f"{c.conv.id}\x00{u.turn}"

    def _check(self, ids: list[int]) -> None:
        """What the engine would refuse for this job alone, refused here (a refusal inside ``serve``
        gives up every turn in flight)."""
        mc = self.engine.model_config
        validate_tokens(np.asarray(ids, np.int32), mc, what="message")
        plan_truncation(np.zeros(0, np.int32), len(ids), self.o.max_new_tokens + 2, mc.max_context,
                        self.engine.config.truncation_ratio)

    def _loaded(self, c: _Conv) -> None:
        """Wait for a resumed session's disk -> host read (started when the conversation was opened), so
        its turn loads the history from host memory, as the uninterrupted run's turns do: the same
        programs, no disk-path compile in the resumed process. A failed read is the turn's to report."""
        fut, c.loading = c.loading, None
        try:
            fut.result()
        except (KVLost, UnknownSession, OSError):
            pass

    def _whole_prompt(self, c: _Conv, u: Unit) -> list[dict]:
        """The messages route: the whole conversation so far; the engine renders it, reuses the longest
        common prefix with the stored tokens and drops the stale tail (a moved system prompt, or the
        reply a ``reply_all`` turn generated where the file has its own). Checked here as the engine
        will plan it (a refusal inside ``serve`` gives up every turn in flight)."""
        msgs = check_messages(c.hist + dicts(u.before + (u.user,)))
        whole = self.tok.chat(msgs, add_generation_prompt=True)
        info = self.store.lookup(c.sid)
        mc = self.engine.model_config
        p = plan_turn(np.zeros(0, np.int32) if info is None else info.token_ids, whole,
                      budget=mc.max_context - self.o.max_new_tokens - 2)
        self._check(list(p.compute))
        return msgs

    def _tokens(self, c: _Conv, u: Unit, info) -> tuple[list[int], list[int]]:
        last = int(info.token_ids[-1]) if info is not None and len(info.token_ids) else None
        if (last is None) != (not c.hist):
            raise _Mismatch("the store and the output disagree on the conversation's history")
        return turn_tokens(self.tok, c.hist, dicts(u.before + (u.user,)), last)

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
        t = time.perf_counter()
        self.out.write_turn({"conversation": c.conv.id, "turn": u.turn, "reply": res.reply,
                             "prompt_tokens": res.prompt_tokens, "history_tokens": res.history_tokens,
                             "generated_tokens": res.generated_tokens, "reused_tokens": res.reused_tokens,
                             "ttft_s": round(res.ttft_s, 6), "total_s": round(res.total_s, 6),
                             "source": res.source, "truncated_tokens": res.truncated_tokens})
        self.spent["write_s"] += time.perf_counter() - t
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
            c.hist += dicts(u.before + (u.user,)) + [{"role": "assistant", "content": reply}]

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
        main = [u for u in c.units if c.session(u) == c.sid]
        written = 0
        while written < len(main) and main[written].turn in c.done:
            written += 1
        if any(u.turn in c.done for u in main[written:]):
            raise _Mismatch("the output has a later turn without an earlier one")
        info = self.store.lookup(c.sid)
        committed = info.turn if info is not None else 0
        if info is not None and info.tier == "disk" and info.kv_valid and self.engine.config.use_cache:
            c.loading = self.store.prefetch(c.sid)
        replies = self.out.replies.get(c.conv.id, {})
        for u in main[:written]:
            self._done(c, u, replies[u.turn])
        if committed == written + 1 and written < len(main):
            (self._recover_whole if c.whole else self._recover)(c, main[written], info)
        elif committed != written:
            raise _Mismatch(f"the store holds {committed} turns of it but the output has {written}: "
                            "run with the --store and --output the job started with")

    def _recovered(self, c: _Conv, u: Unit, reply: str, generated: int) -> None:
        self.out.write_turn({"conversation": c.conv.id, "turn": u.turn, "reply": reply, "prompt_tokens": None,
                             "history_tokens": None, "generated_tokens": generated, "reused_tokens": None,
                             "ttft_s": None, "total_s": None, "source": None, "truncated_tokens": None,
                             "recovered": True})
        self.s.turns_recovered += 1
        self.advance(1)
        self.event({"event": "recovered", "conversation": c.conv.id, "turn": u.turn})
        self._done(c, u, reply)

    def _recover_whole(self, c: _Conv, u: Unit, info) -> None:
        """The messages route: the session holds the render of the conversation up to the generation
        prompt (its front possibly truncated), the reply, and the template's closing of it (the engine
        writes ``assistant_end`` in place of a stop token)."""
        toks = info.token_ids.tolist()
        end = self.tok.assistant_end()
        if end and toks[len(toks) - len(end):] == end:
            toks = toks[: len(toks) - len(end)]
        whole = self.tok.chat(c.hist + dicts(u.before + (u.user,)), add_generation_prompt=True)
        tail = whole[len(whole) - min(len(whole), 16):]   # the end of the prompt, kept by any truncation
        for g in range(0, self.o.max_new_tokens + 1):
            if toks[len(toks) - g - len(tail):len(toks) - g] == tail:
                gen = toks[len(toks) - g:]
                reply = self.tok.decode([t for t in gen if t not in self.stop], skip_special_tokens=True)
                self._recovered(c, u, reply, g + (1 if g < self.o.max_new_tokens else 0))
                return
        raise _Mismatch(f"turn {u.turn} is committed in the store but its reply cannot be found there")

    def _recover(self, c: _Conv, u: Unit, info) -> None:
        toks = info.token_ids.tolist()
        hist = c.hist
        # The prompt's rendered part does not depend on the closing of the reply before it.
        segs = turn_tokens(self.tok, hist, dicts(u.before + (u.user,)), None if not hist else -1)[1]
        for g in range(1, self.o.max_new_tokens + 1):
            gen = toks[len(toks) - g:]
            if any(t in self.stop for t in gen[:-1]):
                break  # a reply ends at its first stop token: no longer reply is possible
            if (gen[-1] in self.stop or g == self.o.max_new_tokens) and toks[len(toks) - g - len(segs):len(toks) - g] == segs:
                reply = self.tok.decode([t for t in gen if t not in self.stop], skip_special_tokens=True)
                self._recovered(c, u, reply, g)
                return
        raise _Mismatch(f"turn {u.turn} is committed in the store but its reply cannot be found there")


def _copy_session(store, src: str, dst: str, info) -> None:
    """Copy ``src``'s KV (state ``info``) into a new session ``dst`` through the store: loads and
    saves, no compute."""
    for layer in range(store.layout.num_layers):
        store.save_layer(dst, layer, store.load_layer(src, layer), start=0)
    store.commit_turn(dst, info.token_ids)
