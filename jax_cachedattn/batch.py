"""Batch jobs: run a file of conversations through the engine, one JSON line per reply, resumable.

A conversation is one session of the store; its user turns are the jobs, in order. The history is
the model's own replies (``history="generated"``) or the file's assistant turns (``"given"``,
teacher forcing). Every message that is history but not a reply (system prompts, a leading assistant
turn, the file's replies under ``"given"``) is rendered with the chat template and prefilled, with no
sampling, as the front of the next prompt the model answers: the engine takes it in (prefill + save)
in the same pass as that prompt. With ``reply_all`` under ``"given"`` the model also answers the
user turns the file answers; that reply is computed on a copy of the session (its KV copied through
the store, never recomputed) and dropped, so the session keeps the file's reply (on the messages
route below, on the session itself: the next job's render replaces it with the file's reply).

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
(Mistral's moves the system prompt into the last user turn) cannot continue a stored history token by
token: such a conversation (``batch_plan.rerenders``, decided from the input so a resumed run decides
the same) takes the messages route, each job the whole conversation as ``[{"role", "content"}, ...]``:
the engine renders it, reuses the longest common prefix with the stored tokens, drops the stale tail
and prefills the rest, so each reply equals a recompute of the template's render.

Resuming. The output file starts with a header line (the job id and the settings that change the
replies), then one line per reply, appended whole (one ``write``, then ``fsync``), and a summary line
at the end. A reply's line is written only after the turn's KV commit is durable. Started again,
the job drops a torn last line and the old summary, skips every turn that has a line, and reads each
session's committed turn count from the store: equal to the conversation's written main turns, the
conversation continues from the stored KV (read disk -> host as the conversation is opened, so its
turn runs the host-load programs an uninterrupted run compiled); one more (killed between the durable commit and the line)
means the reply is in the store, and its line is rebuilt from the stored tokens (``"recovered":
true``) instead of being computed again. So every turn is written exactly once and no finished turn
is recomputed. A finished conversation's sessions are deleted (``keep_sessions`` keeps them).

Warm-up. Before the first turn the job compiles every program its turns may run (``warmup``,
on by default): the input gives each turn's prompt length and a range for its history (the replies
before it are 1 to ``max_new_tokens`` tokens), so the prefill programs (prompt bucket, history
bucket, from the device pool or host memory, chunks) are known up front (``batch_plan.turn_shapes``,
``engine.warmup.programs_for``) and run once each on scratch sessions, with the decode step and the
saves. A resumed run does the same for the turns it still has to run, so it compiles nothing mid-job
either. Not covered (counted in the summary's ``turns_not_warmed``): turns from the first one that may
overflow the context window, and conversations on the messages route (above).

Sampling keys are derived by the engine from its seed (``EngineConfig.seed``), the conversation id
and the user turn's index (``sample_name``), so a resumed or re-sharded run samples the same replies.
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from jax_cachedattn.batch_io import BatchSummary, JobOutput, OutputFileError, progress_bar
from jax_cachedattn.batch_plan import Unit, plan_units, session_ids, turn_shapes, turn_tokens
from jax_cachedattn.batch_runner import Runner
from jax_cachedattn.conversations import BadRecord, Conversation, read_conversations
from jax_cachedattn.engine import Engine, InputError
from jax_cachedattn.engine.warmup import programs_for, warmup_programs

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
    window: jobs queued in the engine beyond its decode slots (``Engine.serve``'s look-ahead).
    warmup: before the first turn, compile every program the job's turns may run (their lengths are
      known from the input: ``batch_plan.turn_shapes``), so no turn compiles mid-job."""

    history: str = "generated"
    reply_all: bool = False
    max_new_tokens: int = 64
    strict: bool = False
    keep_sessions: bool = False
    window: int = 4
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.history not in ("generated", "given"):
            raise ValueError(f"history must be 'generated' or 'given', got {self.history!r}")
        if self.reply_all and self.history != "given":
            raise ValueError("reply_all applies to history='given' only")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got {self.window!r}")


def run_batch_job(engine: Engine, input_path: str | Path, output_path: str | Path,
                  options: BatchOptions = BatchOptions(), *, progress: bool = True,
                  report: Callable[[str], None] | None = None,
                  on_event: Callable[[dict], None] | None = None) -> BatchSummary:
    """Run (or resume) the job; returns what this run did. See the module docstring.

    ``report`` receives one line per skipped record or conversation (default: stderr). ``on_event``
    receives ``{"event": "compute"|"written"|"recovered", "conversation", "turn"}`` as turns go
    ("written" also has ``result``, the engine's TurnResult), and ``{"event": "warmed", "programs",
    "turns", "seconds", "uncovered"}`` once the warm-up (``options.warmup``) is done.
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
    if options.warmup:
        w = _warmup(engine, plans(), out.done, options)
        summary.warmup_s, summary.warmup_programs, summary.turns_not_warmed = w["seconds"], w["programs"], w["uncovered"]
        summary.warmup_turns, summary.warmup_by_kind, summary.warmup_tail_s = w["turns"], w["by_kind"], w["tail_s"]
        (on_event or (lambda e: None))({"event": "warmed", **w})
    t0 = time.perf_counter()
    loop0 = collections.Counter(engine.loop_time)
    runner = Runner(engine, out, options, summary, on_event or (lambda e: None), say)
    with progress_bar(progress, total, summary.turns_done_before) as advance:
        runner.advance = advance
        runner.run(plans())
    t_flush = time.perf_counter()
    engine.flush()
    summary.wall_s = time.perf_counter() - t0
    summary.loop = _loop_account(engine.loop_time - loop0, runner.spent, summary.wall_s, time.perf_counter() - t_flush)
    out.write_summary(summary.to_json())
    out.close()
    return summary


def _warmup(engine: Engine, plans, done: dict, o: BatchOptions) -> dict:
    """Compile what the turns still to run may need (engine/warmup.py): the prefill programs of their
    lengths, from the device pool or host memory (a resumed conversation's history is read back to
    host memory as it opens), the decode step, the saves."""
    shapes, uncovered = set(), 0
    for conv, units in plans:
        got, n = turn_shapes(engine.tokenizer, units, o.max_new_tokens, engine.model_config.max_context,
                             frozenset(done.get(conv.id, ())))
        shapes.update(got)
        uncovered += n
    progs = programs_for(engine, shapes, ("host", "device"))
    w = warmup_programs(engine, progs)
    return {"programs": len(progs), "turns": w["turns"], "seconds": round(w["seconds"], 3), "uncovered": uncovered,
            "by_kind": w["by_kind"], "tail_s": w["tail_s"]}


def _loop_account(loop: collections.Counter, runner: collections.Counter, wall: float, flush: float) -> dict:
    """Where the job's wall went (seconds): the engine loop's parts (``Engine.loop_time``: prefill, decode
    dispatches, saves and commit calls, the read buffer), the feed (the runner's work between jobs: prompts,
    store lookups, opening conversations) with the lines written in it and the waits for a commit, and the
    final flush; ``other_s`` is the rest (results handed back, the loop's bookkeeping)."""
    write, wait = runner["write_s"], runner["commit_wait_s"]
    out = {"prefill_s": loop["prefill_s"], "decode_s": loop["decode_s"], "decode_rounds": int(loop["decode_rounds"]),
           "finish_s": loop["finish_s"], "preload_s": loop["preload_s"], "write_s": write,
           "commit_wait_s": wait, "feed_s": max(0.0, loop["feed_s"] - write - wait), "flush_s": flush}
    out["other_s"] = wall - sum(v for k, v in out.items() if k != "decode_rounds")
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


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
