"""The sink sweep: CA against a recompute of the same kept tokens, for every sink size, with intervals.

For a sink of ``k`` tokens the pair is ``TT+sink{k}`` / ``CA+sink{k}`` (``k = 0``: the paper's TT / CA;
the run's own ``--sink``: ``TT+sink`` / ``CA+sink``). Every figure is ``ppl(CA_k) / ppl(TT_k) - 1`` on the
same scored tokens, with a 95 % paired bootstrap interval. Tokens of one text are correlated (a hard
passage is hard for both methods for a while), so the interval resamples **blocks** of ``BLOCK``
consecutive tokens, not single tokens (a token-level bootstrap is too narrow when the differences come
in runs). Also: the difference per position after the truncation point, per sequence, and how much of
it the few tokens with the largest differences carry (is a gap spread thin, or a handful of tokens?).
"""

from __future__ import annotations

import collections
import math
from typing import Iterable

import numpy as np

BLOCK = 16


def paired_ci(a: Iterable, b: Iterable, n_boot: int = 2000, seed: int = 0, block: int = 1) -> tuple[float, float]:
    """95 % interval of ``ppl(a) / ppl(b) - 1`` by a paired bootstrap of the nll differences of the same
    tokens under two methods, resampling non-overlapping blocks of ``block`` tokens of each sequence."""
    blocks = []
    for x, y in zip(a, b):
        d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
        blocks += [d[i : i + block] for i in range(0, d.size, block)]
    sums = np.asarray([bl.sum() for bl in blocks])
    counts = np.asarray([bl.size for bl in blocks], np.float64)
    idx = np.random.default_rng(seed).integers(0, len(blocks), (n_boot, len(blocks)))
    lo, hi = np.percentile(np.exp(sums[idx].sum(axis=1) / counts[idx].sum(axis=1)) - 1, [2.5, 97.5])
    return float(lo), float(hi)


def pairs(row: dict) -> dict[int, tuple[str, str]]:
    """Sink size -> (TT method, CA method) of one result row."""
    out = {0: ("TT", "CA")}
    if "TT+sink" in row["nll"]:
        out[int(row.get("sink", row.get("sink_cut", [4])[0]))] = ("TT+sink", "CA+sink")
    for m in row["nll"]:
        if m.startswith("TT+sink") and m[7:].isdigit():
            out[int(m[7:])] = (m, "CA" + m[2:])
    return dict(sorted(out.items()))


def _ppl(nlls) -> float:
    return float(math.exp(np.mean(np.concatenate([np.asarray(x, np.float64) for x in nlls]))))


def _compare(rs: list[dict], tt: str, ca: str) -> dict:
    a, b = [r["nll"][ca] for r in rs], [r["nll"][tt] for r in rs]
    p_tt, p_ca = _ppl(b), _ppl(a)
    d = np.concatenate([np.asarray(x) - np.asarray(y) for x, y in zip(a, b)])
    order = np.argsort(-np.abs(d), kind="stable")
    top = np.abs(d)[order]
    return {"tt": p_tt, "ca": p_ca, "diff": p_ca / p_tt - 1, "ci": paired_ci(a, b, block=BLOCK),
            "ci_token": paired_ci(a, b), "tokens": int(d.size),
            "per_seq": [float(math.exp(np.mean(np.asarray(x) - np.asarray(y))) - 1) for x, y in zip(a, b)],
            # share of the summed |difference| carried by the 5 tokens with the largest ones
            "top5_share": float(top[:5].sum() / max(top.sum(), 1e-12)), "mean_abs": float(np.abs(d).mean()),
            # the comparison without those 5 tokens: is the gap a few tokens or spread over all of them?
            "diff_without_top5": float(math.exp(np.delete(d, order[:5]).mean()) - 1) if d.size > 5 else None}


def position_profile(rs: list[dict], tt: str, ca: str, bin_size: int = BLOCK) -> dict:
    """Mean nll difference (CA - TT) per bin of positions after the truncation point, pooled over rows."""
    n = min(len(r["nll"][tt]) for r in rs)
    d = np.asarray([np.asarray(r["nll"][ca][:n]) - np.asarray(r["nll"][tt][:n]) for r in rs], np.float64)
    edges = list(range(0, n, bin_size))
    return {"start": edges, "mean_diff": [float(d[:, e : e + bin_size].mean()) for e in edges]}


