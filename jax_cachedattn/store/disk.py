"""Disk tier: one TensorStore zarr3 array per session plus a JSON manifest written last.

Keys under the store's kvstore:
  store.json                  format, layout and model fingerprint of the whole store
  s/<sid>/kv/zarr.json        zarr3 array [layers, 2, tokens, kv_heads, head_dim], chunks
  s/<sid>/kv/c.<l>.0.<c>.0.0  [1, 2, disk_chunk, kv_heads, head_dim] (flat keys: one folder per
                              session; disk_chunk divides token_block); tokens grows by resize.
                              Only chunks up to the committed end are ever written or read.
  s/<sid>/manifest.json       committed state: offset, end, turn, token ids; the last line is the
                              crc32 of the body, so a truncated or damaged manifest is detected.
Integrity of the data: every chunk ends with its crc32c (the zarr3 ``crc32c`` codec), computed and
checked by TensorStore while it encodes and decodes (hardware crc32c, in its own threads); a chunk
that is missing, short or fails its digest makes the read raise (``fill_missing_data_reads`` is off,
so a lost chunk is never read as zeros). Chunk files are replaced whole (TensorStore's file driver
writes a lock file and renames it), so committed rows of a partial last block rewritten by a turn
that never committed are still the committed values.
Session ids are validated before they reach here, so ``s/<sid>/`` never escapes the store.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import threading
from typing import Any

import numpy as np
import tensorstore as ts

from . import manifest as mf
from .faults import FaultInjector
from .layout import KVLayout, StoreConfig
from .manifest import Manifest, ManifestCorrupt  # noqa: F401 - ManifestCorrupt re-exported

#: On-disk format of the whole store (store.json): 2 = crc32c codec + flat chunk keys, no per-block
#: crcs in the manifest. A folder of another format is handled like another model's store.
STORE_FORMAT = 2


def is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    msg = str(exc).lower()
    return "no space left" in msg or "enospc" in msg or "disk quota" in msg or "resource_exhausted" in msg


def encode_manifest(m: Manifest) -> bytes:  # kept for callers of the old name
    return mf.encode(m)


def decode_manifest(raw: bytes) -> Manifest:
    return mf.decode(raw)


class DiskTier:
    """TensorStore access for the tiered store; no policy, no budgets."""

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
        self.chunk = cfg.token_block  # tokens per disk chunk (`StoreConfig.disk_chunk`, set by the open)

    @property
    def root(self) -> str | None:
        """The folder of a ``file`` kvstore, else None."""
        return self.base["path"] if self.base.get("driver") == "file" else None

    # ---- keys -------------------------------------------------------------------------------
    def _sub(self, path: str) -> dict:
        spec = dict(self.base)
        spec["path"] = spec.get("path", "") + path
        return spec

    def list_keys(self) -> list[str]:
        return [k.decode() for k in self.kv.list().result()]

    def read_key(self, key: str) -> bytes | None:
        r = self.kv.read(key).result()
        return bytes(r.value) if r.state == "value" else None

    def write_key(self, key: str, value: bytes):
        """Atomic single-key write (the file driver writes a temp file and renames); a future."""
        return self.kv.write(key, value)

    def delete_prefix(self, prefix: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()

    def session_ids(self) -> tuple[set[str], set[str]]:
        """(folders with a manifest, folders with any other key) under ``s/``; names not validated."""
        with_manifest, with_data = set(), set()
        for key in self.list_keys():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "s":
                (with_manifest if parts[2] == "manifest.json" and len(parts) == 3 else with_data).add(parts[1])
        return with_manifest, with_data

    def quarantine(self, name: str, reason: str) -> None:
        """Move folder ``s/<name>/`` out of the store to ``quarantine/<name>.<n>/`` with a ``reason.txt``
        (on a ``file`` kvstore; elsewhere its keys are deleted): it no longer counts or conflicts."""
        root = self.root
        if root is None:
            self.delete_prefix(f"s/{name}/")
            return
        src = os.path.join(root, "s", name)
        qdir = os.path.join(root, "quarantine")
        os.makedirs(qdir, exist_ok=True)
        n = 0
        while os.path.exists(os.path.join(qdir, f"{name}.{n}")):
            n += 1
        dst = os.path.join(qdir, f"{name}.{n}")
        if os.path.isdir(src):
            os.rename(src, dst)
        else:
            os.makedirs(dst)
            if os.path.lexists(src):
                os.rename(src, os.path.join(dst, "entry"))
        with open(os.path.join(dst, "reason.txt"), "w") as f:
            f.write(reason + "\n")
        _fsync_dir(qdir)
        _fsync_dir(os.path.join(root, "s"))
        self.forget(name)

    def quarantined(self) -> list[str]:
        root = self.root
        if root is None or not os.path.isdir(os.path.join(root, "quarantine")):
            return []
        return sorted(os.listdir(os.path.join(root, "quarantine")))

    # ---- manifests --------------------------------------------------------------------------
    def read_manifest(self, sid: str) -> Manifest | None:
        """The validated manifest of ``sid``, None if it has none; `ManifestCorrupt` if damaged or invalid."""
        raw = self.read_key(f"s/{sid}/manifest.json")
        return None if raw is None else mf.decode(raw)

    def write_manifest(self, sid: str, m: Manifest) -> cf.Future:
        """Write the manifest atomically and durably: on a ``file`` kvstore a temp file, fsync, rename, and
        an fsync of the folder (so a power cut cannot lose a turn reported durable); elsewhere one
        kvstore key write. Returns a future."""
        raw = mf.encode(m)
        fut: cf.Future = cf.Future()
        try:
            self.faults.check("manifest", sid)
            if self.root is None:
                return self.write_key(f"s/{sid}/manifest.json", raw)
            folder = os.path.join(self.root, "s", sid)
            made = not os.path.isdir(folder)
            os.makedirs(folder, exist_ok=True)
            _write_durably(os.path.join(folder, "manifest.json"), raw)
            if made:
                _fsync_dir(os.path.join(self.root, "s"))
            fut.set_result(None)
        except OSError as e:
            fut.set_exception(e)
        return fut

    # ---- arrays -----------------------------------------------------------------------------
    def _spec(self, sid: str) -> dict:
        lay, C = self.layout, self.chunk
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
                "chunk_grid": {
                    "name": "regular",
                    "configuration": {"chunk_shape": [1, 2, C, lay.kv_heads, lay.head_dim]},
                },
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

    def write_block(self, sid: str, layer: int, b: int, block: np.ndarray, lo: int = 0, hi: int | None = None):
        """Write rows ``[lo, hi)`` (whole disk chunks) of ``block`` [2, B, K, D] (never modified
        afterwards: TensorStore may keep referencing it instead of copying it) to token block ``b``;
        returns the write's commit future."""
        B = self.cfg.token_block
        hi = B if hi is None else hi
        try:
            self.faults.check("chunk_write", sid)
            arr = self.array(sid)
            return arr[layer, :, b * B + lo : b * B + hi].write(block[:, lo:hi],
                                                                can_reference_source_data_indefinitely=True).commit
        except BaseException as e:  # noqa: BLE001 - reported through the future, like TensorStore's own errors
            fut: cf.Future = cf.Future()
            fut.set_exception(e)
            return fut

    def read_block_into(self, arr, layer: int, b: int, out: np.ndarray, hi: int | None = None):
        """Copy rows ``[0, hi)`` (whole disk chunks; the rest of ``out`` is zeroed) of token block ``b``
        of the open array ``arr`` into ``out`` [2, B, K, D] (TensorStore decodes straight into ``out``:
        no intermediate array); a future. Raises like `read_block`."""
        B = self.cfg.token_block
        hi = B if hi is None else hi
        if hi < B:
            out[:, hi:] = 0
        return ts.array(out[:, :hi], context=self.context, copy=False, write=True).write(arr[layer, :, b * B : b * B + hi])

    def read_block(self, sid: str, layer: int, b: int, hi: int | None = None):
        """Future of rows ``[0, hi)`` of token block ``b`` as a ``[2, hi, K, D]`` array; TensorStore
        checks each chunk's crc32c and raises on a missing, short or damaged chunk."""
        B = self.cfg.token_block
        hi = B if hi is None else hi
        self.faults.check("read", sid)
        return self.array(sid)[layer, :, b * B : b * B + hi].read()

    def rows_on_disk(self, b: int, end: int) -> int:
        """Rows of block ``b`` a session ending at absolute row ``end`` has on disk (whole chunks)."""
        B, C = self.cfg.token_block, self.chunk
        return min(B, -(-(end - b * B) // C) * C)

    def forget(self, sid: str) -> None:
        with self._alock:
            self._arrays.pop(sid, None)

    def delete_session(self, sid: str) -> None:
        """Manifest first, then data: a crash in between leaves an orphan, never a dangling manifest."""
        self.faults.check("delete", sid)
        self.kv.delete_range(ts.KvStore.KeyRange(f"s/{sid}/manifest.json", f"s/{sid}/manifest.json\0")).result()
        self.delete_prefix(f"s/{sid}/")
        self.forget(sid)
        if self.root is not None:  # the file driver leaves the empty folders behind
            import shutil

            shutil.rmtree(os.path.join(self.root, "s", sid), ignore_errors=True)

    # ---- reclaiming the dead front ----------------------------------------------------------
    def _chunk_key(self, sid: str, layer: int, c: int) -> str:
        return f"s/{sid}/kv/c.{layer}.0.{c}.0.0"

    def delete_blocks(self, sid: str, lo: int, hi: int) -> None:
        """Delete the chunk files of token blocks ``[lo, hi)`` of every layer (blocks before the front
        of a durable manifest: no manifest covers them any more). A file already gone is fine, so an
        interrupted call runs again. Raises on any other error (nothing is counted freed then)."""
        self.faults.check("reclaim", sid)
        per = self.cfg.token_block // self.chunk
        keys = [self._chunk_key(sid, layer, c) for layer in range(self.layout.num_layers)
                for c in range(lo * per, hi * per)]
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

    def delete_data(self, sid: str) -> None:
        self.faults.check("delete", sid)
        self.forget(sid)
        self.delete_prefix(f"s/{sid}/kv/")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: str, raw: bytes) -> None:
    """Temp file + write + fsync + rename + fsync of the folder (the TensorStore file driver was seen
    rewriting a file in place, leaving a short manifest over a longer one after a kill)."""
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def write_key_durably(disk: "DiskTier", key: str, raw: bytes) -> None:
    """A small metadata key (store.json) written atomically, fsynced on a ``file`` kvstore."""
    if disk.root is None:
        disk.write_key(key, raw).result()
    else:
        _write_durably(os.path.join(disk.root, key), raw)
