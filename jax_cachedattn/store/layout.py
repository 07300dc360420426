"""What a session holds, how the store is configured, and what `lookup` returns."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from .errors import InvalidSessionId, StoreClosed  # noqa: F401 - StoreClosed re-exported (old home)

_SID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: no trailing newline
_DTYPES = ("float32", "bfloat16", "float16")


def validate_session_id(sid: Any) -> str:
    """Return ``sid`` if it is a safe session id, else raise `InvalidSessionId`.

    Safe ids are 1-128 characters of ``[A-Za-z0-9._-]`` starting with a letter or digit, so they
    never contain a path separator and are never ``.`` or ``..``: the id is used as the key directly.
    """
    if not isinstance(sid, str) or not _SID_RE.fullmatch(sid):
        raise InvalidSessionId(f"invalid session id {sid!r}: expected ^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$")
    return sid


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """Shape of one session's KV: ``[num_layers, 2 (k, v), tokens, kv_heads, head_dim]`` in ``dtype``.

    Keys are stored before RoPE. ``fingerprint`` names the model that made the KV; a store never
    serves KV to a layout with another fingerprint.
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    fingerprint: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {getattr(self, name)!r}")
        dt = str(np.dtype(self.dtype)) if self.dtype not in _DTYPES else self.dtype
        if dt not in _DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt)
        if not isinstance(self.fingerprint, str):
            raise ValueError("KVLayout.fingerprint must be a string")

    @property
    def np_dtype(self) -> np.dtype:
        return np_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    @property
    def bytes_per_token_layer(self) -> int:
        """Bytes of one token's K and V in one layer."""
        return 2 * self.kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token's K and V over all layers."""
        return self.num_layers * self.bytes_per_token_layer

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


