"""The device KV pool: pages of ``EngineConfig.page_size`` rows, an allocator, and the device cache.

One array per layer, ``[2, P, B, K, Dh]`` (keys at 0, values at 1; B = the page size). Rows go in
and out through block tables one row at a time, so a page need not be a store block (the default
page, 16 rows, is smaller than the store's 64-token block: a session's last page wastes less). Page 0 is the trash page:
idle decode slots and padded rows write there, and it is never handed out.

A slot's session owns the pages of its block table while it decodes. When its turn commits, the
pages stay in the pool as that session's device copy (tagged with the turn and token count it
holds); the next turn of the session finds them in place (a device hit: no copy). Under pressure
the least recently used cached sessions give their pages back. Device memory therefore grows with
the tokens held, not with slots x context. A decoding slot holds the pages its rows fill (and those
of the next dispatch); the rest of its reply budget is *promised* (``promise``), allocated page by
page as the reply grows: a new job is admitted only if the pool holds its whole budget beside every
promise, so a growing slot never finds the pool empty (it evicts cached sessions if it must).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


class PoolFull(RuntimeError):
    """No free pages, even after evicting every cached session: a job must wait for a slot."""


@dataclasses.dataclass
class CachedPages:
    """A finished session's pages, valid for the store state ``(turn, num_tokens)``."""

    pages: list[int]
    turn: int
    num_tokens: int
    ready: bool = True  # False while a preload is still writing its layers
    preloaded: bool = False  # written ahead of the session's turn from host memory (engine/pool_preload.py)


class PagePool:
    """Pages on the device and their accounting (host-side metadata, one owner at a time)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype, page_size: int, num_pages: int,
                 device=None):
        if num_pages < 2:
            raise ValueError(f"the pool needs at least 2 pages (one is the trash page), got {num_pages}")
        self.page_size, self.num_pages = page_size, num_pages
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype = jnp.dtype(dtype)
        shape = (2, num_pages, page_size, kv_heads, head_dim)
        sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
        self.pages: tuple[jax.Array, ...] = tuple(
            jax.device_put(jnp.zeros(shape, self.dtype), sharding) for _ in range(num_layers))
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._cached: collections.OrderedDict[str, CachedPages] = collections.OrderedDict()  # LRU first
        self.stats = collections.Counter()
        self.promised = 0  # pages promised to decoding slots, handed out as their replies grow

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def page_bytes(self) -> int:
        return len(self.pages) * 2 * self.page_size * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def capacity_bytes(self) -> int:
        return (self.num_pages - 1) * self.page_bytes

    def used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def used_bytes(self) -> int:
        """Bytes of the pages handed out (slots' and cached sessions')."""
        return self.used_pages() * self.page_bytes

    def free_pages(self, *, evictable: bool = True) -> int:
        return len(self._free) + (sum(len(c.pages) for c in self._cached.values()) if evictable else 0)

    def available(self) -> int:
        """Pages a new job may reserve: free or evictable, less those promised to decoding slots."""
        return self.free_pages() - self.promised

    def promise(self, n: int) -> None:
        """Promise ``n`` pages to a decoding slot (allocated later, as its reply grows)."""
        self.promised += n

    def settle(self, n: int) -> None:
        """``n`` promised pages were allocated, or are no longer needed."""
        if not 0 <= n <= self.promised:
            raise ValueError(f"settling {n} of {self.promised} promised pages")
        self.promised -= n

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ---- allocation ---------------------------------------------------------------------------
    def alloc(self, n: int, *, keep: str | None = None) -> list[int]:
        """``n`` free pages, evicting least recently used cached sessions (never ``keep``) as needed."""
        if n > self.free_pages() - (len(self._cached[keep].pages) if keep in self._cached else 0):
            raise PoolFull(f"{n} pages wanted, {len(self._free)} free and "
                           f"{self.free_pages() - len(self._free)} held by cached sessions")
        while len(self._free) < n:
            victim = next(s for s in self._cached if s != keep)
            c = self._cached.pop(victim)
            self.release(c.pages)
            self.stats["evictions"] += 1
            self.stats["preloads_dropped"] += c.preloaded
        out = [self._free.pop() for _ in range(n)]
        return out

    def release(self, pages: list[int]) -> None:
        if any(p <= 0 or p >= self.num_pages for p in pages):
            raise ValueError(f"page ids out of range: {pages}")
        self._free.extend(reversed(pages))

    # ---- the device cache of finished sessions ---------------------------------------------------
    def retain(self, sid: str, pages: list[int], turn: int, num_tokens: int) -> None:
        """Keep a finished turn's pages as ``sid``'s device copy (only the pages its tokens fill)."""
        self.drop(sid)
        keep = self.pages_for(num_tokens)
        self.release(pages[keep:])
        self._cached[sid] = CachedPages(list(pages[:keep]), turn, num_tokens)

    def take(self, sid: str, turn: int, num_tokens: int) -> list[int] | None:
        """The cached pages of ``sid`` if they hold exactly the store's ``(turn, num_tokens)``; the
        caller owns them from now on. Stale copies are freed and None returned."""
        c = self._cached.pop(sid, None)
        if c is None:
            return None
        if (c.turn, c.num_tokens) != (turn, num_tokens) or not c.ready:
            self.release(c.pages)
            self.stats["stale"] += 1
            self.stats["preloads_dropped"] += c.preloaded
            return None
        self.stats["hits"] += 1
        self.stats["preload_hits"] += c.preloaded
        return c.pages

    def holds(self, sid: str, turn: int, num_tokens: int) -> bool:
        c = self._cached.get(sid)
        return c is not None and c.ready and (c.turn, c.num_tokens) == (turn, num_tokens)

    def entry(self, sid: str) -> CachedPages | None:
        """``sid``'s cached copy (ready or being preloaded), or None."""
        return self._cached.get(sid)

    def preloading(self, sid: str, pages: list[int], turn: int, num_tokens: int) -> CachedPages:
        """Register ``pages`` (exactly those ``num_tokens`` fill) as ``sid``'s copy for the store state
        ``(turn, num_tokens)``, being written: not ``ready`` (``holds`` says no) until the writer sets ``ready``, evictable from
        now on. Returns the entry (the writer checks it is still the session's before each write)."""
        self.drop(sid)
        if len(pages) != self.pages_for(num_tokens):
            raise ValueError(f"{len(pages)} pages for {num_tokens} tokens")
        c = self._cached[sid] = CachedPages(list(pages), turn, num_tokens, ready=False, preloaded=True)
        return c

    def drop(self, sid: str) -> None:
        c = self._cached.pop(sid, None)
        if c is not None:
            self.release(c.pages)
            self.stats["preloads_dropped"] += c.preloaded

    def cached_tokens(self) -> int:
        return sum(c.num_tokens for c in self._cached.values())


def block_table(pages: list[int], width: int) -> np.ndarray:
    """A slot's block table ``[width]`` int32: its pages, then the trash page 0."""
    if len(pages) > width:
        raise ValueError(f"{len(pages)} pages do not fit a block table of {width}")
    t = np.zeros(width, np.int32)
    t[: len(pages)] = pages
    return t
