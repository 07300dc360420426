"""Tiered session KV store: device -> host (pinned_host) -> disk (TensorStore zarr3).

Arrays and bytes only; no model code. See `tiered.TieredStore` and docs/store.md.
"""

from .errors import (
    BudgetError,
    DiskFull,
    FingerprintMismatch,
    InvalidSessionId,
    KVLost,
    LayoutMismatch,
    StoreError,
    UnknownSession,
)
from .layout import KVLayout, SessionInfo, StoreConfig, validate_session_id
from .policy import EvictionPolicy, LRUPolicy
from .stats import StoreStats
from .tiered import TieredStore, assemble_blocks

__all__ = [
    "BudgetError", "DiskFull", "EvictionPolicy", "FingerprintMismatch", "InvalidSessionId", "KVLayout",
    "KVLost", "LRUPolicy", "LayoutMismatch", "SessionInfo", "StoreConfig", "StoreError", "StoreStats",
    "TieredStore", "UnknownSession", "assemble_blocks", "validate_session_id",
]
