"""The truncation experiment: sources x windows x cuts x methods, with a progress bar.

For every sequence and window W, the history is the first W tokens and the continuation the next
C tokens, so the turn overflows by C. The cut (how many of the oldest tokens go) comes from the
engine's own :func:`plan_truncation` (at least ``ratio`` of the history, whole turns for chats);
the chat variants also cut inside a turn and remove only the system prompt. Each cut is scored
with TT, CA, NKVT and Full (:mod:`.methods`); the recall task runs on the same conversations.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import numpy as np

from jax_cachedattn.engine.truncation import Cut, plan_truncation
from jax_cachedattn.evaluation.methods import SINK_METHODS, Truncator
from jax_cachedattn.evaluation.recall import make_item, recalled


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """windows: context windows W. ratios: truncation ratios (the engine's ``truncation_ratio``).
    continuation: C, tokens after the truncation point (C - 1 of them are scored).
    prose: pydoc windows per W. chats: self-generated conversations (each scored at every W it
    covers). recall: recall items per W. variants: also cut inside a turn and remove only the
    system prompt (chats). sink: > 0 also runs TT+sink and CA+sink, which keep the first ``sink``
    tokens (the attention sink) and drop the tokens after them, cut where the engine with
    ``truncation_sink=sink`` cuts (for prose the same number of tokens as the plain cut, moved back by
    ``sink``; for chats from ``sink`` to the turn start the engine picks, usually the plain cut's end).
    sweep: more sink sizes, each scored as ``TT+sink{k}`` / ``CA+sink{k}`` with the engine's cut for
    ``truncation_sink=k`` (the sink sweep; ``sink`` stays the one named plainly ``TT+sink``/``CA+sink``).
    seed: text offsets, conversations and facts."""

    windows: tuple[int, ...] = (512, 1024, 2048)
    ratios: tuple[float, ...] = (0.25, 0.5)
    continuation: int = 128
    prose: int = 2
    chats: int = 2
    recall: int = 4
    variants: bool = True
    sink: int = 0
    sweep: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.windows or any(int(w) < 2 for w in self.windows):
            raise ValueError(f"windows must be integers >= 2, got {self.windows}")
        if not self.ratios or any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be in (0, 1), got {self.ratios}")
        if self.continuation < 2:
            raise ValueError("continuation must be >= 2 tokens")
        if any(self.continuation >= w for w in self.windows):
            raise ValueError(f"continuation ({self.continuation}) must be shorter than every window")
        for f in ("prose", "chats", "recall", "sink"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f} must be >= 0")
        if any(int(k) < 1 for k in self.sweep):
            raise ValueError(f"sweep sink sizes must be >= 1 (0 is TT/CA), got {self.sweep}")


@dataclasses.dataclass
class Sequence:
    """One text: token ids, where turns start (None for prose), the id that starts a turn, and for chats
    each token's role (:func:`.text.token_roles`), kept per scored token in the rows."""

    source: str
    index: int
    ids: np.ndarray
    turn_starts: np.ndarray | None = None
    boundary_id: int | None = None
    roles: str | None = None


def sink_cut(seq: Sequence, W: int, C: int, cut: str, ratio: float | None, n_drop: int, sink: int) -> Cut:
    """What the engine with ``truncation_sink=sink`` drops for the plain cut ``(cut, ratio, n_drop)``:
    ``turn``/``exact`` its own plan; ``mid`` and ``system`` the same end as the plain cut, the sink spared."""
    if not sink:
        return Cut(0, n_drop)
    if cut in ("turn", "exact"):
        return plan_truncation(seq.ids[:W], C, 0, W, ratio, seq.boundary_id, sink)
    s = min(sink, n_drop)
    return Cut(s, n_drop - s)


def cuts(seq: Sequence, W: int, C: int, ratios, variants: bool, sink: int = 0) -> list[tuple[str, float | None, int, Cut]]:
    """``(cut, ratio, n_drop, sink_cut)`` for the history ``seq.ids[:W]`` followed by ``C`` new tokens.

    ``turn``/``exact``: the engine's plan (at least ``ratio`` of the history and the overflow; whole
    turns when the text has turns). ``mid``: the same amount cut exactly there, inside a turn.
    ``system``: only the system block goes (the window is then exceeded by the rest of the overflow).
    ``n_drop`` is what TT/CA/NKVT drop from the front; ``sink_cut`` what the engine with
    ``truncation_sink=sink`` drops (:func:`sink_cut`).
    """
    hist = seq.ids[:W]
    out = []
    for r in ratios:
        n = plan_truncation(hist, C, 0, W, r, seq.boundary_id).n
        out.append(("turn" if seq.boundary_id is not None else "exact", r, n))
        if variants and seq.boundary_id is not None:
            m = plan_truncation(hist, C, 0, W, r, None).n
            while m < W - 1 and hist[m] == seq.boundary_id:
                m += 1
            out.append(("mid", r, m))
    if variants and seq.turn_starts is not None and len(seq.turn_starts) > 1:
        out.append(("system", None, int(seq.turn_starts[1])))
    return [(c, r, n, sink_cut(seq, W, C, c, r, n, sink)) for c, r, n in out if 0 < n < W]


def run(truncator: Truncator, sequences: list[Sequence], cfg: EvalConfig, *, conversations: list[dict] | None = None,
        tokenizer: Any = None, progress: Callable[[str, int], None] | None = None,
        on_window: Callable[[dict], None] | None = None) -> dict:
    """Score every (sequence, W, cut, method) and the recall items. Returns the ``results.json`` body
    (without the machine/model header): ``rows`` (one per sequence, W and cut, with per-token nll of
    each method and top-1 agreement with TT) and ``recall`` (one per item, W and ratio).
    ``on_window`` gets the results so far after each window (a long run leaves partial results)."""
    C = cfg.continuation
    rows, recall_rows = [], []
    tick = progress or (lambda what, n=1: None)
    for W in cfg.windows:
        for seq in sequences:
            if len(seq.ids) < W + C:
                continue
            hist = truncator.history(seq.ids[:W])
            cont = seq.ids[W : W + C]
            targets = cont[1:]
            full = truncator.full(hist, cont, targets)
            for cut, ratio, n_drop, scut in cuts(seq, W, C, cfg.ratios, cfg.variants, cfg.sink):
                t0 = time.perf_counter()
                res = {"Full": full}
                for m in ("TT", "CA", "NKVT") + (SINK_METHODS if cfg.sink else ()):
                    res[m] = truncator.run(m, hist, n_drop, cont, targets, cut=scut)
                sweep_cuts = {}
                for k in cfg.sweep:
                    sweep_cuts[k] = kc = sink_cut(seq, W, C, cut, ratio, n_drop, k)
                    res[f"TT+sink{k}"] = truncator.tt_sink(hist, kc, cont, targets)
                    res[f"CA+sink{k}"] = truncator.ca_sink(hist, kc, cont, targets)
                tt = res["TT"].top1
                row = {
                    "source": seq.source, "seq": seq.index, "W": W, "cut": cut, "ratio": ratio, "n_drop": n_drop,
                    "kept": W - n_drop, "C": C, "wall_s": round(time.perf_counter() - t0, 3),
                    "kv_exact": {m: r.kv_exact for m, r in res.items() if r.kv_exact is not None},
                    "nll": {m: [round(float(x), 5) for x in r.nll] for m, r in res.items()},
                    # the sink methods agree with TT+sink (the recompute of the same kept tokens)
                    "agree_tt": {m: float(np.mean(r.top1 == (res[m.replace("CA", "TT")].top1 if "+sink" in m else tt)))
                                 for m, r in res.items()},
                }
                if seq.roles is not None:  # the role of each scored target (ids[W+1 .. W+C-1])
                    row["roles"] = seq.roles[W + 1 : W + C]
                if cfg.sink:
                    row["sink"], row["sink_cut"] = cfg.sink, [scut.start, scut.n]
                if cfg.sweep:
                    row["sweep_cuts"] = {str(k): [c.start, c.n] for k, c in sweep_cuts.items()}
                rows.append(row)
                tick(f"{seq.source} W={W} {cut} {ratio}", 1)
        if conversations and tokenizer is not None and cfg.recall:
            recall_rows += _recall(truncator, conversations, tokenizer, W, cfg, tick)
        if on_window is not None:
            on_window({"rows": rows, "recall": recall_rows})
    return {"rows": rows, "recall": recall_rows}


def recall_items(conversations: list[dict], tokenizer: Any, W: int, cfg: EvalConfig) -> list:
    items = []
    for k in range(cfg.recall * 4):
        if len(items) == cfg.recall:
            break
        item = make_item(conversations[k % len(conversations)], tokenizer, W, seed=cfg.seed * 1000 + W + k)
        if item is not None:
            items.append(item)
    return items


def _recall(truncator: Truncator, conversations, tokenizer, W: int, cfg: EvalConfig, tick) -> list[dict]:
    out = []
    boundary = tokenizer.token_to_id("<|im_start|>")
    for i, item in enumerate(recall_items(conversations, tokenizer, W, cfg)):
        hist = truncator.history(item.history)
        cont = item.continuation
        targets = cont[1:]
        a = len(item.answer)
        full = truncator.full(hist, cont, targets)
        for r in cfg.ratios:
            # the window is the history: the question overflows it, whole turns go (the engine's plan)
            n_drop = plan_truncation(item.history, len(cont), 0, len(item.history), r, boundary).n
            sink_cut = plan_truncation(item.history, len(cont), 0, len(item.history), r, boundary, cfg.sink)
            hit = {"Full": recalled(full.top1, targets, a)}
            for m in ("TT", "CA", "NKVT") + (SINK_METHODS if cfg.sink else ()):
                hit[m] = recalled(truncator.run(m, hist, n_drop, cont, targets, cut=sink_cut).top1, targets, a)
            out.append({"W": W, "item": i, "ratio": r, "n_drop": n_drop, "history": len(item.history),
                        "fact": item.fact, "fact_kept": bool(n_drop <= item.turn_starts[-2]), "recalled": hit})
            tick(f"recall W={W} {r}", 1)
    return out


def count_units(sequences: list[Sequence], cfg: EvalConfig, n_recall: dict[int, int] | None = None) -> int:
    """Progress-bar total: one unit per (sequence, W, cut) and per (recall item, W, ratio)."""
    n = sum(len(cuts(s, W, cfg.continuation, cfg.ratios, cfg.variants, cfg.sink))
            for W in cfg.windows for s in sequences if len(s.ids) >= W + cfg.continuation)
    return n + sum((n_recall or {}).values()) * len(cfg.ratios)


def perplexity(nll) -> float:
    return float(math.exp(float(np.mean(nll))))
