"""Compile ahead: run the engine's programs once for the shapes the coming turns will have.

A turn compiles its prefill programs once per (prompt bucket, history bucket, source), and the
decode step once per decode batch size (``slots.decode_buckets``). Without a warm-up those compiles land on the first turns' TTFT (a
fresh process once took 4.2 s to the first token of a conversation's second turn from host memory,
against 0.97 s for its first). The prefill programs are named here as :data:`Program` triples
``(kind, S, T)``: ``T`` the bucket of the new tokens of one chunk, ``S`` the bucket of the rows
before it, ``kind`` how they came:

* ``new``: no history (a first turn, a recompute, the first chunk of either);
* ``host``: a history in the host tier (the in-program prefill that moves ``pinned_host`` blocks to
  the device); its first layers may already be on the device (the read buffer: ``Engine.preload``
  of the queue's next job), another program per count of them: the warm-up runs none and every
  count the read-ahead can pick (``ReadAhead.counts``: its default, half the layers, every layer);
* ``device``: a history in the device pool (a device hit: a finished turn's pages, or a queued job's
  host history written into pages ahead of its turn, engine/pool_preload.py, whose program
  ``write_history`` the warm-up compiles with each ``host`` history bucket), and every chunk after a
  job's first (its rows are in the job's pages);
* ``disk``: a history read from the disk tier (the prefill split into several programs).

:func:`programs_for` lists the programs that turns of known lengths may run (a batch job knows every
conversation's turns up front: ``batch_plan.turn_shapes``); :func:`warmup_programs` runs one real turn of a
scratch session per program through the engine's own loop, so exactly the programs a turn runs are
compiled (and, with JAX's persistent compilation cache on, written to disk for the next process),
with the decode step at every batch size and the saves' row reads. :func:`warmup` is
``Engine.warmup``: every prompt bucket against every history bucket.

The scratch sessions live in a temporary in-memory store with the real store's layout and
settings, swapped in for the warm-up only; their pages go back to the pool afterwards. The read
buffer's rates measured on the way stay (they are this machine's).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from jax_cachedattn.engine import programs as P
from jax_cachedattn.engine import slots as SL
from jax_cachedattn.engine.pool_preload import PoolPreload
from jax_cachedattn.engine.prefill import prompt_bucket_length
from jax_cachedattn.model import bucket_length
from jax_cachedattn.store import TieredStore

SOURCES = ("new", "host", "device", "disk")
Program = tuple[str, int, int]   # (kind, history bucket S, prompt bucket T); see the module docstring


@dataclasses.dataclass(frozen=True)
class TurnShape:
    """A turn to come: its history holds between ``history[0]`` and ``history[1]`` tokens (a generated
    reply's length is known only as a range), its new tokens between ``prompt[0]`` and ``prompt[1]``."""

    history: tuple[int, int]
    prompt: tuple[int, int]


def _buckets(lo: int, hi: int) -> set[int]:
    """The history buckets of every length in ``[lo, hi]``."""
    out, n = set(), lo
    while n <= hi:
        s = bucket_length(n)
        out.add(s)
        n = s + 1
    return out


def _chunks(n: int, budget: int | None) -> list[tuple[int, int]]:
    """``(offset, size)`` of the chunks a prefill of ``n`` tokens runs in (engine._resume)."""
    step = n if budget is None else budget
    return [(lo, min(step, n - lo)) for lo in range(0, n, max(1, step))]


def programs_for(engine, shapes: Iterable[TurnShape], sources: Sequence[str] = ("host", "device")) -> set[Program]:
    """The prefill programs turns of these shapes may run on ``engine`` (its prompt buckets, chunking,
    cache setting). A cached history's first chunk may come from any of ``sources`` (a batch job's:
    the device pool, or host memory once the pool evicted it or a resumed job read it back);
    ``device`` only where the engine keeps finished turns' pages."""
    ec = engine.config
    budget = ec.prefill_budget if ec.chunked_prefill else None
    # A history in the pool: a finished turn's pages (keep_pages), or a queued job's history preloaded from
    # host memory into pages while other slots decode (pool_preload_rows; engine/pool_preload.py).
    first = [s for s in sources if s != "device" or ec.keep_pages or ec.pool_preload_rows]
    out: set[Program] = set()
    for sh in set(shapes):
        (hlo, hhi), (plo, phi) = sh.history, sh.prompt
        if ec.use_cache:   # the history's KV reused: the prompt computed against it
            cases = [(n, hlo, hhi) for n in range(plo, phi + 1)]
        else:              # the whole history recomputed with the prompt
            cases = [(n, 0, 0) for n in range(hlo + plo, hhi + phi + 1)]
        for n, lo, hi in cases:
            for off, size in _chunks(n, budget):
                T = prompt_bucket_length(size, ec.prompt_bucket)
                for S in _buckets(lo + off, hi + off):
                    if S == 0:
                        out.add(("new", 0, T))
                    elif off:
                        out.add(("device", S, T))
                    else:
                        out.update((k, S, T) for k in first)
    return out


def _history(store, sid: str, n: int, num_layers: int, kv_heads: int, head_dim: int, dtype) -> None:
    """A committed history of ``n`` zero tokens (zero KV) for ``sid``."""
    rows = np.zeros((2, n, kv_heads, head_dim), dtype)
    for layer in range(num_layers):
        store.save_layer(sid, layer, rows, start=0)
    store.commit_turn(sid, np.zeros(n, np.int32)).result()


def warmup(engine, prompt_lengths: Sequence[int], history_lengths: Sequence[int], sources: Sequence[str]) -> dict:
    """See :meth:`Engine.warmup`: every prompt bucket of ``prompt_lengths`` new, and against every history
    bucket of ``history_lengths`` from each of ``sources``. Returns ``{"turns", "seconds", "skipped"}``."""
    bad = sorted(set(sources) - set(SOURCES))
    if bad:
        raise ValueError(f"unknown warm-up sources {bad}; known: {', '.join(SOURCES)}")
    if any(int(n) < 1 for n in prompt_lengths) or any(int(n) < 1 for n in history_lengths):
        raise ValueError("warm-up lengths must be >= 1")
    progs: set[Program] = set()
    if "new" in sources or engine.store is None:
        progs |= programs_for(engine, [TurnShape((0, 0), (int(n), int(n))) for n in prompt_lengths])
    kinds = [k for k in ("host", "device", "disk") if k in sources]
    if kinds and engine.store is not None:
        progs |= programs_for(engine, [TurnShape((int(h), int(h)), (int(n), int(n)))
                                       for h in history_lengths for n in prompt_lengths], kinds)
    return warmup_programs(engine, progs)


def warmup_programs(engine, programs: Iterable[Program], preload_counts: Sequence[int] | None = None) -> dict:
    """Compile ``programs`` (see the module docstring): one scratch turn each, its history (zeros)
    placed where the program reads it from, then the decode step at every batch size and the saves'
    row reads. Returns ``{"turns", "seconds", "skipped", "by_kind", "tail_s"}`` (``skipped``: programs
    no turn can run within the context window; ``by_kind``: ``{kind: [turns, seconds]}`` of the scratch
    turns, compile and run; ``tail_s``: the saves' row reads and the decode step at every batch size).
    ``preload_counts``: the read-buffer layer counts of the ``host`` programs (default: none and every
    count the read-ahead can pick; a caller that never preloads, such as the bench's one-job-at-a-time
    replay, passes ``(0,)``)."""
    progs = set(programs)
    bad = sorted({p[0] for p in progs} - set(SOURCES))
    if bad:
        raise ValueError(f"unknown warm-up sources {bad}; known: {', '.join(SOURCES)}")
    progs = sorted(progs, key=lambda p: (SOURCES.index(p[0]), p[1], p[2]))
    mc, ec = engine.model_config, engine.config
    real = engine.store
    scratch = None
    if real is not None:
        cfg = dataclasses.replace(real.cfg, root=None, kvstore={"driver": "memory"}, disk_bytes=None)
        scratch = TieredStore(cfg, real.layout)
    t0, turns, skipped, sids = time.perf_counter(), 0, 0, []
    by_kind: dict[str, list] = {}
    tag = uuid.uuid4().hex[:12]  # never the id of a session of the engine's pool
    # The first turn generates enough tokens for a save during decode and a last, shorter one at the end.
    # The decode loop's programs do not depend on the prefill's shapes (the tail below runs the decode step
    # at every batch size and the saves' row reads at every size), so the other scratch turns decode
    # nothing: the first of each kind and prompt bucket samples its first token (``logits_at`` is compiled
    # per bucket, and again where the prefill's output is committed to the device, as a history makes it)
    # and the rest only prefill and commit (``Engine.append``: the turn's own plan, prefill and
    # page writes, no sampling, no decode dispatch). A restarted job pays this warm-up before its first turn.
    new = min(ec.save_every + ec.decode_steps + 1, ec.max_new_tokens)
    decoded, sampled = False, set()
    budget = ec.prefill_budget if ec.chunked_prefill else None
    # A history in host memory may have its first layers in the read buffer already (Engine.preload, the
    # queue's next job): those layers enter the in-program prefill as device arrays, another program per
    # count. The counts: none, and every count the read-ahead can pick (ReadAhead.counts: its default,
    # half the layers, every layer; a need in between is rounded up to one of them).
    preloads = sorted({0, *engine.read_ahead.counts()}) if ec.preload in ("auto", "in_program") else [0]
    if preload_counts is not None:
        preloads = sorted({int(k) for k in preload_counts})
    engine._swap_store(scratch)
    # The scratch turns place their histories themselves (the programs do not depend on use_cache).
    engine.config = engine._ctx.engine_config = ec.replace(use_cache=True)
    try:
        runs = [(kind, S, T, k) for kind, S, T in progs for k in (preloads if kind == "host" else (0,))]
        for kind, S, T, k in runs:
            t_run = time.perf_counter()
            n = T if budget is None else min(T, budget)   # one chunk, of bucket T
            sid = f"warmup-{tag}-{kind}-{S}-{T}-{k}"
            if kind != "new":
                if scratch is None:
                    skipped += 1
                    continue
                h = min(S, mc.max_context - n - new - 2)   # no truncation: the history stays in bucket S
                if h < 1 or bucket_length(h) != S:
                    skipped += 1
                    continue
                sids.append(sid)
                _history(scratch, sid, h, mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.dtype)
                engine.evict(sid, "device")
                if kind == "disk":
                    scratch.flush()
                    engine.evict(sid, "host")
                elif kind == "device":   # its pages in the pool, as a finished turn leaves them
                    info = scratch.lookup(sid)
                    engine.pool.retain(sid, engine.pool.alloc(engine.pool.pages_for(h)), info.turn, info.num_tokens)
                elif k:
                    engine.preload(sid, layers=k)
                elif kind == "host" and ec.pool_preload_rows:  # the preload into pool pages: one program per S
                    PoolPreload(engine).write_all(sid)
                    engine.pool.drop(sid)
            sids.append(sid)
            if decoded and (kind, T) in sampled:
                res = engine.append(sid, np.ones(n, np.int32))
            else:
                res = engine.turn(sid, np.ones(n, np.int32), max_new_tokens=1 if decoded else new)
            decoded = True
            sampled.add((kind, T))
            if res.source != kind or res.preloaded_layers != k:
                raise AssertionError(f"warm-up turn for {(kind, S, T)} with {k} layers preloaded ran from "
                                     f"{res.source} with {res.preloaded_layers}")
            turns += 1
            engine.pool.drop(sid)
            spent = by_kind.setdefault(kind, [0, 0.0])
            spent[0], spent[1] = spent[0] + 1, round(spent[1] + time.perf_counter() - t_run, 3)
        t_tail = time.perf_counter()
        # The saves' row reads: every size a save during decode or at a turn's end may ask for.
        table = jnp.asarray(np.zeros(engine.state.tables.shape[1], np.int32))
        for size in sorted({bucket_length(n, minimum=ec.save_every) for n in range(1, ec.save_every + ec.decode_steps + 1)}):
            if ec.rope_mode == "naive":
                P.read_rows(engine.pool.pages, table, jnp.int32(0), size)
            else:
                P.read_decoded(engine.pool.pages, engine.state.raw_k, table, jnp.int32(0), jnp.int32(0), size)
        # The decode step at every batch size the loop may run (engine/slots.py, decode_buckets); every
        # slot is idle here, so the steps change nothing but the trash page.
        engine.state = SL.set_table(engine.state, jnp.int32(0), jnp.asarray(np.asarray(engine.state.tables)[0]))
        for b in SL.decode_buckets(ec.max_slots):
            engine.state, engine.pool.pages, _, _ = SL.generate(
                engine.params, engine.layers, mc, engine.state, engine.pool.pages, engine._stop_ids, ec.decode_steps,
                ec.return_logits, ec.rope_mode == "naive", active=b)
        if scratch is not None:
            scratch.flush()
        tail = time.perf_counter() - t_tail
    finally:
        engine.config = engine._ctx.engine_config = ec
        for sid in sids:
            engine.pool.drop(sid)
            engine.read_buffer.drop(sid)
        engine._swap_store(real)
        if scratch is not None:
            scratch.close()
    return {"turns": turns, "seconds": time.perf_counter() - t0, "skipped": skipped, "by_kind": by_kind,
            "tail_s": round(tail, 3)}
