"""The session arrays of the disk tier: TensorStore zarr3 arrays chunked over layers and tokens.

One array per session, ``s/<sid>/kv/``, of shape ``[L, 2, T, K, D]`` (layers, K/V, absolute token rows,
kv heads, head dim), T a multiple of the token block B (grown by resize). A chunk holds ``G`` consecutive
layers (``chunk_layers``, a divisor of L) by ``C`` tokens (``chunk``, a divisor of B): chunk shape
``[G, 2, C, K, D]``, flat keys ``c.<g>.0.<c>.0.0`` (group ``g`` = layers ``[g*G, (g+1)*G)``, token chunk
``c`` = rows ``[c*C, (c+1)*C)``). Small in tokens, so a turn rewrites little of the chunk it continues;
big in bytes (G layers), so files are few. Codecs: ``bytes`` (little endian), optional ``zstd``,
``crc32c`` (computed and checked by TensorStore in its own threads); ``fill_missing_data_reads`` off,
so a lost chunk is an error, never zeros. A chunk file is replaced whole (temp file + rename).
Only chunks up to the one holding a session's committed end are written or read.

The unit of a write or read here is a (group, token block) pair: rows ``[lo, hi)`` (whole chunks) of
block ``b`` of the G layers of group ``g``. A write takes the G layers' blocks ``[2, B, K, D]``; a read
decodes straight into a caller's ``[G, 2, B, K, D]`` buffer (a view with any strides).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
from typing import Any, Sequence

import numpy as np
import tensorstore as ts

from .faults import FaultInjector
from .layout import KVLayout, StoreConfig


def aligned_empty(shape: tuple, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary (a
    ``pinned_host`` array made from it on the CPU aliases it instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype).reshape(shape)


class KVArrays:
    """TensorStore access to the sessions' arrays; no policy, no budgets."""

    def __init__(self, cfg: StoreConfig, layout: KVLayout):
        self.cfg, self.layout = cfg, layout
        self.context = ts.Context(
            {
                "file_io_concurrency": {"limit": cfg.io_concurrency},
                "data_copy_concurrency": {"limit": cfg.copy_concurrency},
                "cache_pool": {"total_bytes_limit": cfg.cache_bytes},
            }
        )
        self.base = cfg.kvstore_spec()
        self.kv = ts.KvStore.open(self.base, context=self.context).result()
        self._arrays: dict[str, Any] = {}
        self._alock = threading.Lock()  # guards _arrays (the save worker, promotions and recovery share it)
        self.faults = FaultInjector()
        # The chunk geometry (set by the open from the config or the store's store.json).
        self.chunk = cfg.token_block  # tokens per chunk
        self.chunk_layers = 1  # layers per chunk

    @property
    def root(self) -> str | None:
        """The folder of a ``file`` kvstore, else None."""
        return self.base["path"] if self.base.get("driver") == "file" else None

    def _sub(self, path: str) -> dict:
        spec = dict(self.base)
        spec["path"] = spec.get("path", "") + path
        return spec

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        """Layer groups (chunks along the layer axis)."""
        return self.layout.num_layers // self.chunk_layers

    def group_layers(self, g: int) -> range:
        return range(g * self.chunk_layers, (g + 1) * self.chunk_layers)

    def rows_on_disk(self, b: int, end: int) -> int:
        """Rows of block ``b`` a session ending at absolute row ``end`` has on disk (whole chunks)."""
        B, C = self.cfg.token_block, self.chunk
        return min(B, -(-(end - b * B) // C) * C)

    # ---- arrays -------------------------------------------------------------------------------
    def _spec(self, sid: str) -> dict:
        lay, C, G = self.layout, self.chunk, self.chunk_layers
        codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.cfg.compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": self.cfg.compression_level}})
        codecs.append({"name": "crc32c"})
        return {
            "driver": "zarr3",
            "kvstore": self._sub(f"s/{sid}/kv/"),
            "fill_missing_data_reads": False,
            "store_data_equal_to_fill_value": True,  # else a chunk of zeros is not written, and reads fail
            "metadata": {
                "shape": [lay.num_layers, 2, 0, lay.kv_heads, lay.head_dim],
                "data_type": lay.dtype,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [G, 2, C, lay.kv_heads, lay.head_dim]}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
                "codecs": codecs,
                "fill_value": 0,
            },
        }

    def array(self, sid: str, create: bool = False):
        """The session's open array. An existing ``zarr.json`` must match the layout field by field
        (data type, chunk shape, key encoding, codecs with crc32c: TensorStore checks the spec's
        metadata as constraints) and its shape must be ``[L, 2, n*B, K, D]``; else ValueError."""
        with self._alock:
            arr = self._arrays.get(sid)
        if arr is not None:
            return arr
        spec = self._spec(sid)
        spec.update(open=True, recheck_cached_metadata=True)
        del spec["metadata"]["shape"]  # the rest are constraints the stored metadata must meet
        try:
            arr = ts.open(spec, context=self.context).result()
        except ValueError as e:
            if not create or "NOT_FOUND" not in str(e):
                raise
            spec = self._spec(sid)
            spec.update(create=True, open=True)
            arr = ts.open(spec, context=self.context).result()
        lay, B = self.layout, self.cfg.token_block
        shp = tuple(arr.shape)
        if len(shp) != 5 or shp[:2] != (lay.num_layers, 2) or shp[3:] != (lay.kv_heads, lay.head_dim) or shp[2] % B:
            raise ValueError(f"array of session {sid!r} has shape {list(shp)}, expected "
                             f"[{lay.num_layers}, 2, n*{B}, {lay.kv_heads}, {lay.head_dim}]")
        with self._alock:
            self._arrays[sid] = arr
        return arr

    def forget(self, sid: str) -> None:
        with self._alock:
            self._arrays.pop(sid, None)

    def capacity_blocks(self, sid: str) -> int | None:
        try:
            arr = self.array(sid)
        except Exception:  # noqa: BLE001 - no array / unreadable metadata
            return None
        return arr.shape[2] // self.cfg.token_block

    def resize(self, sid: str, blocks: int) -> None:
        """Grow (or shrink) the session's array to ``blocks`` token blocks. On any error the cached
        handle is dropped, so the next call re-reads the metadata (a failed resize never leaves a
        handle whose shape disagrees with the disk)."""
        shape = [None, None, blocks * self.cfg.token_block, None, None]
        try:
            self.faults.check("resize", sid)
            new = self.array(sid, create=True).resize(exclusive_max=shape).result()
        except ValueError as e:
            self.forget(sid)
            if "does not exist" not in str(e):
                raise
            # A handle opened before the session's data was deleted: open (create) afresh.
            spec = self._spec(sid)
            spec.update(create=True, open=True, recheck_cached_metadata=True)
            arr = ts.open(spec, context=self.context).result()
            new = arr.resize(exclusive_max=shape).result()
        except BaseException:
            self.forget(sid)
            raise
        with self._alock:
            self._arrays[sid] = new

    # ---- rows of a (group, block) -----------------------------------------------------------------
    def write_rows(self, sid: str, g: int, b: int, blocks: Sequence[np.ndarray], lo: int = 0, hi: int | None = None):
        """Write rows ``[lo, hi)`` (whole chunks) of token block ``b`` of the layers of group ``g``;
        ``blocks``: their ``[2, B, K, D]`` blocks, in layer order. TensorStore copies the rows into a
        buffer of its own before the write's ``copy`` future is done: it must never keep a Python-owned
        buffer, since it drops such a reference under the GIL, and the ``memory`` kvstore drops stored
        values under its own mutex, which a thread holding the GIL may be waiting on (a resize, a read of
        ``zarr.json``: the two deadlock). Returns the write's commit future."""
        B = self.cfg.token_block
        hi = B if hi is None else hi
        try:
            self.faults.check("chunk_write", sid)
            if len(blocks) != self.chunk_layers:
                raise ValueError(f"{len(blocks)} layers for a chunk of {self.chunk_layers}")
            if len(blocks) == 1:
                src = blocks[0][None, :, lo:hi]
            else:  # the group's rows packed once: [G, 2, hi - lo, K, D]
                src = aligned_empty((len(blocks), 2, hi - lo) + blocks[0].shape[2:], blocks[0].dtype)
                for i, blk in enumerate(blocks):
                    src[i] = blk[:, lo:hi]
            G = self.chunk_layers
            arr = self.array(sid)
            return arr[g * G : (g + 1) * G, :, b * B + lo : b * B + hi].write(src).commit
        except BaseException as e:  # noqa: BLE001 - reported through the future, like TensorStore's own errors
            fut: cf.Future = cf.Future()
            fut.set_exception(e)
            return fut

    def read_rows_into(self, arr, g: int, b: int, out: np.ndarray, hi: int | None = None):
        """Decode rows ``[0, hi)`` (whole chunks) of token block ``b`` of group ``g`` of the open array
        ``arr`` straight into ``out`` ``[G, 2, B, K, D]`` (rows from ``hi`` on are zeroed); a future.
        TensorStore checks each chunk's crc32c and fails on a missing, short or damaged chunk."""
        B, G = self.cfg.token_block, self.chunk_layers
        hi = B if hi is None else hi
        if hi < B:
            out[:, :, hi:] = 0
        dst = ts.array(out[:, :, :hi], context=self.context, copy=False, write=True)
        return dst.write(arr[g * G : (g + 1) * G, :, b * B : b * B + hi])

    def read_rows(self, sid: str, g: int, b: int, hi: int | None = None):
        """Future of rows ``[0, hi)`` of token block ``b`` of group ``g`` as a ``[G, 2, hi, K, D]`` array."""
        B, G = self.cfg.token_block, self.chunk_layers
        hi = B if hi is None else hi
        self.faults.check("read", sid)
        return self.array(sid)[g * G : (g + 1) * G, :, b * B : b * B + hi].read()

    # ---- chunk files --------------------------------------------------------------------------
    def chunk_key(self, sid: str, g: int, c: int) -> str:
        return f"s/{sid}/kv/c.{g}.0.{c}.0.0"

    def delete_blocks(self, sid: str, lo: int, hi: int) -> None:
        """Delete the chunk files of token blocks ``[lo, hi)`` of every layer (blocks before the front
        of a durable manifest: no manifest covers them any more). A file already gone is fine, so an
        interrupted call runs again. Raises on any other error (nothing is counted freed then)."""
        self.faults.check("reclaim", sid)
        per = self.cfg.token_block // self.chunk
        keys = [self.chunk_key(sid, g, c) for g in range(self.groups) for c in range(lo * per, hi * per)]
        if self.root is not None:
            for key in keys:
                try:
                    os.unlink(os.path.join(self.root, key))
                except FileNotFoundError:
                    pass
            return
        futs = [self.kv.delete_range(ts.KvStore.KeyRange(k, k + "\0")) for k in keys]
        for f in futs:
            f.result()

    def stored_blocks(self, sid: str) -> set[int]:
        """Token blocks of ``sid`` that have at least one chunk file (any layer)."""
        prefix = f"s/{sid}/kv/c."
        keys = self.kv.list(ts.KvStore.KeyRange(prefix, prefix[:-1] + "/")).result()
        per = self.cfg.token_block // self.chunk
        out = set()
        for k in keys:
            parts = k.decode()[len(prefix):].split(".")
            if len(parts) == 5 and parts[2].isdigit():
                out.add(int(parts[2]) // per)
        return out

    def delete_prefix(self, prefix: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()

    def delete_data(self, sid: str) -> None:
        self.faults.check("delete", sid)
        self.forget(sid)
        self.delete_prefix(f"s/{sid}/kv/")
