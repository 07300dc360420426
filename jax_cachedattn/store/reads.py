"""Reading a session's KV: `load_layer`, `layer_blocks`, `prefetch`, and bringing a session to the host tier.

A read first waits for its own layer's queued saves (read-your-writes), then takes the layer from
the device tier, the host tier, or a promotion from disk (started by the first read, layer by layer,
verified as it is read). Metadata is looked at under the lock; transfers and waits run outside it,
and a state that moved meanwhile (a rewind, a drop, an eviction) makes the read look again.
"""

from __future__ import annotations

import concurrent.futures as cf

import jax
import jax.numpy as jnp

from .core import Core
from .errors import KVLost, LayoutMismatch, StoreError, UnknownSession
from .lifecycle import Lifecycle, done_future
from .memory import Memory
from .promotion import Promoter
from .session import Session


def assemble_blocks(blocks: tuple[jax.Array, ...], off: jax.Array, n: jax.Array, pad_to: int) -> jax.Array:
    """blocks: nb x [2, B, K, D] -> [2, pad_to, K, D]: rows off..off+n of the concatenation, zeros after.

    Traceable: usable inside another jitted program (all blocks in one memory space)."""
    zeros = jnp.zeros((2, pad_to) + blocks[0].shape[2:], blocks[0].dtype)
    x = jnp.concatenate(list(blocks) + [zeros], axis=1)
    y = jax.lax.dynamic_slice_in_dim(x, off, pad_to, axis=1)
    keep = jnp.arange(pad_to) < n
    return jnp.where(keep[None, :, None, None], y, jnp.zeros_like(y))


_assemble = jax.jit(assemble_blocks, static_argnames=("pad_to",))


