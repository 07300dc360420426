"""The sink sweep: CA against a recompute of the same kept tokens, for every sink size, with intervals.

For a sink of ``k`` tokens the pair is ``TT+sink{k}`` / ``CA+sink{k}`` (``k = 0``: the paper's TT / CA;
the run's own ``--sink``: ``TT+sink`` / ``CA+sink``). Every figure is ``ppl(CA_k) / ppl(TT_k) - 1`` on the
same scored tokens, with a 95 % paired bootstrap interval. Tokens of one text are correlated (a hard
passage is hard for both methods for a while), so the interval resamples **blocks** of ``BLOCK``
consecutive tokens, not single tokens (a token-level bootstrap is too narrow when the differences come
in runs). With few texts even that understates the spread *between* texts (one conversation can sit
several points away from another), so a second interval resamples whole texts (:func:`text_ci`): for the
per-window pooling, whole conversations. Also: the difference per position after the truncation point, per sequence, and how much of
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


def text_ci(a: Iterable, b: Iterable, n_boot: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95 % interval of ``ppl(a) / ppl(b) - 1`` resampling whole sequences (texts) rather than blocks of
    tokens: the spread between texts, what a block bootstrap of few texts misses. None for fewer than 2."""
    a, b = list(a), list(b)
    if len(a) < 2:
        return None
    return paired_ci(a, b, n_boot=n_boot, seed=seed, block=max(len(x) for x in a))


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
            "ci_token": paired_ci(a, b), "ci_text": text_ci(a, b), "tokens": int(d.size),
            "per_seq": [float(math.exp(np.mean(np.asarray(x) - np.asarray(y))) - 1) for x, y in zip(a, b)],
            # share of the summed |difference| carried by the 5 tokens with the largest ones
            "top5_share": float(top[:5].sum() / max(top.sum(), 1e-12)), "mean_abs": float(np.abs(d).mean()),
            # the comparison without those 5 tokens: is the gap a few tokens or spread over all of them?
            "diff_without_top5": float(math.exp(np.delete(d, order[:5]).mean()) - 1) if d.size > 5 else None,
            # does CA move the way the untruncated context does? corr. of (CA - TT) with (Full - TT), per token
            "corr_full": _corr(d, np.concatenate([np.asarray(r["nll"]["Full"]) - np.asarray(r["nll"][tt]) for r in rs]))
            if all("Full" in r["nll"] for r in rs) else None,
            "by_role": by_role(rs, tt, ca)}


def _corr(x: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.corrcoef(x, y)[0, 1]) if x.size > 2 and x.std() > 0 and y.std() > 0 else None


def by_role(rs: list[dict], tt: str, ca: str) -> dict | None:
    """Chats: the nll difference (CA - TT) per role of the scored token (``text.token_roles``: ``a``
    assistant, ``u`` user, ``s`` system, ``t`` template, ``f`` forced end of a capped reply): tokens,
    summed and mean difference in nats. None when a row has no roles (prose, or runs before roles were kept)."""
    if not rs or not all("roles" in r for r in rs):
        return None
    d = np.concatenate([np.asarray(r["nll"][ca]) - np.asarray(r["nll"][tt]) for r in rs])
    roles = np.asarray(list("".join(r["roles"] for r in rs)))
    return {k: {"tokens": int((roles == k).sum()), "sum": float(d[roles == k].sum()), "mean": float(d[roles == k].mean())}
            for k in sorted(set(roles.tolist()))}


def recompute_spread(rs: list[dict]) -> dict | None:
    """How far two recomputes of nearly the same kept tokens are apart (the sinks' TTs, >= 1 token: they keep
    the same tail and differ by a few tokens at the front): the pair furthest apart, its ``TT_j / TT_k - 1``
    and mean |nll difference| per token. The scale against which a CA - TT difference is noise or not."""
    common = set.intersection(*(set(pairs(r)) for r in rs))  # rows of runs with and without a sweep: shared sinks
    tts = [p[0] for k, p in sorted(pairs(rs[0]).items()) if k >= 1 and k in common]
    if len(tts) < 2:
        return None
    best = None
    for i, a in enumerate(tts):
        for b in tts[i + 1:]:
            d = np.concatenate([np.asarray(r["nll"][a]) - np.asarray(r["nll"][b]) for r in rs])
            c = {"pair": f"{a}/{b}", "diff": float(math.exp(d.mean()) - 1), "mean_abs": float(np.abs(d).mean())}
            if best is None or abs(c["diff"]) > abs(best["diff"]):
                best = c
    return best


