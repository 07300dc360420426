"""The read buffer: a queued job's first layers loaded ahead, and how many layers to keep ahead.

The paper sizes the buffer so loading never stalls compute: with ``T_load`` per history token per
layer and ``T_pref`` per new token per layer, ``L_hist`` history and ``L_new`` new tokens, the
layers that must be in flight before compute starts are those whose loads cannot hide behind the
compute of the layers before them, ``B·(T_load·L_hist − T_pref·L_new)`` bytes for a batch of B jobs.
:class:`ReadAhead` measures both rates on every path (per-layer loads, in-program and scanned
prefills) and turns them into a layer count. Nothing here blocks: a preload is dispatched
asynchronously and a measurement is taken only where the caller already waits.
"""

from __future__ import annotations

import dataclasses
import math

import jax


class ReadAhead:
    """Measured load and compute rates (EMAs) and the read-ahead they imply."""

    def __init__(self, num_layers: int, fixed: int | None = None, default: int = 2):
        self.num_layers, self.fixed, self.default = num_layers, fixed, default
        self.load_s_per_byte: float | None = None  # host -> device, per byte
        self.comp_s_per_token: float | None = None  # one layer, per new token

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else 0.7 * old + 0.3 * new

    def observe_load(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.load_s_per_byte = self._ema(self.load_s_per_byte, seconds / nbytes)

    def observe_compute(self, new_tokens: int, layers: int, seconds: float) -> None:
        if new_tokens > 0 and layers > 0 and seconds > 0:
            self.comp_s_per_token = self._ema(self.comp_s_per_token, seconds / (new_tokens * layers))

    def counts(self) -> tuple[int, ...]:
        """Every count :meth:`layers` can return: the default, half the layers, every layer (or the
        fixed count). A preloaded history enters the in-program prefill as that many device arrays,
        one compiled program per count, so the set is kept small and known for the warm-up."""
        L = self.num_layers
        if self.fixed is not None:
            return (min(L, self.fixed),)
        d = min(L, self.default)
        return tuple(sorted({d, max(d, -(-L // 2)), L}))

    def layers(self, hist_bytes_per_layer: int, new_tokens: int) -> int:
        """Layers to have in flight before compute starts, for one job (one of :meth:`counts`)."""
        L = self.num_layers
        if self.fixed is not None:
            return min(L, self.fixed)
        if self.load_s_per_byte is None or self.comp_s_per_token is None:
            return min(L, self.default)
        t_load = self.load_s_per_byte * hist_bytes_per_layer
        t_comp = self.comp_s_per_token * max(1, new_tokens)
        if t_load <= t_comp:
            return min(L, self.default)
        # Loading is slower: keep enough layers in flight that the last load lands when compute needs it,
        # rounded up to the next of counts() (more layers ahead never stalls compute).
        need = min(L, 1 + math.ceil(L * (1.0 - t_comp / t_load)))
        return min(c for c in self.counts() if c >= need)


@dataclasses.dataclass
class _Preloaded:
    num_tokens: int
    turn: int
    cap: int
    layers: dict[int, jax.Array]


class ReadBuffer:
    """Layers of queued jobs' histories already dispatched to the device, keyed by session."""

    def __init__(self):
        self._held: dict[str, _Preloaded] = {}

    def put(self, sid: str, num_tokens: int, turn: int, cap: int, layers: dict[int, jax.Array]) -> None:
        self._held[sid] = _Preloaded(num_tokens, turn, cap, layers)

    def take(self, sid: str, num_tokens: int, turn: int, cap: int) -> dict[int, jax.Array]:
        """The held layers if they match the session's current state and capacity (else none)."""
        pre = self._held.pop(sid, None)
        if pre is None or (pre.num_tokens, pre.turn, pre.cap) != (num_tokens, turn, cap):
            return {}
        return pre.layers

    def drop(self, sid: str) -> None:
        self._held.pop(sid, None)

    def held_layers(self, sid: str) -> int:
        """How many of ``sid``'s layers are held (0 when none)."""
        pre = self._held.get(sid)
        return 0 if pre is None else len(pre.layers)

    def clear(self) -> None:
        self._held.clear()

    def __contains__(self, sid: str) -> bool:
        return sid in self._held
