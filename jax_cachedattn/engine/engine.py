"""The engine: many sessions' turns at once over the tiered store and a paged device pool.

JetStream's loop: a queued job is planned (engine/plan.py), prefilled with its history pre-loaded
layer by layer (engine/prefill.py) into pages of the pool (engine/pool.py), inserted into a free
decode slot, and decoded with every other active slot by one donated, jitted step
(engine/slots.py). A slot that finishes commits its turn and is refilled at once. The only place
where model and store meet.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.chat_template import ChatTemplateError, check_messages, plan_turn
from jax_cachedattn.engine import programs as P
from jax_cachedattn.engine import slots as SL
from jax_cachedattn.engine.append import append as _append
from jax_cachedattn.engine.batching import Loop
from jax_cachedattn.engine.config import EngineConfig, TurnResult
from jax_cachedattn.engine.plan import TurnPlan, make_plan
from jax_cachedattn.engine.pool import PagePool, PoolFull, block_table
from jax_cachedattn.engine.prefill import Context, Rows, prefill
from jax_cachedattn.engine.read_buffer import ReadAhead, ReadBuffer
from jax_cachedattn.engine.truncation import ContextOverflow
from jax_cachedattn.engine.warmup import warmup as _warmup
from jax_cachedattn.model import TRACE_COUNTS, ModelConfig, TokenError, bucket_length, unstack_layers, validate_tokens
from jax_cachedattn.store import KVLost, TieredStore, UnknownSession, validate_session_id


class InputError(ValueError):
    """A turn's input cannot be served (empty message, no tokenizer for text, ...)."""


@dataclasses.dataclass
class _Active:
    """A job in a decode slot."""

    index: int
    plan: TurnPlan
    pages: list[int]
    table: np.ndarray
    arrival: float  # when the job was queued
    t0: float  # when its prefill started
    ttft: float
    generated: list[int]
    length: int  # KV rows held
    saved: int  # rows handed to the store
    prefill: Any
    prompt_logits: np.ndarray | None
    decode_logits: list | None
    slot: int = -1  # the decode slot (set by the loop)
    promise: int = 0  # pages of its reply budget promised by the pool, not allocated yet


@dataclasses.dataclass
class _Starting:
    """A job being prefilled, chunk by chunk between decode steps: its slot and pages are reserved."""

    index: int
    plan: TurnPlan
    slot: int
    arrival: float
    t0: float
    pages: list[int]
    table: np.ndarray
    promise: int = 0  # pages promised for its reply (allocated as it grows)
    done: int = 0  # compute_ids prefilled so far
    chunks: int = 0
    first: Any = None  # the first chunk's Prefilled, without its arrays (how the history came)
    logits: list = dataclasses.field(default_factory=list)  # per chunk its rows' logits (return_logits)


