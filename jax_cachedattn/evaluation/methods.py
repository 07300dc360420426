"""The four ways to go on after a context-window overflow, on one history and one continuation.

Legend: L layers, K kv heads, Dh head dim, H history tokens, C continuation tokens, V vocab.

* **TT** (token truncation): drop the oldest ``n_drop`` tokens and recompute the kept text from
  scratch (``model.forward``), then read the continuation's logits.
* **CA** (CachedAttention): the history's *pre-RoPE* KV goes into a ``TieredStore``, the store drops
  the oldest ``n_drop`` tokens (``drop_range(sid, 0, n_drop)``), the kept KV is loaded back layer by layer
  (``load_layer``) and the continuation is prefilled against it with RoPE applied at the new
  positions ``0 .. H - n_drop - 1`` — the engine's path.
* **NKVT** (naive KV truncation): the same drop through the same store on KV saved with RoPE
  already applied (``rope_mode="naive"``); the kept keys still carry their old positions while the
  continuation starts at position ``H - n_drop``.
* **Full**: no truncation (the window is ignored), the ceiling.

Two more, because CA lost to TT on SmolLM2 (docs/truncation.md) and the engine now truncates this
way (``EngineConfig.truncation_sink``): **CA+sink** keeps the first tokens' stored KV (the attention
sink, StreamingLLM) and drops the tokens after them, ``Cut(start, n)`` from the engine's
``plan_truncation(..., sink=)``, and **TT+sink** recomputes the same kept tokens.

Every path ends in :func:`score`: per-token negative log-likelihood of the targets and the top-1
prediction. The CA and NKVT paths check that what the store hands back is bit-for-bit the KV that
was saved, minus the dropped rows (no silent recompute); a mismatch raises.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.engine import EngineConfig
from jax_cachedattn.engine.truncation import Cut
from jax_cachedattn.model import ModelConfig, bucket_length, forward, prefill
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

METHODS = ("TT", "CA", "NKVT", "Full")
SINK_METHODS = ("TT+sink", "CA+sink")


class StoredKVMismatch(RuntimeError):
    """The KV loaded after truncation is not the KV that was stored (a recompute or a corruption)."""


@jax.jit
def _score(logits, targets):
    """``logits [n, V]``, ``targets [n]`` -> (nll ``[n]`` float32, top-1 ``[n]`` int32)."""
    lf = logits.astype(jnp.float32)
    nll = jax.nn.logsumexp(lf, axis=-1) - jnp.take_along_axis(lf, targets[:, None], axis=-1)[:, 0]
    return nll, jnp.argmax(lf, axis=-1).astype(jnp.int32)


def score(logits, targets) -> tuple[np.ndarray, np.ndarray]:
    nll, top1 = _score(logits, jnp.asarray(targets, jnp.int32))
    return np.asarray(nll), np.asarray(top1)


def _pad(ids: np.ndarray, length: int) -> jnp.ndarray:
    """Right-pad with token 0. Causal attention: padding after the real tokens changes none of their logits."""
    out = np.zeros(length, np.int32)
    out[: len(ids)] = ids
    return jnp.asarray(out)


def memory_store(config: ModelConfig, fingerprint: str = "eval-truncation", host_mib: int = 1024) -> TieredStore:
    """A ``TieredStore`` on TensorStore's in-memory kvstore (device tier off: every load is host -> device)."""
    layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, config.dtype, fingerprint)
    cfg = StoreConfig(kvstore={"driver": "memory"}, device_bytes=0, host_bytes=host_mib << 20)
    return TieredStore(cfg, layout)


@dataclasses.dataclass
class History:
    """One history, prefilled once for both cache kinds; reused by every truncation of it."""

    ids: np.ndarray  # [H]
    kv: dict[str, jax.Array]  # rope mode ("decoupled" / "naive") -> [L, 2, H, K, Dh]


@dataclasses.dataclass
class Continued:
    """A method's result on one continuation: per target token nll and top-1, plus its KV check."""

    nll: np.ndarray
    top1: np.ndarray
    kv_exact: bool | None = None  # CA/NKVT: the loaded KV equalled the stored KV minus the dropped rows


