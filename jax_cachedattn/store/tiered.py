"""`TieredStore`: device -> host (pinned_host) -> disk (TensorStore) session KV store.

Representation (the same in the two memory tiers): per session, per layer, a list of token blocks,
each a ``[2, B, K, D]`` array (B = ``token_block``; the last block zero-padded), in the device's
default memory (device tier) or in ``pinned_host`` memory (host tier). Block i of a layer holds the
absolute tokens ``[i*B, (i+1)*B)``; blocks wholly before the front-truncation offset are dropped.
A save rewrites only the blocks it touches; a load moves the layer's blocks to the device
(async ``device_put``) and one jitted ``_assemble`` concatenates, shifts by the offset and zero-pads
to ``pad_to`` (one compilation per (number of blocks, pad_to)). On disk a block is one zarr3 chunk,
so writes are whole chunks (no read-modify-write) and the array grows by resize.

Tiers are inclusive: a save goes to the host tier and is written through to disk; the device tier
is a cache filled by `load_layer`. Eviction from device or host only drops a copy (after the data's
disk writes have committed); eviction from disk deletes the session. The host tier must be able to
hold the biggest session (every save passes through it); a session larger than the device budget is
simply not cached on the device.

Threads: one worker runs saves in order (waits for device->host copies, fills host blocks, issues
TensorStore writes); one committer waits for a turn's writes to commit and then writes its manifest;
an I/O pool runs prefetches. Metadata is guarded by one lock; no lock is held while waiting on I/O
except short TensorStore metadata calls.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import functools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .disk import STORE_FORMAT, DiskTier, ManifestCorrupt, wrap_disk_error
from .errors import BudgetError, DiskFull, FingerprintMismatch, KVLost, LayoutMismatch, StoreError, UnknownSession
from .layout import KVLayout, SessionInfo, StoreConfig, validate_session_id
from .policy import EvictionPolicy, LRUPolicy
from .stats import StoreStats

TIERS = ("device", "host", "disk")


def assemble_blocks(blocks: tuple[jax.Array, ...], off: jax.Array, n: jax.Array, pad_to: int) -> jax.Array:
    """blocks: nb x [2, B, K, D] -> [2, pad_to, K, D]: rows off..off+n of the concatenation, zeros after.

    Traceable: usable inside another jitted program (all blocks in one memory space)."""
    zeros = jnp.zeros((2, pad_to) + blocks[0].shape[2:], blocks[0].dtype)
    x = jnp.concatenate(list(blocks) + [zeros], axis=1)
    y = jax.lax.dynamic_slice_in_dim(x, off, pad_to, axis=1)
    keep = jnp.arange(pad_to) < n
    return jnp.where(keep[None, :, None, None], y, jnp.zeros_like(y))


_assemble = jax.jit(assemble_blocks, static_argnames=("pad_to",))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _aligned_empty(shape: tuple, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    On the CPU a ``pinned_host`` (or device) array made from an aligned NumPy buffer aliases it
    instead of copying it (``jax.device_put(..., may_alias=True)``); on a GPU the copy into pinned
    memory happens either way."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass
class _Session:
    sid: str
    offset: int = 0  # absolute index of the first kept token
    end: int = 0  # absolute end of the committed (in-memory) history
    turn: int = 0
    token_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))
    kv_valid: bool = True
    # durable state (last manifest on disk): used to roll back after a failed commit
    durable: dict | None = None
    pend: list[int] | None = None  # per-layer absolute end of saved (maybe uncommitted) data
    host: list[list[Any]] | None = None  # [layer][block] pinned_host arrays (None: dropped front)
    host_bytes: int = 0
    device: list[list[Any] | None] | None = None  # [layer] -> blocks on device or None
    device_bytes: int = 0
    disk_blocks: int = 0  # allocated array length in blocks
    writes: list[Any] = dataclasses.field(default_factory=list)  # TensorStore commit futures
    tailw: dict = dataclasses.field(default_factory=dict)  # layer -> (last block, commit future) of its last write
    queued: int = 0  # worker tasks not yet run
    last_task: cf.Future | None = None
    layer_task: dict = dataclasses.field(default_factory=dict)  # layer -> its last save task
    last_commit: cf.Future | None = None
    promoting: cf.Future | None = None
    # Layer-wise progress of a disk -> host promotion: loads of layer l wait for layer l only.
    partial: list | None = None  # [layer] -> host blocks once verified
    partial_ev: list | None = None  # [layer] -> threading.Event
    partial_err: list | None = None  # [error or None], shared with waiters
    prefetch: cf.Future | None = None
    open_turn: "_Turn | None" = None  # the turn being saved (since the last commit_turn)


class _Turn:
    """A turn's saves carry it; once ``dead`` (aborted), queued saves of the turn do nothing."""

    __slots__ = ("dead",)

    def __init__(self) -> None:
        self.dead = False


class _Done(cf.Future):
    def __init__(self, value=None):
        super().__init__()
        self.set_result(value)