class Engine:
    """Runs conversation turns against a :class:`TieredStore`; see the module docstring.

    ``Engine(model_config, params, store, tokenizer, config)``; ``store=None`` keeps nothing across
    turns. With a tokenizer, messages are text rendered with the chat template; without one, token
    ids. The engine holds each layer's weights once (unstacked); with ``own_params`` it deletes the
    stacked ``params["layers"]`` it was given, so the process holds them once too.
    """

    def __init__(self, model_config: ModelConfig, params: dict, store: TieredStore | None = None,
                 tokenizer: Any = None, config: EngineConfig | None = None, *, own_params: bool = False):
        mc = self.model_config = model_config
        ec = self.config = config or EngineConfig()
        self.layers = tuple(unstack_layers(params))
        self.params = {k: v for k, v in params.items() if k != "layers"}  # one copy of the weights
        if own_params:
            for leaf in jax.tree.leaves(params["layers"]):
                leaf.delete()
        self.store, self.tokenizer = store, tokenizer
        if store is not None:
            lay = store.layout
            if (lay.num_layers, lay.kv_heads, lay.head_dim, lay.dtype) != (mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.dtype):
                raise ValueError(f"store layout {lay} does not match the model {mc.name}")
        self._boundary_id = getattr(tokenizer, "turn_boundary_id", None)  # where truncation may cut (None: anywhere)
        self._end = list(tokenizer.assistant_end()) if tokenizer is not None else []
        stops = sorted(tokenizer.stop_ids) if tokenizer is not None else []
        self._stop_set = set(stops)
        self._stop_ids = jax.device_put(jnp.asarray(stops or [-1], jnp.int32), jax.devices()[0])
        page = ec.page_size or (store.cfg.token_block if store is not None else 64)
        self._width = -(-(mc.max_context + len(self._end) + 2) // page)  # pages per slot
        tokens = ec.pool_tokens or max(ec.max_slots * min(2048, mc.max_context), self._width * page)
        self.pool = PagePool(mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.dtype, page, -(-tokens // page) + 1)
        self._ring = ec.save_every + ec.decode_steps  # decoded rows a save may ask for (engine/slots.py)
        self.state = SL.empty_state(ec.max_slots, self._width, max(1, len(self._end)),
                                    self._ring if ec.rope_mode != "naive" else 1,
                                    (mc.num_layers, mc.num_kv_heads, mc.head_dim), mc.jnp_dtype)
        self.read_ahead = ReadAhead(mc.num_layers, ec.read_ahead)
        self.read_buffer = ReadBuffer()
        self._ctx = Context(mc, self.params, self.layers, store, ec, self.read_ahead, self.read_buffer)
        self._slots: dict[int, _Active] = {}
        # Where the continuous-batching loop's time goes, summed over its rounds (engine/batching.py):
        # feed_s (pulling jobs from the caller's iterable: the caller's own work), prefill_s (starting
        # jobs: planning, loads, prefill, first token), preload_s (the read buffer), decode_s (the decode
        # dispatches, waited for), finish_s (saves during decode, a finished turn's save and commit call),
        # decode_rounds. Time the caller spends on a yielded result is in none of them.
        self.loop_time: collections.Counter = collections.Counter()

    # ---- inputs and planning ---------------------------------------------------------------------
    def _prompt_ids(self, message, first_turn: bool) -> np.ndarray:
        if isinstance(message, str):
            if not message.strip():
                raise InputError("the message is empty")
            if self.tokenizer is None:
                raise InputError("this engine has no tokenizer: pass token ids")
            ids = self.tokenizer.chat_turn(message, first_turn=first_turn)
            return validate_tokens(np.asarray(ids, np.int32), self.model_config, what="message")
        return validate_tokens(message, self.model_config, what="message")

    def _conversation_ids(self, messages, info, max_new: int) -> tuple[np.ndarray, int]:
        """A whole conversation: ``(tokens to prefill, stored tokens kept)`` -- the render's longest common
        prefix with the stored history is reused, the rest of the render computed (chat_template.plan_turn)."""
        if self.tokenizer is None:
            raise InputError("this engine has no tokenizer: pass token ids")
        try:
            whole = self.tokenizer.chat(check_messages(messages), add_generation_prompt=True)
            stored = np.zeros(0, np.int32) if info is None else info.token_ids
            p = plan_turn(stored, whole, budget=self.model_config.max_context - max_new - 2)
        except ChatTemplateError as e:
            raise InputError(str(e).splitlines()[0]) from None
        return validate_tokens(np.asarray(p.compute, np.int32), self.model_config, what="conversation"), p.reuse

    def _plan(self, sid: str, message, max_new: int) -> TurnPlan:
        sid = validate_session_id(sid)
        if max_new < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new}")
        info = self.store.lookup(sid) if self.store is not None else None
        keep = None
        whole = isinstance(message, (list, tuple)) and any(isinstance(m, Mapping) for m in message)
        if whole:
            new_ids, keep = self._conversation_ids(message, info, max_new)
        else:
            new_ids = self._prompt_ids(message, first_turn=info is None)
        on_dev = info is not None and self.pool.holds(sid, info.turn, info.num_tokens)
        ec = self.config
        plan = make_plan(sid, info, new_ids, max_new, chat=whole or isinstance(message, str),
                         max_context=self.model_config.max_context, ratio=ec.truncation_ratio,
                         boundary_id=self._boundary_id, use_cache=ec.use_cache, on_device=on_dev and ec.use_cache,
                         sink=ec.truncation_sink, keep=keep)
        if plan.source == "device" and self.pool.entry(sid).preloaded:
            plan = dataclasses.replace(plan, pool_preloaded=True)
        return plan

    # ---- the read buffer ----------------------------------------------------------------------------
    def preload(self, sid: str, layers: int | None = None) -> bool:
        """Dispatch the loads of the first ``layers`` layers of ``sid``'s history to the device now
        (held in the read buffer until its turn). Never blocks: a history on disk is prefetched to
        host memory instead. Returns False when nothing was dispatched."""
        if self.store is None or not self.config.use_cache:
            return False
        info = self.store.lookup(sid)
        if info is None or not info.kv_valid or info.num_tokens == 0 or self.pool.holds(sid, info.turn, info.num_tokens):
            return False
        if info.tier == "disk":
            self.store.prefetch(sid)
            return False
        S = bucket_length(info.num_tokens)
        k = layers if layers is not None else self.read_ahead.layers(
            info.num_tokens * self.store.layout.bytes_per_token_layer, 64)
        self.read_buffer.put(sid, info.num_tokens, info.turn, S,
                             {i: self.store.load_layer(sid, i, pad_to=S) for i in range(min(k, self.model_config.num_layers))})
        return True

    # ---- one job: prefill (in chunks) and insert -----------------------------------------------------
    def _start(self, index: int, plan: TurnPlan, slot: int, arrival: float, t0: float) -> _Active:
        """Prefill ``plan`` (every chunk at once) into its pages and insert it into ``slot``."""
        s = self._begin(index, plan, slot, arrival, t0)
        while True:
            a = self._resume(s)
            if a is not None:
                return a

    def _begin(self, index: int, plan: TurnPlan, slot: int, arrival: float, t0: float) -> _Starting:
        """Reserve a job's pages (a device hit's own, then free ones) and apply its drops; no device work.
        Raises PoolFull when the pool cannot hold the job yet."""
        store, pool = self.store, self.pool
        rows = plan.cached_len + len(plan.compute_ids)
        total = pool.pages_for(rows + plan.max_new + len(self._end) + 1)
        if total > pool.available():
            raise PoolFull(f"the job needs {total} pages, {pool.available()} are free or evictable and not promised")
        # Pages for the prompt and the first dispatch now; the rest of the reply budget promised.
        need = min(total, pool.pages_for(rows + self.config.decode_steps))
        if plan.n_drop or plan.tail_drop:
            self.read_buffer.drop(plan.sid)
            if plan.n_drop:
                pool.drop(plan.sid)
            if plan.kv_valid:  # past the common prefix with the new render, then the truncation (sink kept)
                if plan.tail_drop:
                    store.drop_range(plan.sid, plan.num_tokens - plan.tail_drop, plan.num_tokens)
                if plan.n_drop:
                    store.drop_range(plan.sid, plan.cut.start, plan.cut.stop)
        pages = pool.take(plan.sid, plan.turn, plan.num_tokens) if plan.source == "device" else None
        if pages is None:
            pool.drop(plan.sid)
            pages = []
        elif len(pages) > need:  # a dropped tail: its pages go back
            pool.release(pages[need:])
            pages = pages[:need]
        pages = pages + pool.alloc(need - len(pages), keep=plan.sid)
        pool.promise(total - need)
        return _Starting(index, plan, slot, arrival, t0, pages, block_table(pages, self._width), total - need)

    def _give_back(self, s) -> None:
        """A job's (``_Starting`` or ``_Active``) pages and promise go back to the pool."""
        self.pool.release(s.pages)
        self.pool.settle(s.promise)
        s.pages, s.promise = [], 0

    def _grow(self, a: _Active) -> None:
        """Before a dispatch: pages for the rows it may write (``decode_steps`` past the slot's length),
        from the slot's promise; its block table follows."""
        k = min(self.pool.pages_for(a.length + self.config.decode_steps) - len(a.pages), a.promise)
        if k <= 0:
            return
        a.pages = a.pages + self.pool.alloc(k, keep=a.plan.sid)
        self.pool.settle(k)
        a.promise -= k
        a.table = block_table(a.pages, self._width)
        self.state = SL.set_table(self.state, jnp.int32(a.slot), jnp.asarray(a.table))

    def _chunk_size(self, plan: TurnPlan) -> int:
        n = len(plan.compute_ids)
        return min(n, self.config.prefill_budget) if self.config.chunked_prefill else n

    def _resume(self, s: _Starting, insert: bool = True) -> _Active | None:
        """Prefill the job's next chunk (``prefill_budget`` new tokens with ``chunked_prefill``) against the
        history and the chunks before it; after the last one, sample its first token and insert it into
        its slot (``insert=False``, Engine.append: no token sampled, no slot taken). Returns the
        :class:`_Active` then, else None. On failure its pages go back."""
        ec, mc, store, pool = self.config, self.model_config, self.store, self.pool
        try:
            plan, lo = s.plan, s.done
            traced = sum(TRACE_COUNTS.values())
            t_chunk = time.perf_counter()
            while True:
                n_all = len(plan.compute_ids)
                hi = min(n_all, lo + self._chunk_size(plan))
                base = plan.cached_len + lo  # rows before this chunk (history and earlier chunks)
                part = plan if (lo, hi) == (0, n_all) else dataclasses.replace(
                    plan, compute_ids=plan.compute_ids[lo:hi], cached_len=base, save_from=max(plan.save_from, base),
                    source=plan.source if lo == 0 else "device")
                device_hist = None
                if part.source == "device":
                    device_hist = P.read_rows(pool.pages, jnp.asarray(s.table), jnp.int32(0), bucket_length(base))
                try:
                    pf, _, _ = prefill(self._ctx, part, device_hist)
                    break
                except KVLost:  # a checksum failure found while loading: recompute from the token ids
                    store.delete(plan.sid)
                    plan = s.plan = dataclasses.replace(
                        plan, source="recompute", compute_ids=np.concatenate([plan.hist_ids, plan.new_ids]),
                        cached_len=0, save_from=0, turn=None, num_tokens=0, kv_valid=False)
                    lo = s.done = 0
            n = hi - lo
            pool.pages = P.write_pages(pool.pages, pf.hists, pf.news, jnp.asarray(s.table), jnp.int32(base), jnp.int32(n),
                                       write_hist=part.source != "device", config=mc, rotate=ec.rope_mode != "naive")
            if ec.return_logits:
                s.logits.append(np.asarray(P.all_logits(self.params, mc, pf.x)[:n]))
            if s.first is None:  # how the history came (the device arrays are not kept through decode)
                s.first = dataclasses.replace(pf, x=None, hists=(), news=())
            s.done, s.chunks = hi, s.chunks + 1
            if hi < n_all:
                return None
            n_comp = n_all
            prompt_logits = np.concatenate(s.logits)[n_comp - len(plan.new_ids):] if ec.return_logits else None
            if not insert:
                length = plan.cached_len + n_comp
                return _Active(s.index, plan, s.pages, s.table, s.arrival, s.t0, time.perf_counter() - s.t0, [],
                               length, length, s.first, prompt_logits, None, s.slot, s.promise)
            logits = P.logits_at(self.params, mc, pf.x, jnp.int32(n - 1))
            chat = plan.chat and bool(self._end)
            end = np.zeros(max(1, len(self._end)), np.int32)
            end[: len(self._end)] = self._end
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(ec.seed), zlib.crc32((plan.sample_name or plan.sid).encode())),
                                     plan.turn or 0)
            self.state, first = SL.insert(
                self.state, jnp.int32(s.slot), jnp.asarray(s.table), jnp.int32(plan.cached_len + n_comp), logits, key,
                jnp.int32(plan.max_new), jnp.asarray(end), jnp.int32(len(self._end) if chat else 0),
                jnp.float32(ec.temperature), jnp.float32(ec.top_p), self._stop_ids)
            first = int(first)
        except BaseException:
            self._give_back(s)
            raise
        ttft = time.perf_counter() - s.t0
        if (s.chunks == 1 and plan.source in ("new", "recompute", "device")
                and sum(TRACE_COUNTS.values()) == traced):
            # One chunk, no loads in the way and nothing compiled: a compute measurement.
            self.read_ahead.observe_compute(n_comp, mc.num_layers, time.perf_counter() - t_chunk)
        length = plan.cached_len + n_comp
        return _Active(s.index, plan, s.pages, s.table, s.arrival, s.t0, ttft, [first], length, length, s.first,
                       prompt_logits, [np.asarray(logits)] if ec.return_logits else None, s.slot, s.promise)

    # ---- saving and finishing ---------------------------------------------------------------------------
    def _save(self, a: _Active, hi: int) -> None:
        lo = a.saved
        if self.store is None or hi <= lo:
            return
        size = bucket_length(hi - lo, minimum=self.config.save_every)
        if self.config.rope_mode == "naive":  # the store keeps the pool's (rotated) keys
            parts = P.read_rows(self.pool.pages, jnp.asarray(a.table), jnp.int32(lo), size)
        else:  # pre-RoPE keys from the decode state's ring
            if hi - lo > self._ring:
                raise AssertionError(f"{hi - lo} decoded rows to save, the key ring holds {self._ring}")
            parts = P.read_decoded(self.pool.pages, self.state.raw_k, jnp.asarray(a.table), jnp.int32(a.slot), jnp.int32(lo),
                                   size)
        for layer, part in enumerate(parts):
            self.store.save_layer(a.plan.sid, layer, Rows(part, 0, hi - lo), start=lo)
        a.saved = hi

    def _finish(self, a: _Active) -> TurnResult:
        plan, gen = a.plan, a.generated
        chat = plan.chat and bool(self._end)
        fed = gen[:-1] + self._end if (chat and gen[-1] in self._stop_set) else gen + (self._end if chat else [])
        all_ids = np.concatenate([plan.hist_ids, plan.new_ids, np.asarray(fed, np.int32)]).astype(np.int32)
        if len(all_ids) != a.length:
            raise AssertionError(f"slot holds {a.length} rows for {len(all_ids)} tokens")
        commit = None
        if self.store is not None:
            self._save(a, a.length)
            commit = self.store.commit_turn(plan.sid, all_ids)
            info = self.store.lookup(plan.sid)
            if self.config.keep_pages:
                self.pool.retain(plan.sid, a.pages, info.turn, info.num_tokens)
                a.pages = []
        self._give_back(a)
        reply_ids = [t for t in gen if t not in self._stop_set]
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        pf = a.prefill
        return TurnResult(
            session=plan.sid, reply=reply, reply_tokens=reply_ids, history_tokens=len(plan.hist_ids),
            prompt_tokens=len(plan.new_ids), generated_tokens=len(gen), truncated_tokens=plan.n_drop,
            dropped_tokens=plan.tail_drop,
            ttft_s=a.ttft, total_s=time.perf_counter() - a.t0, queue_s=a.t0 - a.arrival,
            source="host" if plan.pool_preloaded else plan.source, reused_tokens=plan.cached_len, read_ahead=pf.ahead,
            preload="pool" if plan.pool_preloaded else pf.mode,
            preloaded_layers=self.model_config.num_layers if plan.pool_preloaded else pf.preloaded,
            prompt_logits=a.prompt_logits,
            decode_logits=a.decode_logits, commit=commit)

    def _abort(self, a: _Active) -> None:
        """A failed turn: its pages go back and its session returns to its last committed turn."""
        self._give_back(a)
        self._abort_session(a.plan.sid)

    def _abort_session(self, sid: str) -> None:
        self.pool.drop(sid)
        self.read_buffer.drop(sid)
        if self.store is not None:
            try:
                self.store.abort_turn(sid)
            except UnknownSession:  # a first turn that never saved anything
                pass

    # ---- the loop ---------------------------------------------------------------------------------------
    def serve(self, jobs: Iterable[tuple[str, Any]], *, window: int = 4, max_new_tokens: int | None = None
              ) -> Iterator[tuple[int, TurnResult]]:
        """Run ``(session, message)`` (or ``(session, message, max_new_tokens[, sample_name])``) jobs, up to
        ``max_slots`` at once; yields ``(job index, result)``
        as turns finish. Jobs of one session run in order, each against the history the one before
        left. If a job fails, every turn in flight is given up (each session back at its last committed
        turn) and the error is raised."""
        yield from Loop(self, jobs, window, self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)).run()

    def run_batch(self, jobs: Sequence[tuple[str, Any]], *, window: int = 4) -> list[TurnResult]:
        """Run jobs as :meth:`serve` does; results in job order."""
        out: dict[int, TurnResult] = dict(self.serve(jobs, window=window))
        return [out[i] for i in range(len(out))]

    def turn(self, session_id: str, message, *, max_new_tokens: int | None = None,
             next_session: str | None = None, sample_name: str | None = None) -> TurnResult:
        """One turn of ``session_id`` (a batch of one). ``message``: the user's new text (rendered as one more
        turn), token ids, or the WHOLE conversation as ``[{"role", "content"}, ...]`` (OpenAI style): it is
        rendered with the chat template, the longest common prefix with the stored tokens is reused, the stored
        tail past it dropped and the rest prefilled (``TurnResult.reused_tokens``/``dropped_tokens``). ``next_session``: the job queued after this one;
        its first layers are preloaded while this turn decodes. ``sample_name``: names the sampling key
        (with ``EngineConfig.seed`` and the turn index; default the session id), so a caller can make
        replies follow its own identity of a conversation rather than the session id."""
        max_new = self.config.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        hint = next_session if next_session != session_id else None
        return list(Loop(self, [(session_id, message, max_new, sample_name)], 0, max_new, hint).run())[0][1]

    def append(self, session_id: str, message) -> TurnResult:
        """Take in finished turns of ``session_id`` without generating anything: prefill, save and commit,
        no decode (teacher forcing: a recorded assistant reply goes into the history as given). ``message``:
        token ids (appended as they are) or the WHOLE conversation as ``[{"role", "content"}, ...]``, which may
        end with the assistant's reply: rendered with the chat template without a generation prompt, the
        longest common prefix with the stored tokens reused, the stored tail past it dropped, the rest
        prefilled. Returns a TurnResult with no reply. See engine/append.py."""
        return _append(self, session_id, message, InputError)

    def evict(self, sid: str, tier: str) -> None:
        """Drop ``sid``'s copy in ``tier`` and every faster one: "device" (its pages in the pool and
        the store's device copy), "host" (also the host copy) or "disk" (the whole session)."""
        self.pool.drop(sid)
        self.read_buffer.drop(sid)
        if self.store is not None and self.store.lookup(sid) is not None:
            for t in ("device", "host", "disk")[: ("device", "host", "disk").index(tier) + 1]:
                self.store.evict(sid, t)
                if t == "disk":
                    break

    def warmup(self, prompt_lengths: Sequence[int] = (16, 32, 64, 128, 256),
               history_lengths: Sequence[int] = (256, 512, 1024, 2048),
               sources: Sequence[str] = ("new", "host", "device")) -> dict:
        """Compile ahead what turns with these prompt and history lengths will run (their buckets:
        any length in the same bucket runs the same programs), and the decode step, so a library
        user's first turns do not compile. Runs real turns of scratch sessions in a temporary
        in-memory store (the engine's store and pool are left as they were); ``sources`` among
        ``new``, ``host``, ``device``, ``disk``. Returns ``{"turns", "seconds"}``. See engine/warmup.py.
        Each (prompt bucket, history bucket, source) is one program to compile (the defaults: 45, minutes
        on a CPU for a 30-layer model; with the persistent compilation cache, once per machine): pass
        the lengths your traffic has."""
        return _warmup(self, prompt_lengths, history_lengths, sources)

    def _swap_store(self, store: TieredStore | None) -> None:
        self.store = self._ctx.store = store

    def flush(self) -> None:
        """Wait for every save and commit; raise the first failure."""
        if self.store is not None:
            self.store.flush()

    def close(self) -> None:
        self.read_buffer.clear()
        if self.store is not None:
            self.store.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Engine", "InputError", "ContextOverflow", "TokenError"]
