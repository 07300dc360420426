"""Compile ahead: run the engine's programs once for the shapes a user's first turns will have.

A turn compiles its prefill programs once per (prompt bucket, history bucket, source), and the
decode step once per decode batch size (``slots.decode_buckets``). Without a warm-up those compiles land on the first turns' TTFT (a
fresh process once took 4.2 s to the first token of a conversation's second turn from host memory,
against 0.97 s for its first). :func:`warmup` runs real turns of scratch sessions through the
engine's own loop, so exactly the programs a turn runs are compiled (and, with JAX's persistent
compilation cache on, written to disk for the next process):

* ``new``: a first turn of each prompt length (the prefill without history, insert, the decode step,
  the saves of its new rows);
* ``host``: for each history length, a turn whose history is in the host tier (the in-program
  prefill that moves ``pinned_host`` blocks to the device), for each prompt length;
* ``device``: the next turn of the same session, its history in the device pool (a device hit);
* ``disk`` (only when asked): the same from the disk tier (the prefill split into several programs).

The scratch sessions live in a temporary in-memory store with the real store's layout and
settings, swapped in for the warm-up only; their pages go back to the pool afterwards. The read
buffer's rates measured on the way stay (they are this machine's).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jax_cachedattn.engine import programs as P
from jax_cachedattn.engine import slots as SL
from jax_cachedattn.engine.prefill import prompt_bucket_length
from jax_cachedattn.model import bucket_length
from jax_cachedattn.store import TieredStore

SOURCES = ("new", "host", "device", "disk")


def _history(store, sid: str, n: int, num_layers: int, kv_heads: int, head_dim: int, dtype) -> None:
    """A committed history of ``n`` zero tokens (zero KV) for ``sid``."""
    rows = np.zeros((2, n, kv_heads, head_dim), dtype)
    for layer in range(num_layers):
        store.save_layer(sid, layer, rows, start=0)
    store.commit_turn(sid, np.zeros(n, np.int32)).result()


def warmup(engine, prompt_lengths: Sequence[int], history_lengths: Sequence[int], sources: Sequence[str]) -> dict:
    """See the module docstring and :meth:`Engine.warmup`. Returns ``{"turns", "seconds"}``."""
    bad = sorted(set(sources) - set(SOURCES))
    if bad:
        raise ValueError(f"unknown warm-up sources {bad}; known: {', '.join(SOURCES)}")
    mc, ec = engine.model_config, engine.config
    if any(int(n) < 1 for n in prompt_lengths) or any(int(n) < 1 for n in history_lengths):
        raise ValueError("warm-up lengths must be >= 1")
    real = engine.store
    scratch = None
    if real is not None:
        cfg = dataclasses.replace(real.cfg, root=None, kvstore={"driver": "memory"}, disk_bytes=None)
        scratch = TieredStore(cfg, real.layout)
    t0, turns, sids = time.perf_counter(), 0, []
    tag = uuid.uuid4().hex[:12]  # never the id of a session of the engine's pool
    # Every turn generates enough tokens for a save during decode and a last, shorter one at the end.
    new = min(ec.save_every + ec.decode_steps + 1, ec.max_new_tokens)
    engine._swap_store(scratch)
    try:
        prompts = sorted({prompt_bucket_length(int(n), ec.prompt_bucket) for n in prompt_lengths})
        if "new" in sources or scratch is None:
            for T in prompts:
                sid = f"warmup-{tag}-new-{T}"
                sids.append(sid)
                engine.turn(sid, np.ones(T, np.int32), max_new_tokens=new)
                turns += 1
        if scratch is not None and {"host", "device", "disk"} & set(sources):
            for S in sorted({bucket_length(int(n)) for n in history_lengths}):
                for T in prompts:
                    # Room in the bucket for the host turn's prompt and reply, so the device turn's
                    # history (grown by them) is still in bucket S.
                    h = max(1, S - 2 * (T + new + 1))
                    h = h if bucket_length(h) == S else S
                    sid = f"warmup-{tag}-{S}-{T}"
                    sids.append(sid)
                    _history(scratch, sid, h, mc.num_layers, mc.num_kv_heads, mc.head_dim, mc.dtype)
                    if "disk" in sources:
                        scratch.flush()
                        engine.evict(sid, "host")
                        engine.turn(sid, np.ones(T, np.int32), max_new_tokens=new)
                        turns += 1
                    if "host" in sources or "device" in sources:
                        engine.evict(sid, "device")
                        engine.turn(sid, np.ones(T, np.int32), max_new_tokens=new)
                        turns += 1
                    if "device" in sources and ec.keep_pages and bucket_length(h + T + new) == S:
                        engine.turn(sid, np.ones(T, np.int32), max_new_tokens=new)
                        turns += 1
                    engine.pool.drop(sid)
        # The saves' row reads: every size a save during decode or at a turn's end may ask for.
        table = np.zeros(engine.state.tables.shape[1], np.int32)
        for size in sorted({bucket_length(n, minimum=ec.save_every) for n in range(1, ec.save_every + ec.decode_steps + 1)}):
            P.read_rows(engine.pool.pages, jnp.asarray(table), jnp.int32(0), size)
        # The decode step at every batch size the loop may run (engine/slots.py, decode_buckets); every
        # slot is idle here, so the steps change nothing but the trash page.
        engine.state = SL.set_table(engine.state, jnp.int32(0), jnp.asarray(np.asarray(engine.state.tables)[0]))
        for b in SL.decode_buckets(ec.max_slots):
            engine.state, engine.pool.pages, _, _ = SL.generate(
                engine.params, engine.layers, mc, engine.state, engine.pool.pages, engine._stop_ids, ec.decode_steps,
                ec.return_logits, ec.rope_mode == "naive", active=b)
        if scratch is not None:
            scratch.flush()
    finally:
        for sid in sids:
            engine.pool.drop(sid)
            engine.read_buffer.drop(sid)
        engine._swap_store(real)
        if scratch is not None:
            scratch.close()
    return {"turns": turns, "seconds": time.perf_counter() - t0}