class TieredStore:
    """Session KV store over device, host and disk tiers. See the module docstring."""

    READ_AHEAD_BYTES = 32 << 20  # disk reads in flight ahead of the layer being consumed (at least 2 layers):
    # a small window makes the first layers land first (layer-wise loading from disk) at no cost in throughput
    WRITE_INFLIGHT_BYTES = 256 << 20  # disk writes not yet committed before the save worker waits

    def __init__(self, cfg: StoreConfig, layout: KVLayout, policy: EvictionPolicy | None = None, *, device=None):
        self.cfg, self.layout = cfg, layout
        self.policy: EvictionPolicy = policy or LRUPolicy()
        self.stats = StoreStats()
        self.device = device or jax.devices()[0]
        self._dev = jax.sharding.SingleDeviceSharding(self.device)
        self._host = jax.sharding.SingleDeviceSharding(self.device, memory_kind=cfg.memory_kind)
        B = cfg.token_block
        self.block_bytes = B * layout.bytes_per_token_layer
        self.used = {t: 0 for t in TIERS}
        self.budget = {"device": cfg.device_bytes, "host": cfg.host_bytes, "disk": cfg.disk_bytes}
        if cfg.host_bytes < layout.num_layers * self.block_bytes:
            raise BudgetError(
                f"host_bytes={cfg.host_bytes} is smaller than one session of one block "
                f"({layout.num_layers * self.block_bytes} bytes = {layout.num_layers} layers x {B} tokens)"
            )
        if cfg.disk_bytes is not None and cfg.disk_bytes < layout.num_layers * self.block_bytes:
            raise BudgetError(f"disk_bytes={cfg.disk_bytes} is smaller than one session of one block")
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._closed = False
        self._errors: list[BaseException] = []
        self.disk = DiskTier(cfg, layout)
        self._adopting = False  # set by _check_store_meta: keep token ids, drop the KV of every session
        self._check_store_meta()
        self._recover()
        self._worker = cf.ThreadPoolExecutor(1, thread_name_prefix="kvstore-save")
        self._inflight: collections.deque = collections.deque()  # (bytes, commit future), save worker only
        self._inflight_bytes = 0
        self._committer = cf.ThreadPoolExecutor(1, thread_name_prefix="kvstore-commit")
        self._io = cf.ThreadPoolExecutor(2, thread_name_prefix="kvstore-io")

    # ================================================================ open / recovery
    def _check_store_meta(self) -> None:
        import json

        want = {"format": STORE_FORMAT, "layout": self.layout.to_json(), "token_block": self.cfg.token_block}
        raw = self.disk.read_key("store.json")
        if raw is not None:
            try:
                have = json.loads(raw)
            except ValueError:
                have = None
            if have != want:
                if self.cfg.keep_tokens_on_mismatch:
                    self._adopting = True
                elif not self.cfg.wipe_on_mismatch:
                    raise FingerprintMismatch(
                        f"the store holds KV of another model, layout or store format: {have!r} != {want!r} "
                        "(set StoreConfig.wipe_on_mismatch=True to delete it, or keep_tokens_on_mismatch=True "
                        "to keep the conversations and recompute their KV)"
                    )
                else:
                    self.disk.delete_prefix("s/")
        self.disk.write_key("store.json", json.dumps(want, sort_keys=True).encode()).result()

    def _recover(self) -> None:
        with_manifest, with_data = self.disk.session_ids()
        for sid in sorted(with_data - with_manifest):  # a first turn that never committed
            self.disk.delete_prefix(f"s/{sid}/")
            self.stats.add("recoveries")
        L, B = self.layout.num_layers, self.cfg.token_block
        for sid in sorted(with_manifest):
            try:
                m = self.disk.read_manifest(sid)
            except ManifestCorrupt:
                self.stats.add("checksum_failures")
                self.disk.delete_session(sid)
                continue
            foreign = m.get("fingerprint") != self.layout.fingerprint or m.get("dtype", self.layout.dtype) != self.layout.dtype
            if foreign and not self._adopting:
                raise FingerprintMismatch(f"session {sid!r} was made by model {m.get('fingerprint')!r}")
            # Adopting a folder of another model, layout, token block or format: keep the token ids
            # of every session, never its KV.
            foreign = foreign or self._adopting
            s = _Session(
                sid, offset=m["offset"], end=m["end"], turn=m["turn"],
                token_ids=np.asarray(m["token_ids"], np.int32), kv_valid=m["kv_valid"],
            )
            s.durable = m
            if foreign:
                # Another model's KV is never served; the conversation (token ids) is kept.
                s.offset, s.end = 0, len(s.token_ids)
                self._mark_lost(s, write=True)
                self._sessions[sid] = s
                continue
            if s.kv_valid:
                cap = self.disk.capacity_blocks(sid)
                need = _ceil_div(s.end, B)
                if cap is None or cap < need:
                    self._mark_lost(s, write=True)
                else:
                    s.disk_blocks = cap
                    if cap > need:  # an uncommitted tail of a turn that did not commit
                        self.stats.add("recoveries")
            self._sessions[sid] = s
            self.used["disk"] += L * s.disk_blocks * self.block_bytes
            self.policy.touch(sid, "disk")
            if self.cfg.verify_on_open and s.kv_valid:
                try:
                    self._read_verified(s)
                except KVLost:
                    pass

    # ================================================================ helpers
    def _get(self, sid: str) -> _Session:
        validate_session_id(sid)
        if self._closed:
            raise StoreError("the store is closed")
        s = self._sessions.get(sid)
        if s is None:
            raise UnknownSession(f"unknown session {sid!r}")
        return s

    def _manifest_body(self, s: _Session, snap: dict | None = None) -> dict:
        """Manifest of ``s``; ``snap`` (offset, end, turn, token_ids) pins the turn being published."""
        snap = snap or self._snap(s)
        return {
            "fingerprint": self.layout.fingerprint, **snap, "kv_valid": s.kv_valid,
            "token_block": self.cfg.token_block, "dtype": self.layout.dtype,
        }

    @staticmethod
    def _snap(s: _Session) -> dict:
        return {"offset": s.offset, "end": s.end, "turn": s.turn, "token_ids": [int(t) for t in s.token_ids]}

    def _mark_lost(self, s: _Session, write: bool) -> None:
        """Drop the KV of ``s`` everywhere, keep its token ids; count a checksum failure."""
        self.stats.add("checksum_failures")
        with self._lock:
            s.kv_valid = False
            self._drop_copy(s, "device")
            self._drop_copy(s, "host")
            self.used["disk"] -= self.layout.num_layers * s.disk_blocks * self.block_bytes
            s.disk_blocks = 0
        if write:
            self.disk.write_manifest(s.sid, self._manifest_body(s)).result()
        self.disk.delete_data(s.sid)

    def _tier_of(self, s: _Session) -> str | None:
        if not s.kv_valid:
            return None
        if s.device is not None and all(d is not None for d in s.device):
            return "device"
        if s.host is not None:
            return "host"
        return "disk"

    def _drop_copy(self, s: _Session, tier: str) -> None:
        if tier == "device" and s.device is not None:
            self.used["device"] -= s.device_bytes
            s.device, s.device_bytes = None, 0
            self.policy.forget(s.sid, "device")
        elif tier == "host" and s.host is not None:
            self.used["host"] -= s.host_bytes
            s.host, s.host_bytes = None, 0
            s.partial = s.partial_ev = s.partial_err = None
            self.policy.forget(s.sid, "host")

    def _busy(self, s: _Session) -> bool:
        return (
            s.queued > 0 or s.pend is not None or any(not w.done() for w in s.writes)
            or any(f is not None and not f.done() for f in (s.promoting, s.last_commit))
        )

    def _reserve(self, tier: str, nbytes: int, owner: _Session, *, required: bool) -> bool:
        """Make room for ``nbytes`` in ``tier`` by evicting other sessions; True if reserved.

        With ``required`` a failure raises (BudgetError / DiskFull) after waiting for in-flight work.
        """
        budget = self.budget[tier]
        if budget is None:
            with self._lock:
                self.used[tier] += nbytes
            return True
        err = DiskFull if tier == "disk" else BudgetError
        for attempt in range(3):
            with self._lock:
                if self.used[tier] + nbytes <= budget:
                    self.used[tier] += nbytes
                    return True
                held = {"device": "device_bytes", "host": "host_bytes"}.get(tier)
                mine = getattr(owner, held) if held else self.layout.num_layers * owner.disk_blocks * self.block_bytes
                if mine + nbytes > budget:
                    if required:
                        raise err(f"session {owner.sid!r} needs {mine + nbytes} bytes, more than the {tier} budget ({budget})")
                    return False
                cands = [
                    sid for sid, o in self._sessions.items()
                    if o is not owner and not self._busy(o) and self._holds(o, tier)
                ]
                for sid in self.policy.choose_victims(cands, tier):
                    if self.used[tier] + nbytes <= budget:
                        break
                    self._evict_locked(self._sessions[sid], tier)
                if self.used[tier] + nbytes <= budget:
                    self.used[tier] += nbytes
                    return True
                if not required:
                    return False
            self._wait_all_io(exclude=owner)  # other sessions' writes may free victims
        raise err(f"no room in the {tier} tier for {nbytes} more bytes of session {owner.sid!r} "
                  f"(budget {budget}, used {self.used[tier]}, nothing evictable)")

    def _holds(self, s: _Session, tier: str) -> bool:
        if tier == "device":
            return s.device is not None
        if tier == "host":
            return s.host is not None
        return s.disk_blocks > 0 or not s.kv_valid

    def _evict_locked(self, s: _Session, tier: str) -> None:
        self.stats.add("evictions", tier=tier)
        if tier == "disk":
            self._delete_locked(s)
        else:
            self._drop_copy(s, tier)

    def _delete_locked(self, s: _Session) -> None:
        self._drop_copy(s, "device")
        self._drop_copy(s, "host")
        self.used["disk"] -= self.layout.num_layers * s.disk_blocks * self.block_bytes
        s.disk_blocks = 0
        self._sessions.pop(s.sid, None)
        self.policy.forget(s.sid)
        self.disk.delete_session(s.sid)

    def _wait_all_io(self, exclude: _Session | None = None) -> None:
        with self._lock:
            futs = [f for o in self._sessions.values() if o is not exclude for f in (o.last_task, o.last_commit) if f]
            writes = [w for o in self._sessions.values() if o is not exclude for w in o.writes]
        for f in futs:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - reported by commit futures / flush
                pass
        for w in writes:
            try:
                w.result()
            except Exception:  # noqa: BLE001
                pass

    # ================================================================ disk -> host
    def _read_verified(self, s: _Session, publish=None) -> list[list[Any]]:
        """Read all committed blocks of ``s`` from disk into host blocks [layer][block].

        Each layer's chunks are decoded by TensorStore straight into one 64-byte aligned buffer
        ``[nb, 2, B, K, D]`` (one copy: TensorStore checks each chunk's crc32c while decoding it, in its
        own threads; a missing, short or damaged chunk raises), whose blocks then go to ``pinned_host``
        in one batched ``device_put`` (on the CPU the arrays alias the buffer: no second copy).
        Reads are issued a bounded number of bytes ahead of their consumption and layers are handed
        to ``publish(layer, blocks)`` in layer order, so a load of layer 0 does not wait for layer L-1.
        """
        B, L = self.cfg.token_block, self.layout.num_layers
        f, nb = s.offset // B, _ceil_div(s.end, B)
        blocks: list[list[Any]] = [[None] * nb for _ in range(L)]
        if nb <= f:
            return blocks

        pending: list = []  # [layer] -> (buffer, TensorStore futures), None once consumed

        def quiesce():
            # Reads still in flight keep TensorStore's handle (and cached metadata) of the array
            # alive; let them finish before the damaged data is deleted, or a re-save of the session
            # can open the deleted array through that stale handle.
            futs = [fu for p in pending if p is not None for fu in p[1]]
            for fu in futs:
                fu.cancel()
            for fu in futs:
                try:
                    fu.result()
                except BaseException:  # noqa: BLE001 - cancelled or failed: either way finished
                    pass

        def lost(e):
            quiesce()
            self._mark_lost(s, write=True)
            return KVLost(f"session {s.sid!r}: KV unreadable or damaged on disk ({e}); recompute from its token ids")

        try:
            arr = self.disk.array(s.sid)
        except Exception as e:  # noqa: BLE001 - missing/undecodable array = damaged
            raise lost(e) from e

        lay = self.layout

        def issue(layer):
            buf = _aligned_empty((nb - f, 2, B, lay.kv_heads, lay.head_dim), lay.np_dtype)
            return buf, [self.disk.read_block_into(arr, layer, b, buf[i]) for i, b in enumerate(range(f, nb))]

        layer_bytes = (nb - f) * self.block_bytes
        ahead = max(2, min(L, self.READ_AHEAD_BYTES // max(1, layer_bytes)))
        nxt = 0
        try:
            for layer in range(L):
                while nxt < L and nxt < layer + ahead:
                    pending.append(issue(nxt))
                    nxt += 1
                (buf, futs), pending[layer] = pending[layer], None
                try:
                    for fu in futs:
                        fu.result()
                except Exception as e:  # noqa: BLE001 - missing, short or damaged chunk
                    pending[layer] = (buf, futs)
                    raise lost(e) from e
                val = jax.device_put(list(buf), self._host, may_alias=True)
                self.stats.add("bytes_read", len(val) * self.block_bytes, tier="disk")
                blocks[layer][f:nb] = val
                if publish is not None:
                    publish(layer, blocks[layer])
        except BaseException:
            for p in pending:
                for fu in (p[1] if p is not None else ()):
                    fu.cancel()
            raise
        return blocks

    def _claim_promotion(self, s: _Session) -> tuple[bool, cf.Future | None]:
        """Under the lock: (True, fut) if the caller must run the promotion, (False, fut) if one runs."""
        fut = s.promoting
        if fut is not None and not fut.done():
            return False, fut
        fut = s.promoting = cf.Future()
        L = self.layout.num_layers
        s.partial, s.partial_ev, s.partial_err = [None] * L, [threading.Event() for _ in range(L)], [None]
        return True, fut

    def _ensure_host(self, s: _Session) -> str:
        """Bring ``s`` into the host tier (blocking); returns the tier it came from."""
        with self._lock:
            if s.host is not None:
                return "host"
            if not s.kv_valid:
                raise KVLost(f"session {s.sid!r} has no valid KV; recompute from its token ids")
            mine, fut = self._claim_promotion(s)
        if not mine:
            fut.result()
            return "disk"
        self._promote(s, fut)
        return "disk"

    def _promote(self, s: _Session, fut: cf.Future) -> None:
        """Read ``s`` disk -> host layer by layer, publishing each verified layer; resolves ``fut``."""
        with self._lock:
            part, evs, err = s.partial, s.partial_ev, s.partial_err

        def publish(layer: int, blocks: list) -> None:
            part[layer] = blocks
            evs[layer].set()

        try:
            B = self.cfg.token_block
            nbytes = self.layout.num_layers * (_ceil_div(s.end, B) - s.offset // B) * self.block_bytes
            try:
                self._reserve("host", nbytes, s, required=True)
                try:
                    blocks = self._read_verified(s, publish)
                except BaseException:
                    with self._lock:
                        self.used["host"] -= nbytes
                    raise
            except BaseException as e:
                err[0] = e
                raise
            finally:
                for ev in evs:
                    ev.set()
            with self._lock:
                s.host, s.host_bytes = blocks, nbytes
                self.stats.add("bytes_written", nbytes, tier="host")
            self.policy.touch(s.sid, "host")
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
            raise

    # ================================================================ public API
    def sessions(self) -> list[str]:
        with self._lock:
            return sorted(self._sessions)

    def lookup(self, sid: str) -> SessionInfo | None:
        """The session's state, or None when it is not in the store."""
        validate_session_id(sid)
        with self._lock:
            s = self._sessions.get(sid)
            if s is None:
                return None
            durable = s.durable is not None and s.durable.get("turn") == s.turn and s.durable.get("offset") == s.offset
            return SessionInfo(sid, self._tier_of(s), s.end - s.offset, s.turn, s.token_ids.copy(), s.kv_valid, durable)

    def save_layer(self, sid: str, layer: int, kv_new, start: int) -> None:
        """Save tokens ``[start, start+n)`` of ``layer`` (``kv_new``: [2, n, K, D]); returns at once.

        ``start`` is relative to the kept history and must continue what this layer already holds
        (``start == num_tokens`` at the first save of a turn, ``0`` for a new or KV-lost session).
        Errors of the asynchronous part surface in `commit_turn`'s future and in `flush`.
        """
        validate_session_id(sid)
        lay = self.layout
        if not 0 <= layer < lay.num_layers:
            raise LayoutMismatch(f"layer {layer} out of range [0, {lay.num_layers})")
        shape = tuple(kv_new.shape)
        if len(shape) != 4 or shape[0] != 2 or shape[2:] != (lay.kv_heads, lay.head_dim):
            raise LayoutMismatch(f"kv_new has shape {shape}, expected [2, n, {lay.kv_heads}, {lay.head_dim}]")
        if np.dtype(kv_new.dtype) != lay.np_dtype:
            raise LayoutMismatch(f"kv_new has dtype {kv_new.dtype}, expected {lay.dtype}")
        n = shape[1]
        if isinstance(kv_new, jax.Array):
            try:
                kv_new.copy_to_host_async()
            except Exception:  # noqa: BLE001 - already on host / not supported: np.asarray copes
                pass
        B, L = self.cfg.token_block, lay.num_layers
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed")
            s = self._sessions.get(sid)
            if s is None:
                if start != 0:
                    raise UnknownSession(f"unknown session {sid!r} (a new session starts at 0, got {start})")
                s = self._sessions[sid] = _Session(sid)
                s.host, s.host_bytes = [[] for _ in range(L)], 0
            elif not s.kv_valid and s.pend is None:
                if start != 0:
                    # KVLost, not LayoutMismatch: a reader may find the damage between a caller's
                    # successful load of an earlier layer and its save; either way: recompute, save from 0.
                    raise KVLost(f"session {sid!r} lost its KV (a chunk failed its checksum): recompute it from "
                                 f"its token ids and save it again from start=0")
                s.offset, s.end, s.kv_valid = 0, 0, True
                s.host, s.host_bytes = [[] for _ in range(L)], 0
            need_host = s.host is None
        if need_host:
            self._ensure_host(s)  # saving on a session that left host: read it back first (blocking)
        with self._lock:
            if s.pend is None:
                s.pend = [s.end] * L
                s.open_turn = _Turn()
            turn = s.open_turn
            a0 = s.offset + start
            if a0 != s.pend[layer]:
                raise LayoutMismatch(
                    f"session {sid!r} layer {layer}: save starts at token {start}, expected {s.pend[layer] - s.offset}"
                )
            if n == 0:
                return
            a1 = a0 + n
            nb_new = _ceil_div(a1, B)
            grow = max(0, nb_new - len(s.host[layer]))
            s.pend[layer] = a1
            s.queued += 1
        try:
            if grow:
                self._reserve("host", grow * self.block_bytes, s, required=True)
                with self._lock:
                    s.host_bytes += grow * self.block_bytes
            if nb_new > s.disk_blocks:
                extra = nb_new - s.disk_blocks
                self._reserve("disk", L * extra * self.block_bytes, s, required=True)
                with self._lock:
                    s.disk_blocks = nb_new
                self.disk.resize(sid, nb_new)
            dgrow = 0
            with self._lock:
                if s.device is not None and s.device[layer] is not None:
                    dgrow = max(0, nb_new - len(s.device[layer]))
            if dgrow and not self._reserve("device", dgrow * self.block_bytes, s, required=False):
                with self._lock:
                    self._drop_copy(s, "device")
            elif dgrow:
                with self._lock:
                    if s.device is not None:
                        s.device_bytes += dgrow * self.block_bytes
                    else:
                        self.used["device"] -= dgrow * self.block_bytes
        except BaseException:
            with self._lock:
                s.pend[layer] = a0
                s.queued -= 1
                if s.durable is None and s.end == 0 and not any(s.pend) and not s.queued:
                    self._drop_copy(s, "host")  # a new session whose first save failed: forget it
                    self._sessions.pop(s.sid, None)
            raise
        with self._lock:
            s.last_task = s.layer_task[layer] = self._worker.submit(self._do_save, s, layer, kv_new, a0, a1, turn)
        self.policy.touch(sid, "host")

    def _do_save(self, s: _Session, layer: int, kv_new, a0: int, a1: int, turn: _Turn) -> None:
        B = self.cfg.token_block
        try:
            if turn.dead:  # its turn was aborted: nothing to do
                return
            x = np.asarray(kv_new)  # waits for the device -> host copy
            b0, b1 = a0 // B, _ceil_div(a1, B)
            # The touched blocks packed once into one 64-byte aligned buffer [nb, 2, B, K, D]: every block
            # is then contiguous, TensorStore encodes it without copying it first, and on the CPU its
            # pinned_host array aliases it. A partial block (a turn's first or last) is merged with
            # what the host tier holds; rows past the new tokens are zeros (or the old block's).
            new_blocks = _aligned_empty((b1 - b0, 2, B) + x.shape[2:], x.dtype)
            for i, b in enumerate(range(b0, b1)):
                lo, hi = max(a0, b * B), min(a1, (b + 1) * B)
                if lo > b * B or hi < (b + 1) * B:
                    with self._lock:
                        hl = s.host[layer] if s.host is not None else []
                        old = hl[b] if b < len(hl) else None
                    if old is not None:
                        new_blocks[i] = np.asarray(old)
                    else:
                        new_blocks[i] = 0
                new_blocks[i, :, lo - b * B : hi - b * B] = x[:, lo - a0 : hi - a0]
            prev = s.tailw.get(layer)
            if prev is not None and prev[0] >= b0:
                prev[1].result()  # two writes of one chunk in flight may land out of order: serialize
            ws = []
            for i, b in enumerate(range(b0, b1)):
                w = self.disk.write_block(s.sid, layer, b, new_blocks[i])
                ws.append(w)
                self._inflight.append((self.block_bytes, w.commit))
                self._inflight_bytes += self.block_bytes
            self.stats.add("bytes_written", new_blocks.nbytes, tier="disk")
            self.stats.add("bytes_written", x.nbytes, tier="host")
            hblocks = jax.device_put(list(new_blocks), self._host, may_alias=True)  # one batched call
            with self._lock:
                if turn.dead:
                    s.tailw[layer] = (b1 - 1, ws[-1].commit)  # later writes of these chunks still wait for it
                    return
                if s.host is not None:
                    hl = s.host[layer]
                    for i, b in enumerate(range(b0, b1)):
                        if b < len(hl):
                            hl[b] = hblocks[i]
                        else:
                            hl.append(hblocks[i])
                if s.device is not None and s.device[layer] is not None:
                    dl = s.device[layer]
                    for i, b in enumerate(range(b0, b1)):
                        d = jax.device_put(new_blocks[i], self._dev)
                        if b < len(dl):
                            dl[b] = d
                        else:
                            dl.append(d)
                s.writes.extend(w.commit for w in ws)
                s.tailw[layer] = (b1 - 1, ws[-1].commit)
            # Bound the bytes of writes issued but not committed (each holds TensorStore chunk buffers).
            while self._inflight and self._inflight[0][1].done():
                self._inflight_bytes -= self._inflight.popleft()[0]
            while self._inflight and self._inflight_bytes > self.WRITE_INFLIGHT_BYTES:
                nbytes, c = self._inflight.popleft()
                self._inflight_bytes -= nbytes
                try:
                    c.result()
                except Exception:  # noqa: BLE001 - reported by the commit future
                    pass
        except BaseException as e:
            with self._lock:
                self._errors.append(e)
            raise
        finally:
            with self._lock:
                s.queued -= 1

    def commit_turn(self, sid: str, token_ids) -> cf.Future:
        """Publish the turn: every layer saved up to ``len(token_ids)``; manifest written last.

        Returns a future that resolves (to the turn number) once the manifest is durable; it raises
        `DiskFull` (or the write's error) if the data could not be written, and the session then rolls
        back to its last durable turn. The session is readable at once (read-your-writes).
        """
        s = self._get(sid)
        tok = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        with self._lock:
            if s.pend is None:
                raise LayoutMismatch(f"session {sid!r}: nothing saved since the last commit")
            want = s.offset + len(tok)
            bad = [i for i, p in enumerate(s.pend) if p != want]
            if bad:
                raise LayoutMismatch(
                    f"session {sid!r}: {len(tok)} token ids but layers {bad[:5]} hold "
                    f"{[s.pend[i] - s.offset for i in bad[:5]]} tokens"
                )
            task = s.last_task
            s.end, s.turn, s.token_ids = want, s.turn + 1, tok
            s.pend, s.open_turn = None, None
            s.last_commit = fut = self._committer.submit(self._do_commit, s, task, self._snap(s))
        return fut

    def _do_commit(self, s: _Session, task, snap: dict) -> int:
        try:
            if task is not None:
                task.result()
            with self._lock:
                writes, s.writes = s.writes, []
            for w in writes:
                w.result()
            with self._lock:
                body = self._manifest_body(s, snap)
            self.disk.write_manifest(s.sid, body).result()
            with self._lock:
                s.durable = body
            return snap["turn"]
        except BaseException as e:
            err = wrap_disk_error(e)
            self._rollback(s)
            with self._lock:
                self._errors.append(err)
            if err is not e:
                raise err from e
            raise

    def _rollback(self, s: _Session) -> None:
        with self._lock:
            self._drop_copy(s, "device")
            self._drop_copy(s, "host")
            s.writes, s.pend = [], None
            m = s.durable
            if m is None:
                self.used["disk"] -= self.layout.num_layers * s.disk_blocks * self.block_bytes
                s.disk_blocks = 0
                self._sessions.pop(s.sid, None)
                self.policy.forget(s.sid)
                try:
                    self.disk.delete_session(s.sid)
                except Exception:  # noqa: BLE001
                    pass
                return
            s.offset, s.end, s.turn = m["offset"], m["end"], m["turn"]
            s.token_ids, s.kv_valid = np.asarray(m["token_ids"], np.int32), m["kv_valid"]

    def truncate_front(self, sid: str, n_drop: int) -> cf.Future:
        """Drop the oldest ``n_drop`` tokens; the rest stays bit-identical. Returns a future (manifest)."""
        s = self._get(sid)
        with self._lock:
            if s.pend is not None:
                raise LayoutMismatch(f"session {sid!r}: commit the turn before truncating")
            if not 0 <= n_drop <= s.end - s.offset:
                raise LayoutMismatch(f"cannot drop {n_drop} of {s.end - s.offset} tokens")
            s.offset += n_drop
            s.token_ids = s.token_ids[n_drop:].copy()
            f = s.offset // self.cfg.token_block
            for tier in ("host", "device"):
                layers = s.host if tier == "host" else s.device
                if layers is None:
                    continue
                freed = 0
                for bl in layers:
                    if bl is None:
                        continue
                    for b in range(min(f, len(bl))):
                        if bl[b] is not None:
                            bl[b] = None
                            freed += self.block_bytes
                self.used[tier] -= freed
                if tier == "host":
                    s.host_bytes -= freed
                else:
                    s.device_bytes -= freed
            prev = s.last_commit
            s.last_commit = fut = self._committer.submit(self._do_meta, s, prev, self._snap(s))
        return fut

    def _do_meta(self, s: _Session, prev, snap: dict) -> int:
        if prev is not None:
            try:
                prev.result()
            except Exception:  # noqa: BLE001 - reported by its own future
                pass
        try:
            with self._lock:
                body = self._manifest_body(s, snap)
            self.disk.write_manifest(s.sid, body).result()
        except BaseException as e:
            err = wrap_disk_error(e)
            self._rollback(s)
            with self._lock:
                self._errors.append(err)
            if err is not e:
                raise err from e
            raise
        with self._lock:
            s.durable = body
        return snap["turn"]

    def _resolve_layer(self, sid: str, layer: int, pad_to: int | None):
        """Find ``layer`` of ``sid``: ``(s, src, blocks, off, n, pad, f)``; src is "device" (device
        blocks), "host"/"disk" (pinned_host blocks; "disk" = just promoted) or "empty"."""
        s = self._get(sid)
        if not 0 <= layer < self.layout.num_layers:
            raise LayoutMismatch(f"layer {layer} out of range [0, {self.layout.num_layers})")
        with self._lock:
            task = s.layer_task.get(layer) if s.queued else None
        if task is not None and not task.done():
            task.result()  # read-your-writes for this layer's saves still queued (others may run on)
        with self._lock:
            if not s.kv_valid:
                raise KVLost(f"session {sid!r} has no valid KV; recompute from its token ids")
            n = s.end - s.offset
            pad = n if pad_to is None else pad_to
            if pad < n:
                raise LayoutMismatch(f"pad_to={pad_to} < num_tokens={n}")
            pf = s.prefetch
        if pf is not None:
            with self._lock:
                s.prefetch = None
            if pf.done():
                self.stats.add("prefetches_in_time")
        B = self.cfg.token_block
        f, nb = s.offset // B, _ceil_div(s.end, B)
        off = s.offset - f * B
        if nb <= f:
            return s, "empty", (), off, n, pad, f
        with self._lock:
            dl = s.device[layer] if s.device is not None else None
            if dl is not None and len(dl) >= nb:
                return s, "device", dl[f:nb], off, n, pad, f
        hblocks = None
        with self._lock:
            on_disk = s.host is None
        if on_disk:
            # Disk -> host runs in the background layer by layer; wait for this layer only.
            self.prefetch(sid)
            with self._lock:
                part, evs, err = s.partial, s.partial_ev, s.partial_err
            if evs is not None:
                evs[layer].wait()
                if err[0] is not None:
                    if isinstance(err[0], (KVLost, StoreError)):
                        raise err[0]
                    raise StoreError(f"session {sid!r}: reading from disk failed: {err[0]}") from err[0]
                if part[layer] is not None:
                    hblocks, came = part[layer][f:nb], "disk"
        if hblocks is None:
            for attempt in range(3):
                came = self._ensure_host(s) if s.host is None else ("disk" if on_disk else "host")
                with self._lock:
                    if s.host is not None:
                        hblocks = s.host[layer][f:nb]
                        break
            else:
                raise StoreError(f"session {sid!r} kept leaving the host tier while loading")
        if came == "disk":
            self.stats.add("misses", tier="host")
            self.stats.add("hits", tier="disk")
        else:
            self.stats.add("hits", tier="host")
        self.stats.add("bytes_read", len(hblocks) * self.block_bytes, tier="host")
        self.policy.touch(sid, "host")
        return s, came, hblocks, off, n, pad, f

    def load_layer(self, sid: str, layer: int, pad_to: int | None = None) -> jax.Array:
        """``[2, pad_to or num_tokens, K, D]`` on the device; rows >= num_tokens are zeros.

        From the device or host tier the transfer is dispatched asynchronously. From disk, the first
        load starts a background promotion that reads every layer concurrently and verifies them in
        order; a load waits for its own layer only, and raises `KVLost` at the first layer whose
        checksum fails (layers verified before it were correct).
        """
        s, src, blocks, off, n, pad, f = self._resolve_layer(sid, layer, pad_to)
        if src == "empty":
            return jnp.zeros((2, pad, self.layout.kv_heads, self.layout.head_dim), self.layout.np_dtype, device=self.device)
        if src == "device":
            self.stats.add("hits", tier="device")
            self.stats.add("bytes_read", len(blocks) * self.block_bytes, tier="device")
            self.policy.touch(sid, "device")
        else:
            blocks = jax.device_put(list(blocks), self._dev)  # one batched transfer call
            if self.budget["device"] > 0 and self._reserve("device", len(blocks) * self.block_bytes, s, required=False):
                with self._lock:
                    if s.device is None:
                        s.device = [None] * self.layout.num_layers
                    if s.device[layer] is not None:  # replace a stale partial copy
                        old = sum(1 for b in s.device[layer] if b is not None) * self.block_bytes
                        self.used["device"] -= old
                        s.device_bytes -= old
                    s.device[layer] = [None] * f + list(blocks)
                    s.device_bytes += len(blocks) * self.block_bytes
                    self.stats.add("bytes_written", len(blocks) * self.block_bytes, tier="device")
                self.policy.touch(sid, "device")
        return _assemble(tuple(blocks), jnp.int32(off), jnp.int32(n), pad)

    def layer_blocks(self, sid: str, layer: int) -> tuple[tuple[jax.Array, ...], int, int, str]:
        """``(blocks, offset, num_tokens, tier)``: the blocks ``[2, B, K, D]`` that hold ``layer``,
        where they are (``device`` or ``pinned_host`` memory for "host"/"disk"), the row of the first
        kept token in their concatenation, and the token count — for a jitted program that moves
        host blocks to the device itself (``store.assemble_blocks`` pads them). Waits like
        `load_layer` (own layer only); the device tier is not filled by this path."""
        s, src, blocks, off, n, pad, f = self._resolve_layer(sid, layer, None)
        if src == "device":
            self.stats.add("hits", tier="device")
            self.policy.touch(sid, "device")
        return tuple(blocks), off, n, src

    def prefetch(self, sid: str) -> cf.Future:
        """Start reading the session disk -> host; returns a future at once."""
        s = self._get(sid)
        with self._lock:
            if s.host is not None or not s.kv_valid:
                return _Done(None)
            if s.prefetch is not None and not s.prefetch.done():
                return s.prefetch
            mine, fut = self._claim_promotion(s)
            if not mine:
                return fut
            self.stats.add("prefetches_issued")
            s.prefetch = fut
        self._io.submit(self._promote_quietly, s, fut)
        return fut

    def _promote_quietly(self, s: _Session, fut: cf.Future) -> None:
        try:
            self._promote(s, fut)
        except BaseException:  # noqa: BLE001 - reported through ``fut``
            pass

    def evict(self, sid: str, tier: str) -> None:
        """"device": drop the device copy (to host); "host": drop the host copy (disk keeps it);
        "disk": delete the session everywhere. Waits for the session's in-flight writes first."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        s = self._get(sid)
        self._wait_session(s)
        with self._lock:
            if tier == "device" and s.device is not None and s.host is None and s.kv_valid:
                # demote: copy the device blocks to the host tier when it has room
                nbytes = s.device_bytes
                held = all(d is not None for d in s.device)
                if held and self._reserve("host", nbytes, s, required=False):
                    s.host = [[None if b is None else jax.device_put(b, self._host) for b in d] for d in s.device]
                    s.host_bytes = nbytes
            if self._holds(s, tier):
                self._evict_locked(s, tier)

    def _wait_session(self, s: _Session) -> None:
        with self._lock:
            futs = [f for f in (s.last_task, s.last_commit, s.promoting) if f is not None]
            writes = list(s.writes)
        for f in futs + writes:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - reported by the commit future / flush
                pass

    def delete(self, sid: str) -> None:
        s = self._get(sid)
        self._wait_session(s)
        with self._lock:
            self._delete_locked(s)

    def abort_turn(self, sid: str) -> None:
        """Give up the turn being saved (the saves since the last `commit_turn`): the session goes back to
        its last committed turn, in memory and on disk; queued saves of the turn do nothing. A session
        whose first turn is aborted is forgotten. No-op when no turn is open."""
        s = self._get(sid)
        with self._lock:
            turn = s.open_turn
            if turn is None and s.pend is None:
                return
            if turn is not None:
                turn.dead = True
            s.pend, s.open_turn = None, None
        # Queued saves of the turn find it dead and do nothing; one already running publishes nothing
        # (its chunk writes stay ordered before later writes of the same chunks).
        with self._lock:
            self._drop_copy(s, "device")
            if s.pend is not None:  # a new turn started meanwhile: it keeps the host blocks
                return
            B = self.cfg.token_block
            nb = _ceil_div(s.end, B)
            if s.host is not None:
                freed = 0
                for bl in s.host:
                    while len(bl) > nb:
                        if bl.pop() is not None:
                            freed += self.block_bytes
                kept = sum(1 for bl in s.host for b in bl if b is not None) * self.block_bytes
                self.used["host"] -= s.host_bytes - kept
                s.host_bytes = kept
            fresh = s.durable is None and s.end == 0 and (s.last_commit is None or s.last_commit.done())
            if fresh:  # a first turn never committed: the session never existed
                self._drop_copy(s, "host")
                self.used["disk"] -= self.layout.num_layers * s.disk_blocks * self.block_bytes
                s.disk_blocks = 0
                self._sessions.pop(s.sid, None)
                self.policy.forget(s.sid)
        if fresh:
            self._wait_session(s)  # its last save may still be writing chunks
            self.disk.delete_session(s.sid)

    def flush(self) -> None:
        """Wait for every save, commit and prefetch in flight; re-raise the first error of a save or
        commit since the last flush (each commit's future also carries its own error)."""
        with self._lock:
            sessions = list(self._sessions.values())
        errors = []
        for s in sessions:
            with self._lock:
                futs = [f for f in (s.last_task, s.last_commit, s.prefetch) if f is not None]
            for f in futs:
                try:
                    f.result()
                except Exception:  # noqa: BLE001 - reported by that future
                    pass
        with self._lock:
            errors = self._errors
            self._errors = []
        if errors:
            raise errors[0]

    def usage(self) -> dict[str, int]:
        """Bytes held per tier (what the budgets count)."""
        with self._lock:
            return dict(self.used)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for ex in (self._worker, self._committer, self._io):
                ex.shutdown(wait=True)

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