def position_profile(rs: list[dict], tt: str, ca: str, bin_size: int = BLOCK) -> dict:
    """Mean nll difference (CA - TT) per bin of positions after the truncation point, pooled over rows."""
    n = min(len(r["nll"][tt]) for r in rs)
    d = np.asarray([np.asarray(r["nll"][ca][:n]) - np.asarray(r["nll"][tt][:n]) for r in rs], np.float64)
    edges = list(range(0, n, bin_size))
    return {"start": edges, "mean_diff": [float(d[:, e : e + bin_size].mean()) for e in edges]}


def per_text(rows: list[dict]) -> list[dict]:
    """One row per scored text: rows that score the same tokens (the cuts of one sequence at one W: their
    ``Full`` nll is the same, computed once per sequence and W) merged by averaging each method's nll per
    token. Pooling cuts of one text as separate samples counts its tokens twice; averaging them keeps the
    point estimate of plain pooling (when every text has as many cuts) and gives an interval over the texts'
    tokens, not over copies of them."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["source"], r["W"], r["seq"], tuple(r["nll"]["Full"]))].append(r)
    out = []
    for rs in groups.values():
        methods = set.intersection(*(set(r["nll"]) for r in rs))
        nll = {m: np.mean([np.asarray(r["nll"][m], np.float64) for r in rs], axis=0).tolist() for m in methods}
        out.append({**rs[0], "nll": nll, "cuts": len(rs)})
    return out


def by_window(rows: list[dict], sinks: list[int]) -> list[dict]:
    """Per (source, W): the engine's cuts (whole turns for chats, every ratio) pooled over texts, each text's
    cuts averaged first (:func:`per_text`)."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if r["cut"] in ("turn", "exact"):
            groups[(r["source"], r["W"])].append(r)
    out = []
    for (src, W), rs in sorted(groups.items()):
        texts = per_text(rs)
        out.append({"source": src, "W": W, "rows": len(rs), "texts": len(texts),
                    "by_sink": {str(k): _compare(texts, *pairs(rs[0])[k]) for k in sinks}})
    return out


