"""Disk tier: one TensorStore zarr3 array per session plus a JSON manifest written last.

Keys under the store's kvstore:
  store.json                  format, layout and model fingerprint of the whole store
  s/<sid>/kv/zarr.json        zarr3 array [layers, 2, tokens, kv_heads, head_dim], chunks
  s/<sid>/kv/c.<l>.0.<b>.0.0  [1, 2, token_block, kv_heads, head_dim] (flat keys: one folder per
                              session); tokens grows by resize
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

import errno
import threading
import json
import zlib
from typing import Any

import numpy as np
import tensorstore as ts

from .errors import DiskFull, StoreError
from .layout import KVLayout, StoreConfig

MANIFEST_VERSION = 2
#: On-disk format of the whole store (store.json): 2 = crc32c codec + flat chunk keys, no per-block
#: crcs in the manifest. A folder of another format is handled like another model's store.
STORE_FORMAT = 2


class ManifestCorrupt(StoreError):
    """A manifest that cannot be parsed or fails its own checksum."""


def is_enospc(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    msg = str(exc).lower()
    return "no space left" in msg or "enospc" in msg or "disk quota" in msg


def encode_manifest(body: dict) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return (text + "\n#crc32=%08x\n" % zlib.crc32(text.encode())).encode()


def decode_manifest(raw: bytes) -> dict:
    try:
        text, tail = raw.decode().rstrip("\n").rsplit("\n", 1)
        if not tail.startswith("#crc32=") or int(tail[7:], 16) != zlib.crc32(text.encode()):
            raise ValueError("crc mismatch")
        body = json.loads(text)
        if body.get("version") not in (1, MANIFEST_VERSION):  # 1: read only to keep token ids (adoption)
            raise ValueError(f"unknown manifest version {body.get('version')!r}")
        return body
    except Exception as e:  # noqa: BLE001 - any damage is the same error
        raise ManifestCorrupt(f"damaged manifest: {e}") from e


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
        """(sessions with a manifest, sessions with any array key)."""
        with_manifest, with_data = set(), set()
        for key in self.list_keys():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "s":
                (with_manifest if parts[2] == "manifest.json" else with_data).add(parts[1])
        return with_manifest, with_data

    # ---- manifests --------------------------------------------------------------------------
    def read_manifest(self, sid: str) -> dict | None:
        raw = self.read_key(f"s/{sid}/manifest.json")
        return None if raw is None else decode_manifest(raw)

    def write_manifest(self, sid: str, body: dict):
        """Write the manifest atomically: temp file + fsync + rename on a ``file`` kvstore (the TensorStore
        file driver rewrites files in place), one kvstore key write elsewhere. Returns a future."""
        raw = encode_manifest({"version": MANIFEST_VERSION, **body})
        if self.base.get("driver") != "file":
            return self.write_key(f"s/{sid}/manifest.json", raw)
        import concurrent.futures as cf
        import os

        folder = os.path.join(self.base["path"], "s", sid)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".manifest.{os.getpid()}.{threading.get_ident()}.tmp")
        fut: cf.Future = cf.Future()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, raw)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(folder, "manifest.json"))
            fut.set_result(None)
        except OSError as e:
            fut.set_exception(e)
        return fut

    # ---- arrays -----------------------------------------------------------------------------
    def _spec(self, sid: str) -> dict:
        lay, B = self.layout, self.cfg.token_block
        codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if self.cfg.compression == "zstd":
            codecs.append({"name": "zstd", "configuration": {"level": self.cfg.compression_level}})
        codecs.append({"name": "crc32c"})
        return {
            "driver": "zarr3",
            "kvstore": self._sub(f"s/{sid}/kv/"),
            "fill_missing_data_reads": False,
            "metadata": {
                "shape": [lay.num_layers, 2, 0, lay.kv_heads, lay.head_dim],
                "data_type": lay.dtype,
                "chunk_grid": {
                    "name": "regular",
                    "configuration": {"chunk_shape": [1, 2, B, lay.kv_heads, lay.head_dim]},
                },
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
                "codecs": codecs,
                "fill_value": 0,
            },
        }

    def array(self, sid: str, create: bool = False):
        arr = self._arrays.get(sid)
        if arr is not None:
            return arr
        spec = self._spec(sid)
        if create:
            spec.update(create=True, open=True)
        else:
            spec.update(open=True)
            del spec["metadata"]
        arr = ts.open(spec, context=self.context).result()
        self._arrays[sid] = arr
        return arr

    def capacity_blocks(self, sid: str) -> int | None:
        try:
            arr = self.array(sid)
        except Exception:  # noqa: BLE001 - no array / unreadable metadata
            return None
        return arr.shape[2] // self.cfg.token_block

    def resize(self, sid: str, blocks: int) -> None:
        shape = [None, None, blocks * self.cfg.token_block, None, None]
        try:
            new = self.array(sid, create=True).resize(exclusive_max=shape).result()
        except ValueError as e:
            if "does not exist" not in str(e):
                raise
            # A handle opened before the session's data was deleted: open (create) afresh.
            self.forget(sid)
            spec = self._spec(sid)
            spec.update(create=True, open=True, recheck_cached_metadata=True)
            arr = ts.open(spec, context=self.context).result()
            new = arr.resize(exclusive_max=shape).result()
        self._arrays[sid] = new

    def write_block(self, sid: str, layer: int, b: int, block: np.ndarray):
        """Write ``block`` [2, B, K, D] (never modified afterwards: TensorStore may keep referencing
        it instead of copying it) as chunk (layer, b); a WriteFutures."""
        B = self.cfg.token_block
        return self._arrays[sid][layer, :, b * B : (b + 1) * B].write(block, can_reference_source_data_indefinitely=True)

    def read_block_into(self, arr, layer: int, b: int, out: np.ndarray):
        """Copy chunk (layer, b) of the open array ``arr`` into ``out`` [2, B, K, D] (TensorStore decodes it
        straight into ``out``: no intermediate array); a future. Raises like `read_block`."""
        B = self.cfg.token_block
        return ts.array(out, context=self.context, copy=False, write=True).write(arr[layer, :, b * B : (b + 1) * B])

    def read_block(self, sid: str, layer: int, b: int):
        """Future of chunk (layer, b) as a ``[2, B, K, D]`` array; TensorStore checks its crc32c and
        raises on a missing, short or damaged chunk."""
        B = self.cfg.token_block
        return self.array(sid)[layer, :, b * B : (b + 1) * B].read()

    def forget(self, sid: str) -> None:
        self._arrays.pop(sid, None)

    def delete_session(self, sid: str) -> None:
        """Manifest first, then data: a crash in between leaves an orphan, never a dangling manifest."""
        self.kv.delete_range(ts.KvStore.KeyRange(f"s/{sid}/manifest.json", f"s/{sid}/manifest.json\0")).result()
        self.delete_prefix(f"s/{sid}/")
        self.forget(sid)

    def delete_data(self, sid: str) -> None:
        self.delete_prefix(f"s/{sid}/kv/")
        self.forget(sid)


def wrap_disk_error(exc: BaseException) -> BaseException:
    if is_enospc(exc):
        return DiskFull(f"disk full while writing: {exc}")
    return exc
