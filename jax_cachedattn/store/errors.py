"""Exceptions of the session KV store. Every one is a `StoreError`."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by `jax_cachedattn.store`."""


class InvalidSessionId(StoreError, ValueError):
    """A session id that does not match ``^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$``."""


class UnknownSession(StoreError, KeyError):
    """The session is not in the store (never saved, deleted, or evicted from every tier)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown session"


class LayoutMismatch(StoreError, ValueError):
    """An array of the wrong shape or dtype, or a write that does not continue the session."""


class FingerprintMismatch(StoreError):
    """The store folder holds KV made by another model (or another KV layout)."""


class BudgetError(StoreError):
    """A budget is smaller than what one session needs, or nothing can be evicted to make room."""


class DiskFull(BudgetError, OSError):
    """The disk tier is full: its byte budget is reached or the filesystem said ENOSPC.

    Raised for a turn that could not be saved, its message is one line a person can act on, e.g.
    ``disk full: turn 4 of session 'harbour' was not saved; the session stays at turn 3 (free space
    and send it again)``; the filesystem's own error is its ``__cause__``.
    """

    def __str__(self) -> str:  # OSError's str would show errno fields
        return str(self.args[0]) if self.args else "disk full"


class StoreLocked(StoreError):
    """Another process (or another open store in this process) writes this store root."""


class StoreClosed(StoreError):
    """The store was closed."""


class TurnFailed(StoreError):
    """A turn was not saved (an I/O error, or an earlier turn of its session failed); the session stays
    at its last committed turn. The underlying error is the ``__cause__``."""


class KVLost(StoreError):
    """The session's KV failed its checksum (or is missing) and was dropped; its token ids survive.

    Recompute the KV from `SessionInfo.token_ids` and save it again with ``start=0``.
    """