def summarize(rows: list[dict]) -> dict:
    """Per (source, W, cut, ratio), per (source, W) over texts (:func:`by_window`), and pooled per
    (source, cut kind) and per source: each sink size's comparison."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[(r["source"], r["W"], r["cut"], r["ratio"])].append(r)
    key = lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] if kv[0][3] is not None else -1)
    sinks = sorted(set.intersection(*(set(pairs(r)) for r in rows)))
    run_sinks = {int(r["sink"]) for r in rows if r.get("sink")}
    # the engine's sink (the runs' --sink) is the one the per-token tables look at; else the largest swept
    out = {"sinks": sinks, "block": BLOCK, "groups": [], "pooled": [],
           "detail_sink": min(run_sinks) if len(run_sinks) == 1 and min(run_sinks) in sinks else max(sinks)}
    for (src, W, cut, ratio), rs in sorted(groups.items(), key=key):
        out["groups"].append({"source": src, "W": W, "cut": cut, "ratio": ratio, "sequences": len(rs),
                              "by_sink": {str(k): _compare(rs, *pairs(rs[0])[k]) for k in sinks},
                              "recompute_spread": recompute_spread(rs)})
    pooled: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in rows:
        kind = "engine" if r["cut"] in ("turn", "exact") else r["cut"]
        pooled[(r["source"], kind)].append(r)
        pooled[(r["source"], "all")].append(r)
    for (src, kind), rs in sorted(pooled.items()):
        out["pooled"].append({"source": src, "cuts": kind, "rows": len(rs),
                              "by_sink": {str(k): _compare(rs, *pairs(rs[0])[k]) for k in sinks},
                              "profile": {str(k): position_profile(rs, *pairs(rs[0])[k]) for k in sinks}})
    out["by_window"] = by_window(rows, sinks)
    return out


def _cell(c: dict) -> str:
    return f"{c['diff'] * 100:+.1f} [{c['ci'][0] * 100:+.1f}, {c['ci'][1] * 100:+.1f}]"


def _interval(ci) -> str:
    return "-" if ci is None else f"[{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"


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
    if s.get("by_window"):
        lines += ["", "**Per window**, the engine's cuts at every ratio, pooled over texts (the cuts of one text score "
                  "the same tokens: they are averaged per token first, so the interval is over the texts' tokens); "
                  "each sink's second column resamples whole texts (conversations) instead of 16-token blocks, and "
                  "the last column gives each text's own figure.", "",
                  f"| source | W | texts | rows | tokens | " + " | ".join(f"sink {k} | texts resampled" for k in ks)
                  + " | per text |", "|---|---|---|---|---|" + "---|" * (2 * len(ks) + 1)]
        for g in s["by_window"]:
            b = g["by_sink"]
            lines.append(f"| {g['source']} | {g['W']} | {g['texts']} | {g['rows']} | {b[str(ks[0])]['tokens']} | "
                         + " | ".join(f"{_cell(b[str(k)])} | {_interval(b[str(k)].get('ci_text'))}" for k in ks)
                         + " | " + ", ".join(f"{x * 100:+.1f}" for x in b[str(ks[-1])]["per_seq"]) + " |")
    k = s.get("detail_sink", max(ks))
    lines += ["", f"**Where the gap sits** (sink {k}): the share of the summed |nll difference| that the 5 tokens with "
              "the largest differences carry, the comparison without them, each sequence's own figure, the mean "
              "|nll difference| per token, the two recomputes (sink sizes >= 1) furthest apart on the same tokens, and "
              "the per-token correlation of CA - TT with Full - TT (> 0: CA moves the way the dropped context does).", "",
              "| source | W | cut | ratio | CA / TT - 1 | top-5 share | without the top 5 | per sequence | mean abs | "
              "recompute vs recompute: ratio, mean abs | corr. with Full - TT |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in s["groups"]:
        c = g["by_sink"][str(k)]
        wo = "-" if c["diff_without_top5"] is None else f"{c['diff_without_top5'] * 100:+.1f} %"
        sp = g.get("recompute_spread")
        spc = "-" if not sp else f"{sp['pair']} {sp['diff'] * 100:+.1f} %, {sp['mean_abs']:.3f}"
        cf = "-" if c.get("corr_full") is None else f"{c['corr_full']:+.2f}"
        lines.append(f"| {g['source']} | {g['W']} | {g['cut']} | {'-' if g['ratio'] is None else g['ratio']} | "
                     f"{c['diff'] * 100:+.1f} % | {c['top5_share']:.0%} | {wo} | "
                     + ", ".join(f"{x * 100:+.1f}" for x in c["per_seq"]) + f" | {c['mean_abs']:.3f} | {spc} | {cf} |")
    roles = [g for g in s["pooled"] if g["by_sink"][str(k)].get("by_role")]
    if roles:
        names = {"a": "assistant", "u": "user", "s": "system", "t": "template", "f": "forced end"}
        lines += ["", f"**By role of the scored token** (sink {k}, pooled): tokens, summed CA - TT nll difference "
                  "(nats) and its mean per token.", "", "| source | cuts | role | tokens | sum | mean |", "|---|---|---|---|---|---|"]
        for g in roles:
            for r, v in g["by_sink"][str(k)]["by_role"].items():
                lines.append(f"| {g['source']} | {g['cuts']} | {names.get(r, r)} | {v['tokens']} | {v['sum']:+.2f} | {v['mean']:+.4f} |")
    return "\n".join(lines) + "\n"