#: A new store's disk chunk (`StoreConfig.disk_chunk` None) in tokens: the block halved down to this. A turn
#: rewrites about one chunk of the history it continues (amplification ~ 1 + C / tokens per turn: 1.09
#: for chat turns at 32, measured in docs/store.md).
DISK_CHUNK_TOKENS = 32
#: A new store's layers per disk chunk (`StoreConfig.disk_chunk_layers` None): the fewest (a divisor of the
#: layer count) that make a chunk at least this big: below it, reading and writing many small files costs
#: more than the bytes it saves (measured in docs/store.md).
DISK_CHUNK_MIN_BYTES = 512 << 10


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Configuration of a `TieredStore`. Budgets count the bytes actually held, padding included.

    Fields:
      root: folder of the disk tier (a ``file`` kvstore). Ignored when ``kvstore`` is given.
      kvstore: a TensorStore kvstore spec dict (e.g. ``{"driver": "memory"}``, a ``gcs`` spec); it
        overrides ``root``. One of ``root``/``kvstore`` is required.
      device_bytes: budget of the device tier; 0 disables it (loads then go host -> device each time).
      host_bytes: budget of the host (``pinned_host``) tier. Every save passes through it, so it must
        hold at least one whole session; `BudgetError` otherwise.
      disk_bytes: budget of the disk tier (uncompressed bytes of the allocated token blocks);
        ``None`` means unlimited (the filesystem's ENOSPC still raises `DiskFull`).
      compression: ``None`` or ``"zstd"`` (zarr3 codec) for the disk tier.
      compression_level: zstd level.
      token_block: tokens per block: the unit of host/device allocation.
      disk_chunk: tokens per disk chunk (a divisor of ``token_block``): a turn rewrites at most the one
        chunk holding the end of the history it continues, so a smaller chunk writes fewer bytes twice
        (decode write amplification). ``None``: the store's own (from its ``store.json``); for a new
        store the block halved down to `DISK_CHUNK_TOKENS` (32).
      disk_chunk_layers: layers per disk chunk (a divisor of the layout's layer count): a chunk holds
        ``disk_chunk`` tokens of that many consecutive layers, so a chunk small in tokens can still be
        big in bytes (many small files read and write slowly). ``None``: the store's own (a store.json
        of format 2 has one layer per chunk); for a new store the fewest layers that make a chunk of
        at least `DISK_CHUNK_MIN_BYTES` (Llama-2-7B bf16: 1 layer x 32 tokens = 512 KiB; SmolLM2-135M
        fp32: 15 layers x 32 tokens = 720 KiB); see docs/store.md.
      io_concurrency: TensorStore ``file_io_concurrency`` limit.
      copy_concurrency: TensorStore ``data_copy_concurrency`` limit.
      cache_bytes: TensorStore ``cache_pool`` limit (0: no chunk cache; the host tier is the cache).
      memory_kind: memory kind of the host tier (``"pinned_host"``; ``"unpinned_host"`` also works).
      verify_on_open: verify every chunk checksum when the store opens (slow for big stores; disk
        reads are always verified when they happen). Holds one layer group of a session (the
        layers a disk chunk spans) in the host budget at a time.
      wipe_on_mismatch: when the folder holds another model's KV, delete it instead of raising
        `FingerprintMismatch`.
      keep_tokens_on_mismatch: when the folder holds another model's KV, keep every session's token
        ids and drop its KV (``SessionInfo.kv_valid`` False), so an engine recomputes the history
        with the new model: the conversation survives a model change, wrong KV is never served.
    """

    root: str | None = None
    kvstore: dict | None = None
    device_bytes: int = 0
    host_bytes: int = 1 << 30
    disk_bytes: int | None = None
    compression: str | None = None
    compression_level: int = 1
    token_block: int = 256
    disk_chunk: int | None = None
    disk_chunk_layers: int | None = None
    io_concurrency: int = 16
    copy_concurrency: int = 8
    cache_bytes: int = 0
    memory_kind: str = "pinned_host"
    verify_on_open: bool = False
    wipe_on_mismatch: bool = False
    keep_tokens_on_mismatch: bool = False

    def __post_init__(self) -> None:
        if self.root is None and self.kvstore is None:
            raise ValueError("StoreConfig needs root (a folder) or kvstore (a TensorStore kvstore spec)")
        if self.kvstore is None and (not isinstance(self.root, (str, bytes)) and not hasattr(self.root, "__fspath__")
                                     or not str(self.root).strip()):
            raise ValueError(f"StoreConfig.root must be a non-empty folder path, got {self.root!r}")
        if self.kvstore is not None and (not isinstance(self.kvstore, dict) or "driver" not in self.kvstore):
            raise ValueError("StoreConfig.kvstore must be a TensorStore kvstore spec dict with a 'driver'")
        for name in ("device_bytes", "host_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"StoreConfig.{name} must be an int >= 0")
        if self.host_bytes == 0:
            raise ValueError("StoreConfig.host_bytes must be > 0: every save passes through the host tier")
        if self.disk_bytes is not None and (not isinstance(self.disk_bytes, int) or self.disk_bytes <= 0):
            raise ValueError("StoreConfig.disk_bytes must be None or an int > 0")
        if self.compression not in (None, "zstd"):
            raise ValueError(f"StoreConfig.compression must be None or 'zstd', got {self.compression!r}")
        if not isinstance(self.token_block, int) or self.token_block < 1:
            raise ValueError("StoreConfig.token_block must be an int >= 1")
        if self.disk_chunk is not None and (not isinstance(self.disk_chunk, int) or isinstance(self.disk_chunk, bool)
                                            or self.disk_chunk < 1 or self.token_block % self.disk_chunk):
            raise ValueError(f"StoreConfig.disk_chunk must be None or an int >= 1 dividing token_block "
                             f"({self.token_block}), got {self.disk_chunk!r}")
        if self.disk_chunk_layers is not None and (not isinstance(self.disk_chunk_layers, int)
                                                   or isinstance(self.disk_chunk_layers, bool) or self.disk_chunk_layers < 1):
            raise ValueError(f"StoreConfig.disk_chunk_layers must be None or an int >= 1, got {self.disk_chunk_layers!r}")
        for name in ("io_concurrency", "copy_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"StoreConfig.{name} must be >= 1")
        if self.cache_bytes < 0:
            raise ValueError("StoreConfig.cache_bytes must be >= 0")
        if self.memory_kind not in ("pinned_host", "unpinned_host"):
            raise ValueError("StoreConfig.memory_kind must be 'pinned_host' or 'unpinned_host'")

    def new_disk_geometry(self, layout: "KVLayout") -> tuple[int, int]:
        """``(tokens, layers)`` per disk chunk for a new store of ``layout`` (the config's where set)."""
        c = self.disk_chunk
        if c is None:
            c = self.token_block
            while c % 2 == 0 and c > DISK_CHUNK_TOKENS:
                c //= 2
        g = self.disk_chunk_layers
        if g is None:
            L = layout.num_layers
            g = next((d for d in range(1, L + 1) if L % d == 0 and d * c * layout.bytes_per_token_layer
                      >= DISK_CHUNK_MIN_BYTES), L)
        return c, g

    def kvstore_spec(self) -> dict:
        if self.kvstore is not None:
            spec = dict(self.kvstore)
            if spec.get("path") and not spec["path"].endswith("/"):
                spec["path"] = spec["path"] + "/"
            return spec
        return {"driver": "file", "path": str(self.root).rstrip("/") + "/"}


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """What `TieredStore.lookup` returns.

    tier: fastest tier holding the full KV ("device", "host", "disk"), or None when ``kv_valid`` is
      False. num_tokens: tokens of the history (after front truncation). turn: committed turns (the
      in-memory turn: a turn is counted as soon as `commit_turn` is called). token_ids: the history's
      token ids, int32. kv_valid: False when the KV was dropped (checksum failure) and must be
      recomputed from ``token_ids``. durable: the latest turn's manifest is on disk.
    """

    session_id: str
    tier: str | None
    num_tokens: int
    turn: int
    token_ids: np.ndarray
    kv_valid: bool = True
    durable: bool = True

