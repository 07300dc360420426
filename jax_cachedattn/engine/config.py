"""Engine configuration and per-turn results."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

SOURCES = ("new", "device", "host", "disk", "recompute")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How a turn runs. Every field can be overridden from the command line.

    max_new_tokens: reply length budget (also reserved in the context window before prefill).
    temperature: 0 is greedy; > 0 samples (with ``top_p``) from a PRNG seeded by ``seed``.
    truncation_ratio: on overflow, drop at least this fraction of the history (0.5 in the paper),
      and always at least what the overflow needs; whole turns are preferred.
    truncation_sink: tokens at the front of the history that a truncation keeps (the attention sink):
      the cut drops the oldest tokens after them. 0 drops from the very first token (the paper's
      truncation), which on SmolLM2 costs 1.2-3.6x in perplexity against a recompute; 4 keeps it within
      a few percent (docs/truncation.md).
    rope_mode: ``decoupled`` stores keys before RoPE (truncation keeps the cache valid); ``naive``
      stores them after RoPE, the usual engine, kept only to show that truncating it is wrong.
    preload: ``layerwise`` overlaps loading layer ``l + read_ahead`` with computing layer ``l``
      (one jitted step per layer, loads issued through async dispatch); ``in_program`` hands every
      layer's ``pinned_host`` blocks to one jitted program that moves them to the device itself
      and lets XLA schedule the copies against compute (a turn with no cached history runs as one
      scanned program); ``upfront`` loads every layer before prefill starts (the comparison);
      ``auto`` (default) is ``in_program``, which was the faster at most shapes in
      ``scripts/bench_overlap.py`` on the CPU (see README); the other modes stay for comparison.
    program_groups: how many jitted programs ``in_program`` splits the layers into (each group's
      history is waited for before its program is dispatched); ``None``: 1 for a history in host or
      device memory, 4 for one read from disk, so later layers are still being read while the first
      groups compute.
    group_growth: each group of ``program_groups`` holds this many times the layers of the one
      before (1: equal groups; 2, the default: 2, 4, 8, 16 of 30 layers), so the first program starts
      after only a few layers are read.
    prompt_bucket: up to 256 new tokens are padded to an eighth of their power-of-two range, never to a
      finer step than this (``prefill.prompt_bucket_length``; beyond 256: a multiple of 128). A padded token costs the compute of a real one; each bucket compiles its programs once.
    read_ahead: layers in flight ahead of compute; ``None`` sizes it from measured load and compute
      times (the paper's read buffer): more layers ahead when loading a layer is slower than
      computing one.
    save_every: during decode, the new tokens' KV is saved every this many tokens.
    use_cache: False recomputes the whole history every turn (the baseline); token ids are still
      kept so the conversation continues.
    return_logits: keep the logits of the prompt tokens and of every decode step in the result.
    max_slots: sessions decoding at once (continuous batching); ``Engine.turn`` is a batch of one.
    prefill_budget: new tokens the loop may prefill in one round while other slots decode (at least
      one job per round): jobs are started until their new tokens reach it, so a burst of short jobs
      joins the batch in one round, and the decoding slots never wait for more than the budget (or
      one job's prefill, when that is larger).
    chunked_prefill: a job with more than ``prefill_budget`` new tokens is prefilled in chunks of
      ``prefill_budget``, each against the history and the chunks before it (in the job's pages), and
      the loop runs one chunk per round between decode steps, so the decoding slots keep going beside a
      long prefill (docs/engine.md, "Chunked prefill"). A job is chunked the same way whether or not
      other slots decode, so its logits do not depend on the batch. False: one program per job.
    decode_steps: decode steps per dispatch of the batched step (one host sync per dispatch; a slot
      that finishes mid-dispatch waits for the dispatch to end before it is refilled).
    page_size: rows per page of the device KV pool; None: the store's ``token_block`` (64 without a
      store). The pool's writes and reads go row by row through the block tables, so a page need not
      be a store block: a smaller page holds a session's tokens more tightly (the last page's rounding
      is at most ``page_size - 1`` rows), and the decode attention still reads 64 rows per loop step
      (several small pages at once). The default 16 keeps one short session within 1.25x of its
      tokens' bytes, where the store's 64-token block did not (docs/engine.md, "Page size").
    pool_tokens: tokens the device KV pool holds (pages of ``page_size`` rows); None: room for
      ``max_slots`` turns of 2048 tokens or one of ``max_context``, whichever is more. Finished
      sessions' pages stay as the device cache until the pool needs them.
    keep_pages: keep a finished turn's pages in the pool as the session's device copy (the device
      tier); False gives them back at once (every later turn loads its history from the store).
    pool_preload_rows: while slots decode, the loop writes the host-memory histories of jobs waiting in
      the queue into free pool pages ahead of their turn (engine/pool_preload.py), so their prefill
      finds a device hit; at most this many history rows (summed over layers: a round writes
      ``max(1, pool_preload_rows // history tokens)`` whole layers) between two decode dispatches.
      0 turns it off.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    truncation_ratio: float = 0.5
    truncation_sink: int = 4
    rope_mode: str = "decoupled"
    preload: str = "auto"
    program_groups: int | None = None
    group_growth: float = 2.0
    prompt_bucket: int = 16
    read_ahead: int | None = None
    save_every: int = 16
    use_cache: bool = True
    return_logits: bool = False
    max_slots: int = 8
    prefill_budget: int = 512
    chunked_prefill: bool = True
    decode_steps: int = 4
    page_size: int | None = 16
    pool_tokens: int | None = None
    keep_pages: bool = True
    pool_preload_rows: int = 16384

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.truncation_ratio < 1:
            raise ValueError(f"truncation_ratio must be in (0, 1), got {self.truncation_ratio}")
        if not isinstance(self.truncation_sink, int) or self.truncation_sink < 0:
            raise ValueError(f"truncation_sink must be an int >= 0, got {self.truncation_sink!r}")
        if self.rope_mode not in ("decoupled", "naive"):
            raise ValueError(f"rope_mode must be 'decoupled' or 'naive', got {self.rope_mode!r}")
        if self.preload not in ("auto", "layerwise", "in_program", "upfront"):
            raise ValueError(f"preload must be 'auto', 'layerwise', 'in_program' or 'upfront', got {self.preload!r}")
        if self.program_groups is not None and self.program_groups < 1:
            raise ValueError(f"program_groups must be None or >= 1, got {self.program_groups}")
        if not self.group_growth >= 1:
            raise ValueError(f"group_growth must be >= 1, got {self.group_growth}")
        if not isinstance(self.prompt_bucket, int) or not 1 <= self.prompt_bucket <= 256:
            raise ValueError(f"prompt_bucket must be an int in [1, 256], got {self.prompt_bucket!r}")
        if self.read_ahead is not None and self.read_ahead < 1:
            raise ValueError(f"read_ahead must be None or >= 1, got {self.read_ahead}")
        if not isinstance(self.max_slots, int) or self.max_slots < 1:
            raise ValueError(f"max_slots must be an int >= 1, got {self.max_slots!r}")
        if not isinstance(self.prefill_budget, int) or self.prefill_budget < 1:
            raise ValueError(f"prefill_budget must be an int >= 1, got {self.prefill_budget!r}")
        if not isinstance(self.decode_steps, int) or self.decode_steps < 1:
            raise ValueError(f"decode_steps must be an int >= 1, got {self.decode_steps!r}")
        if self.page_size is not None and (not isinstance(self.page_size, int) or self.page_size < 1):
            raise ValueError(f"page_size must be None or an int >= 1, got {self.page_size!r}")
        if self.pool_tokens is not None and self.pool_tokens < 1:
            raise ValueError(f"pool_tokens must be None or >= 1, got {self.pool_tokens}")
        if not isinstance(self.pool_preload_rows, int) or self.pool_preload_rows < 0:
            raise ValueError(f"pool_preload_rows must be an int >= 0, got {self.pool_preload_rows!r}")
        if self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class TurnResult:
    """What one turn did. ``source`` tells where the history's KV came from (one of SOURCES)."""

    session: str
    reply: str
    reply_tokens: list[int]
    history_tokens: int
    """History tokens the new prompt attended to (after truncation)."""
    prompt_tokens: int
    generated_tokens: int
    truncated_tokens: int
    ttft_s: float
    total_s: float
    source: str
    reused_tokens: int
    """History tokens whose KV was loaded instead of recomputed."""
    read_ahead: int = 0
    """Layers kept in flight ahead of compute during this turn's prefill."""
    preload: str = "none"
    """How the history was brought to the device: ``layerwise``, ``in_program``, ``upfront``, ``none``, or
    ``pool``: written from host memory into the job's pool pages while it waited in the queue
    (engine/pool_preload.py; ``source`` is then ``host``, where the KV came from, and the prefill ran
    as a device hit)."""
    preloaded_layers: int = 0
    """Layers found already loaded: in the read buffer (preloaded while the previous job decoded), or
    every layer when ``preload == "pool"``."""
    prompt_logits: np.ndarray | None = None
    decode_logits: list[np.ndarray] | None = None
    commit: Any = None
    """The store's commit future of this turn (resolves once the turn is durable; raises if it failed)."""
    dropped_tokens: int = 0
    """Stored history tokens past the longest common prefix with a re-rendered conversation (a whole
    conversation given as messages), dropped and recomputed from the new render."""
    queue_s: float = 0.0
    """Seconds the job waited in the queue (for a slot, or behind a turn of its session) before its prefill;
    ``ttft_s`` and ``total_s`` count from the prefill's start."""

    def to_json(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "reply": self.reply,
            "history_tokens": self.history_tokens,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "truncated_tokens": self.truncated_tokens,
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "source": self.source,
            "reused_tokens": self.reused_tokens,
            "dropped_tokens": self.dropped_tokens,
        }

    def status_line(self) -> str:
        return (f"[ttft {self.ttft_s * 1000:.0f} ms | history from {self.source} | reused {self.reused_tokens} tok"
                f" | prompt {self.prompt_tokens} | generated {self.generated_tokens}"
                f" | truncated {self.truncated_tokens}"
                + (f" | dropped {self.dropped_tokens}" if self.dropped_tokens else "") + "]")
