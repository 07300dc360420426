"""A batch job's output file (header, whole-line appends, torn-line repair), its summary line and its
progress bar.

The file is JSON Lines::

    {"batch_job": {"job": "3f2a9c1e", "version": 1, "history": "generated", ...settings}}
    {"conversation": "c1", "turn": 0, "reply": "...", ...}        one line per reply
    ...
    {"summary": {...}}                                           last line of a run

Every line is appended with one ``write`` of the whole line and then ``fsync``; a line without its
newline at the end of the file (a run killed inside the write) is cut off when the file is opened
again, and so is a run's summary line, so a resumed run's summary is again the last line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class BatchSummary:
    """What one run of a job did (``to_json`` is the output's summary line)."""

    turns_total: int = 0            # replies the input asks for
    turns_done_before: int = 0      # found in the output when the run started
    turns_written: int = 0          # computed and written by this run
    turns_recovered: int = 0        # rebuilt from the store (killed after commit, before the line)
    conversations: int = 0
    bad_records: list[str] = dataclasses.field(default_factory=list)
    failed_conversations: list[str] = dataclasses.field(default_factory=list)
    torn_line_dropped: bool = False
    history_tokens: int = 0
    reused_tokens: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    computed_tokens: int = 0        # tokens prefilled (prompt, plus history when recomputed)
    fresh_prefill_s: float = 0.0    # ttft of turns with nothing cached: the recompute estimate's rate
    fresh_prefill_tokens: int = 0
    wall_s: float = 0.0
    warmup_s: float = 0.0           # compiling ahead, before the first turn (not in wall_s)
    warmup_programs: int = 0
    turns_not_warmed: int = 0       # turns whose lengths the warm-up could not know (truncation, re-rendering)
    warmup_turns: int = 0           # scratch turns the warm-up ran (a host program: one per preload count)
    warmup_by_kind: dict[str, list] = dataclasses.field(default_factory=dict)   # {kind: [turns, seconds]}
    warmup_tail_s: float = 0.0      # the warm-up's decode step at every batch size and the saves' row reads
    loop: dict[str, Any] = dataclasses.field(default_factory=dict)   # where wall_s went (batch._loop_account)

    @property
    def skipped(self) -> bool:
        return bool(self.bad_records or self.failed_conversations)

    def to_json(self) -> dict[str, Any]:
        rate = self.fresh_prefill_tokens / self.fresh_prefill_s if self.fresh_prefill_s > 0 else None
        return {"summary": {
            "turns_total": self.turns_total, "turns_done_before": self.turns_done_before,
            "turns_written": self.turns_written, "turns_recovered": self.turns_recovered,
            "conversations": self.conversations, "bad_records": len(self.bad_records),
            "failed_conversations": len(self.failed_conversations), "wall_s": round(self.wall_s, 3),
            "turns_per_min": round(60 * self.turns_written / self.wall_s, 3) if self.wall_s > 0 else None,
            "tokens_per_s": round((self.computed_tokens + self.generated_tokens) / self.wall_s, 3)
            if self.wall_s > 0 else None,
            "token_hit_rate": round(self.reused_tokens / self.history_tokens, 4) if self.history_tokens else None,
            "history_tokens": self.history_tokens, "reused_tokens": self.reused_tokens,
            "recomputed_history_tokens": self.history_tokens - self.reused_tokens,
            "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
            "time_saved_estimate_s": round(self.reused_tokens / rate, 3) if rate else None,
            "warmup_s": round(self.warmup_s, 3), "warmup_programs": self.warmup_programs,
            "turns_not_warmed": self.turns_not_warmed, "warmup_turns": self.warmup_turns,
            "warmup_by_kind": self.warmup_by_kind, "warmup_tail_s": round(self.warmup_tail_s, 3),
            "loop": self.loop,
        }}


class OutputFileError(ValueError):
    """The output file cannot be appended to: not a batch output, other settings, a corrupt line."""


class JobOutput:
    """Open (or create) the output file of a job; ``done`` maps conversation id -> written turns and
    ``replies`` conversation id -> {turn: reply} (a resumed conversation's history is rebuilt from them).

    settings: what changes the replies (compared with the header of an existing file: a resumed run
    must use the same). job: the job id to write in a new file's header (an existing file's is kept).
    """

    def __init__(self, path: str | Path, settings: dict, job: str):
        self.path = Path(path)
        self.done: dict[str, set[int]] = {}
        self.replies: dict[str, dict[int, str]] = {}
        self.torn_line_dropped = False
        self.job = job
        header = self._read(settings)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if header is None:
            self._append({"batch_job": {"job": job, **settings}})

    def _read(self, settings: dict) -> dict | None:
        if not self.path.exists():
            return None
        data = self.path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1          # a torn last line: cut it off
            self.torn_line_dropped = True
        lines = data[:keep].split(b"\n")[:-1] if keep else []
        header, summary_at, offset = None, None, 0
        for n, raw in enumerate(lines, start=1):
            start, offset = offset, offset + len(raw) + 1
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise OutputFileError(f"{self.path} line {n} is not JSON: not a batch output, or damaged") from None
            summary_at = None
            if n == 1:
                header = rec.get("batch_job") if isinstance(rec, dict) else None
                if not isinstance(header, dict) or not isinstance(header.get("job"), str):
                    raise OutputFileError(f"{self.path} is not a cachedattn batch output (line 1 is no header)")
                for key, value in settings.items():
                    if header.get(key) != value:
                        raise OutputFileError(
                            f"{self.path} was written with {key}={header.get(key)!r}, this run has {value!r}: "
                            "resume with the same settings or write to another --output")
                self.job = header["job"]
            elif isinstance(rec, dict) and "summary" in rec:
                summary_at = start
            elif isinstance(rec, dict) and isinstance(rec.get("conversation"), str) and isinstance(rec.get("turn"), int) \
                    and isinstance(rec.get("reply"), str):
                turns = self.done.setdefault(rec["conversation"], set())
                if rec["turn"] in turns:
                    raise OutputFileError(f"{self.path} line {n}: turn {rec['turn']} of {rec['conversation']!r} "
                                          "is written twice")
                turns.add(rec["turn"])
                self.replies.setdefault(rec["conversation"], {})[rec["turn"]] = rec.get("reply")
            else:
                raise OutputFileError(f"{self.path} line {n} is not a batch result line")
        if summary_at is not None:
            keep = summary_at                     # the previous run's summary: this run writes a new one
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        return header

    def _append(self, record: dict) -> None:
        buf = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        while buf:                                # one write for a line; loop only on a short write
            buf = buf[os.write(self._fd, buf):]
        os.fsync(self._fd)

    def write_turn(self, record: dict) -> None:
        self._append(record)
        self.done.setdefault(record["conversation"], set()).add(record["turn"])
        self.replies.setdefault(record["conversation"], {})[record["turn"]] = record["reply"]

    def write_summary(self, record: dict) -> None:
        self._append(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, done: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with ETA on stderr; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("turns"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("batch", total=total, completed=done)
        yield lambda n: bar.advance(task, n)