def summarize(rows: list[dict]) -> dict:
    """Per (source, W, cut, ratio) and pooled per (source, cut kind) and per source: each sink size's comparison."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["source"], r["W"], r["cut"], r["ratio"])].append(r)
    key = lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] if kv[0][3] is not None else -1)
    sinks = sorted(set.intersection(*(set(pairs(r)) for r in rows)))
    out = {"sinks": sinks, "block": BLOCK, "groups": [], "pooled": []}
    for (src, W, cut, ratio), rs in sorted(groups.items(), key=key):
        out["groups"].append({"source": src, "W": W, "cut": cut, "ratio": ratio, "sequences": len(rs),
                              "by_sink": {str(k): _compare(rs, *pairs(rs[0])[k]) for k in sinks}})
    pooled: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        kind = "engine" if r["cut"] in ("turn", "exact") else r["cut"]
        pooled[(r["source"], kind)].append(r)
        pooled[(r["source"], "all")].append(r)
    for (src, kind), rs in sorted(pooled.items()):
        out["pooled"].append({"source": src, "cuts": kind, "rows": len(rs),
                              "by_sink": {str(k): _compare(rs, *pairs(rs[0])[k]) for k in sinks},
                              "profile": {str(k): position_profile(rs, *pairs(rs[0])[k]) for k in sinks}})
    return out


def _cell(c: dict) -> str:
    return f"{c['diff'] * 100:+.1f} [{c['ci'][0] * 100:+.1f}, {c['ci'][1] * 100:+.1f}]"


def markdown(s: dict) -> str:
    """Two tables: per group, and pooled; each cell ``CA_k / TT_k - 1`` in % with its block-bootstrap interval."""
    ks = s["sinks"]
    head = " | ".join(f"sink {k}" for k in ks)
    lines = [f"**Sink sweep**: perplexity of CA over a recompute of the same kept tokens (TT), in %, for each sink size; "
             f"95 % paired bootstrap over blocks of {s['block']} tokens in brackets; TT's perplexity with each sink "
             "in the last columns.", "",
             f"| source | W | cut | ratio | seqs | {head} | " + " | ".join(f"TT, sink {k}" for k in ks) + " |",
             "|---|---|---|---|---|" + "---|" * (2 * len(ks))]
    for g in s["groups"]:
        b = g["by_sink"]
        lines.append(f"| {g['source']} | {g['W']} | {g['cut']} | {'-' if g['ratio'] is None else g['ratio']:} | "
                     f"{g['sequences']} | " + " | ".join(_cell(b[str(k)]) for k in ks) + " | "
                     + " | ".join(f"{b[str(k)]['tt']:.3f}" for k in ks) + " |")
    lines += ["", "**Pooled** over windows and ratios (`engine`: the engine's cut, whole turns for chats; "
              "`all`: every cut).", "",
              f"| source | cuts | rows | tokens | {head} |", "|---|---|---|---|" + "---|" * len(ks)]
    for g in s["pooled"]:
        b = g["by_sink"]
        lines.append(f"| {g['source']} | {g['cuts']} | {g['rows']} | {b[str(ks[0])]['tokens']} | "
                     + " | ".join(_cell(b[str(k)]) for k in ks) + " |")
    k = max(ks)
    lines += ["", f"**Where the gap sits** (sink {k}): the share of the summed |nll difference| that the 5 tokens with "
              "the largest differences carry, the comparison without them, and each sequence's own figure.", "",
              "| source | W | cut | ratio | CA / TT - 1 | top-5 share | without the top 5 | per sequence |",
              "|---|---|---|---|---|---|---|---|"]
    for g in s["groups"]:
        c = g["by_sink"][str(k)]
        wo = "-" if c["diff_without_top5"] is None else f"{c['diff_without_top5'] * 100:+.1f} %"
        lines.append(f"| {g['source']} | {g['W']} | {g['cut']} | {'-' if g['ratio'] is None else g['ratio']} | "
                     f"{c['diff'] * 100:+.1f} % | {c['top5_share']:.0%} | {wo} | "
                     + ", ".join(f"{x * 100:+.1f}" for x in c["per_seq"]) + " |")
    return "\n".join(lines) + "\n"