class Reader:
    def __init__(self, core: Core, mem: Memory, life: Lifecycle, promoter: Promoter):
        self.core, self.mem, self.life, self.promoter = core, mem, life, promoter
        self.io = cf.ThreadPoolExecutor(2, thread_name_prefix="kvstore-io")
        self.io_futs: list[cf.Future] = []  # promotions on the I/O pool (flush waits for them)

    def ensure_host(self, s: Session) -> None:
        """Bring ``s`` into the host tier (blocking)."""
        for attempt in range(3):
            with self.core.lock:
                if s.host is not None:
                    return
                if not s.kv_valid:
                    raise KVLost(f"session {s.sid!r} has no valid KV; recompute from its token ids")
                if s.gone:
                    raise UnknownSession(f"session {s.sid!r} was deleted")
                mine, p = self.promoter.claim(s)
            if mine:
                self.promoter.run(s, p)
            p.done.exception()  # wait
            if p.error is not None:
                raise p.error
        raise StoreError(f"session {s.sid!r} kept changing while it was read from disk")

    def _resolve_layer(self, sid: str, layer: int, pad_to: int | None):
        """``(s, src, blocks, off, n, pad, f, ver)``: src "device" (device blocks), "host"/"disk"
        (pinned_host blocks; "disk" = just promoted) or "empty"."""
        s = self.life.get(sid)
        core = self.core
        if not 0 <= layer < self.core.layout.num_layers:
            raise LayoutMismatch(f"layer {layer} out of range [0, {self.core.layout.num_layers})")
        with core.lock:
            task = s.layer_task.get(layer)
        if task is not None and not task.done():
            task.exception()  # read-your-writes: this layer's queued saves first (other layers run on)
        for attempt in range(3):
            with core.lock:
                if s.gone:
                    raise UnknownSession(f"unknown session {sid!r}")
                if not s.kv_valid:
                    raise KVLost(f"session {sid!r} has no valid KV; recompute from its token ids")
                n = s.num_tokens
                pad = n if pad_to is None else pad_to
                if pad < n:
                    raise LayoutMismatch(f"pad_to={pad_to} < num_tokens={n}")
                f, nb = self.mem.span(s)
                off = s.offset - f * core.B
                ver = (s.epoch, s.layer_ver.get(layer, 0))  # a device copy made from these blocks: stale if it moves
                pf, s.prefetch = s.prefetch, None
                if pf is not None and pf.done():
                    core.stats.add("prefetches_in_time")
                if nb <= f:
                    return s, "empty", (), off, n, pad, f, ver
                if s.device is not None:
                    dl = s.device.get(layer, f, nb)
                    if dl is not None:
                        return s, "device", dl, off, n, pad, f, ver
                if s.host is not None:
                    hl = s.host.get(layer, f, nb)
                    if hl is None:
                        # A turn committed in memory whose saves failed (or died) published nothing: its
                        # commit fails and rewinds the session. Wait for that, then look again.
                        waits = [t.done for t in s.log]
                        if not waits:
                            raise StoreError(f"session {sid!r} layer {layer}: the host tier misses blocks of the "
                                             "committed history (a bug)")
                        p = None
                    else:
                        core.stats.add("hits", tier="host")
                        came, blocks = "host", hl
                        break
                else:
                    mine, p = self.promoter.claim(s)
            if p is None:
                for w in waits:
                    w.exception()
                continue
            if mine:
                core.stats.add("prefetches_issued")
                self.track(self.io.submit(self.promoter.run, s, p))
            part = p.wait_layer(layer, sid)
            with core.lock:
                if part is None or p.epoch != s.epoch or s.gone or not s.kv_valid or self.mem.span(s)[1] != nb:
                    continue  # the session moved meanwhile: look again
            blocks = part[f:nb]
            core.stats.add("misses", tier="host")
            core.stats.add("hits", tier="disk")
            came = "disk"
            break
        else:
            raise StoreError(f"session {sid!r} kept changing while it was loaded")
        core.stats.add("bytes_read", len(blocks) * self.core.block_bytes, tier="host")
        core.policy.touch(sid, "host")
        return s, came, blocks, off, n, pad, f, ver

    def load_layer(self, sid: str, layer: int, pad_to: int | None = None) -> jax.Array:
        """``[2, pad_to or num_tokens, K, D]`` on the device; rows >= num_tokens are zeros.

        From the device or host tier the transfer is dispatched asynchronously. From disk, the first
        load starts a background promotion that reads every layer concurrently and verifies them in
        order; a load waits for its own layer only, and raises `KVLost` at the first layer whose
        checksum fails (layers verified before it were correct).
        """
        s, src, blocks, off, n, pad, f, ver = self._resolve_layer(sid, layer, pad_to)
        core = self.core
        if src == "empty":
            return jnp.zeros((2, pad, self.core.layout.kv_heads, self.core.layout.head_dim), self.core.layout.np_dtype, device=self.core.device)
        if src == "device":
            core.stats.add("hits", tier="device")
            core.stats.add("bytes_read", len(blocks) * self.core.block_bytes, tier="device")
            core.policy.touch(sid, "device")
        else:
            blocks = jax.device_put(list(blocks), core.dev_sharding)  # one batched transfer, outside the lock
            if self.core.budgets["device"].limit > 0:
                self._cache_on_device(s, layer, f, blocks, ver)
        return _assemble(tuple(blocks), jnp.int32(off), jnp.int32(n), pad)

    def _cache_on_device(self, s: Session, layer: int, f: int, blocks: list, ver: int) -> None:
        core = self.core
        res = self.life.take("device", len(blocks) * self.core.block_bytes, s, False)
        if res is None:
            return
        with res, core.lock:
            if s.gone or (s.epoch, s.layer_ver.get(layer, 0)) != ver or s.offset // core.B != f:
                return  # a save, rewind or truncation changed the layer meanwhile: this copy is stale
            t = self.mem.ensure_table(s, "device")
            self.mem.free(s, "device", t.drop_layer(layer))
            for i, blk in enumerate(blocks):
                self.mem.put(s, "device", layer, f + i, blk, res)
            core.stats.add("bytes_written", len(blocks) * self.core.block_bytes, tier="device")
        core.policy.touch(s.sid, "device")

    def layer_blocks(self, sid: str, layer: int) -> tuple[tuple[jax.Array, ...], int, int, str]:
        """``(blocks, offset, num_tokens, tier)``: the blocks ``[2, B, K, D]`` that hold ``layer``,
        where they are (``device`` or ``pinned_host`` memory for "host"/"disk"), the row of the first
        kept token in their concatenation, and the token count — for a jitted program that moves
        host blocks to the device itself (``store.assemble_blocks`` pads them). Waits like
        `load_layer` (own layer only); the device tier is not filled by this path."""
        s, src, blocks, off, n, pad, f, ver = self._resolve_layer(sid, layer, None)
        if src == "device":
            self.core.stats.add("hits", tier="device")
            self.core.policy.touch(sid, "device")
        return tuple(blocks), off, n, src

    def prefetch(self, sid: str) -> cf.Future:
        """Start reading the session disk -> host; returns a future at once."""
        s = self.life.get(sid)
        core = self.core
        with core.lock:
            if s.host is not None or not s.kv_valid:
                return done_future(None)
            if s.prefetch is not None and not s.prefetch.done():
                return s.prefetch
            mine, p = self.promoter.claim(s)
            s.prefetch = p.done
            if not mine:
                return p.done
            core.stats.add("prefetches_issued")
        self.track(self.io.submit(self.promoter.run, s, p))
        return p.done

    def track(self, fut: cf.Future) -> None:
        """Remember a promotion running on the I/O pool (flush waits for it, even if its session goes)."""
        with self.core.lock:
            self.io_futs = [f for f in self.io_futs if not f.done()] + [fut]