class Truncator:
    """Runs TT, CA, NKVT and Full for one model. ``store``: where CA/NKVT keep their KV (an
    in-memory ``TieredStore`` by default); each truncation uses a fresh session that is deleted after."""

    def __init__(self, params: Any, config: ModelConfig, store: TieredStore | None = None):
        self.params, self.config = params, config
        self.store = store if store is not None else memory_store(config)
        self._own_store = store is None
        self._sid = itertools.count()
        self._modes = {m: EngineConfig(rope_mode=m).rope_mode for m in ("decoupled", "naive")}

    def close(self) -> None:
        if self._own_store:
            self.store.close()

    # ---- shared pieces ------------------------------------------------------------------------
    def _prefill(self, ids: np.ndarray, cache: jax.Array, hist_len: int, naive: bool) -> tuple[jax.Array, jax.Array]:
        """Prefill ``ids`` against ``cache`` (``hist_len`` valid rows), padded to a bucket; logits and KV of the real rows."""
        n = len(ids)
        T = bucket_length(n, minimum=16, step=128)
        logits, kv = prefill(self.params, self.config, _pad(ids, T), cache, jnp.int32(hist_len), naive_rope=naive)
        return logits[:n], kv[:, :, :n]

    def history(self, ids) -> History:
        """Prefill the history once as pre-RoPE KV (CA, Full) and once as post-RoPE KV (NKVT)."""
        ids = np.asarray(ids, np.int32)
        c = self.config
        empty = jnp.zeros((c.num_layers, 2, 0, c.num_kv_heads, c.head_dim), c.jnp_dtype)
        kv = {mode: self._prefill(ids, empty, 0, naive=(mode == "naive"))[1] for mode in self._modes}
        return History(ids, kv)

    # ---- the four methods ---------------------------------------------------------------------
    def full(self, hist: History, cont, targets) -> Continued:
        """No truncation: the continuation against the whole history (the window is ignored)."""
        kv = hist.kv["decoupled"]
        S = bucket_length(kv.shape[2])
        cache = jnp.pad(kv, ((0, 0), (0, 0), (0, S - kv.shape[2]), (0, 0), (0, 0)))
        logits, _ = self._prefill(np.asarray(cont, np.int32), cache, kv.shape[2], naive=False)
        return Continued(*score(logits[: len(targets)], targets))

    def tt(self, hist: History, n_drop: int, cont, targets) -> Continued:
        """Token truncation: recompute the kept text and the continuation from scratch."""
        ids = np.concatenate([hist.ids[n_drop:], np.asarray(cont, np.int32)])
        T = bucket_length(len(ids), minimum=16, step=512)  # coarse buckets: few compilations of the big model
        logits = forward(self.params, self.config.replace(max_context=max(T, self.config.max_context)), _pad(ids, T))
        start = len(hist.ids) - n_drop
        return Continued(*score(logits[start : start + len(targets)], targets))

    def ca(self, hist: History, n_drop: int, cont, targets) -> Continued:
        return self._through_store(hist, n_drop, cont, targets, "decoupled")

    def nkvt(self, hist: History, n_drop: int, cont, targets) -> Continued:
        return self._through_store(hist, n_drop, cont, targets, "naive")

    def kept_kv(self, hist: History, cut: int | Cut, mode: str = "decoupled") -> tuple[jax.Array, bool]:
        """Save the history's KV in the store, drop the cut's rows there (``drop_range``; an int ``n`` is
        ``Cut(0, n)``, the oldest tokens), load every layer back.

        Returns ``(kv [L, 2, S, K, Dh], exact)`` with ``S`` the bucketed length of the whole history
        (one compiled shape for every cut of it; rows past the kept tokens are zeros) and ``exact`` whether
        the loaded rows are bit-identical to the stored KV minus the dropped rows."""
        cut = cut if isinstance(cut, Cut) else Cut(0, int(cut))
        kv = hist.kv[self._modes[mode]]
        H = kv.shape[2]
        kept = H - cut.n
        sid = f"eval-{mode}-{next(self._sid)}"
        st = self.store
        for layer in range(self.config.num_layers):
            st.save_layer(sid, layer, kv[layer], start=0)
        st.commit_turn(sid, hist.ids).result()
        st.drop_range(sid, cut.start, cut.stop).result()
        if st.lookup(sid).num_tokens != kept:
            raise StoredKVMismatch(f"the store kept {st.lookup(sid).num_tokens} tokens, expected {kept}")
        S = bucket_length(H)
        loaded = jnp.stack([st.load_layer(sid, layer, pad_to=S) for layer in range(self.config.num_layers)])
        st.delete(sid)
        want = np.concatenate([np.asarray(kv[:, :, : cut.start]), np.asarray(kv[:, :, cut.stop :])], axis=2)
        exact = bool(np.array_equal(np.asarray(loaded[:, :, :kept]), want))
        return loaded, exact

    def _through_store(self, hist: History, n_drop: int, cont, targets, mode: str) -> Continued:
        cache, exact = self.kept_kv(hist, n_drop, mode)
        if not exact:
            raise StoredKVMismatch(f"{mode}: the KV loaded after dropping the oldest {n_drop} tokens is not the stored KV")
        kept = len(hist.ids) - n_drop
        logits, _ = self._prefill(np.asarray(cont, np.int32), cache, kept, naive=(mode == "naive"))
        return Continued(*score(logits[: len(targets)], targets), kv_exact=exact)

    def tt_sink(self, hist: History, cut: Cut, cont, targets) -> Continued:
        """TT of the tokens the engine's cut keeps: recompute ``ids[:start] + ids[stop:]`` and the continuation."""
        return self.tt(History(cut.keep(hist.ids), {}), 0, cont, targets)

    def ca_sink(self, hist: History, cut: Cut, cont, targets) -> Continued:
        """CA as the engine truncates: the stored KV of ``[0, start)`` and ``[stop, H)`` (the sink and the
        tail), loaded through the store, renumbered from 0 (RoPE applied at the new positions)."""
        cache, exact = self.kept_kv(hist, cut)
        if not exact:
            raise StoredKVMismatch(f"the KV loaded after dropping rows [{cut.start}, {cut.stop}) is not the stored KV")
        logits, _ = self._prefill(np.asarray(cont, np.int32), cache, len(hist.ids) - cut.n, naive=False)
        return Continued(*score(logits[: len(targets)], targets), kv_exact=exact)

    def run(self, method: str, hist: History, n_drop: int, cont, targets, cut: Cut | None = None) -> Continued:
        """``n_drop``: the oldest tokens TT/CA/NKVT drop; ``cut``: what TT+sink/CA+sink drop (the engine's plan)."""
        if method == "Full":
            return self.full(hist, cont, targets)
        if method in SINK_METHODS:
            if cut is None:
                raise ValueError(f"{method} needs the engine's cut")
            return (self.tt_sink if method == "TT+sink" else self.ca_sink)(hist, cut, cont, targets)
        fn = {"TT": self.tt, "CA": self.ca, "NKVT": self.nkvt}.get(method)
        if fn is None:
            raise ValueError(f"unknown method {method!r}; one of {METHODS}")
        return fn(hist, n_drop, cont, targets)
