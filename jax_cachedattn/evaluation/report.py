"""Tables, plot and ``results.json`` of the truncation experiment.

Perplexity is ``exp(mean nll)`` over every scored continuation token of every sequence in a group
(pooled, not a mean of per-sequence perplexities). ``CA/TT`` is the ratio of those perplexities.
Top-1 agreement is the fraction of scored positions where a method's argmax equals TT's.
"""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jax_cachedattn.evaluation import sweep
from jax_cachedattn.evaluation.methods import METHODS, SINK_METHODS
from jax_cachedattn.evaluation.sweep import BLOCK, paired_ci


def _methods(rows) -> tuple[str, ...]:
    """The methods every row has: the four, the engine's sink pair, then the sweep's pairs by sink size."""
    have = set.intersection(*(set(r) for r in rows)) if rows else set()
    sweep = sorted((m for m in have if m[:7] in ("TT+sink", "CA+sink") and m[7:].isdigit()),
                   key=lambda m: (int(m[7:]), m[:2] == "CA"))
    return METHODS + tuple(m for m in SINK_METHODS if m in have) + tuple(sweep)


def _ppl(nlls: list[list[float]]) -> float:
    return float(math.exp(np.mean(np.concatenate([np.asarray(x, np.float64) for x in nlls]))))


def summarize(results: dict) -> dict:
    """Group rows by (model, source, W, cut, ratio): perplexity per method, CA/TT, agreement with TT."""
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in results["rows"]:
        groups[(r["source"], r["W"], r["cut"], r["ratio"])].append(r)
    ppl = []
    for (src, W, cut, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                                        kv[0][3] if kv[0][3] is not None else -1)):
        ms = _methods([r["nll"] for r in rs])
        row = {"source": src, "W": W, "cut": cut, "ratio": ratio, "sequences": len(rs),
               "tokens": sum(len(r["nll"]["TT"]) for r in rs), "n_drop_mean": float(np.mean([r["n_drop"] for r in rs])),
               "ppl": {m: _ppl([r["nll"][m] for r in rs]) for m in ms},
               "agree_tt": {m: float(np.mean([r["agree_tt"][m] for r in rs])) for m in ms},
               "kv_exact": all(all(v is not False for v in r["kv_exact"].values()) for r in rs)}
        row["ca_over_tt"] = row["ppl"]["CA"] / row["ppl"]["TT"]
        if all("sink_cut" in r for r in rs):
            row["sink_drop_mean"] = float(np.mean([r["sink_cut"][1] for r in rs]))
            row["sink_ci"] = paired_ci([r["nll"]["CA+sink"] for r in rs], [r["nll"]["TT+sink"] for r in rs], block=BLOCK)
        ppl.append(row)
    rec_groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for r in results.get("recall", []):
        rec_groups[(r["W"], r["ratio"])].append(r)
    recall = [{"W": W, "ratio": ratio, "items": len(rs),
               "accuracy": {m: float(np.mean([r["recalled"][m] for r in rs])) for m in _methods([r["recalled"] for r in rs])},
               "correct": {m: int(sum(r["recalled"][m] for r in rs)) for m in _methods([r["recalled"] for r in rs])}}
              for (W, ratio), rs in sorted(rec_groups.items())]
    return {"perplexity": ppl, "recall": recall}


def _r(x) -> str:
    return "-" if x is None else f"{x:g}"


def markdown(summary: dict, model: str) -> str:
    """The README tables."""
    lines = [f"**{model}**: perplexity of the continuation after the truncation point (lower is better); "
             "top-1 agreement with TT in parentheses.", "",
             "| source | W | cut | ratio | dropped | TT | CA | NKVT | Full | CA/TT | seqs × tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sink = any("CA+sink" in g["ppl"] for g in summary["perplexity"])
    if sink:
        lines[0] += (" TT+sink/CA+sink keep the first tokens and drop the ones after them, as the engine does;"
                     " CA+sink's agreement is with TT+sink.")
        lines[2] = lines[2].replace(" CA/TT |", " CA/TT | dropped after sink | TT+sink | CA+sink | CA+sink / TT+sink [95 % CI] |")
        lines[3] += "---|---|---|---|"
    for g in summary["perplexity"]:
        p, a = g["ppl"], g["agree_tt"]
        extra = ""
        if "CA+sink" in p:
            extra = (f" {g.get('sink_drop_mean', float('nan')):.0f} | {p['TT+sink']:.3f} | {p['CA+sink']:.3f} ({a['CA+sink']:.0%}) | "
                     f"{(p['CA+sink'] / p['TT+sink'] - 1) * 100:+.2f} %"
                     + (f" [{g['sink_ci'][0] * 100:+.1f}, {g['sink_ci'][1] * 100:+.1f}]" if "sink_ci" in g else "") + " |")
        lines.append(
            f"| {g['source']} | {g['W']} | {g['cut']} | {_r(g['ratio'])} | {g['n_drop_mean']:.0f} | {p['TT']:.3f} | "
            f"{p['CA']:.3f} ({a['CA']:.0%}) | {p['NKVT']:.3f} ({a['NKVT']:.0%}) | {p['Full']:.3f} ({a['Full']:.0%}) | "
            f"{(g['ca_over_tt'] - 1) * 100:+.2f} % |{extra} {g['sequences']} × {g['tokens'] // max(1, g['sequences'])} |")
    if summary["recall"]:
        lines += ["", f"**{model}**: recall (exact match of the fact's tokens under greedy decoding).", "",
                  "| W | ratio | items | TT | CA | NKVT | Full |", "|---|---|---|---|---|---|---|"]
        rm = ("TT", "CA", "NKVT", "Full") + tuple(m for m in SINK_METHODS if m in summary["recall"][0]["correct"])
        lines[-2] = "| W | ratio | items | " + " | ".join(rm) + " |"
        lines[-1] = "|---|---|---|" + "---|" * len(rm)
        for g in summary["recall"]:
            c, n = g["correct"], g["items"]
            lines.append(f"| {g['W']} | {_r(g['ratio'])} | {n} | " + " | ".join(
                f"{c[m]}/{n} ({g['accuracy'][m]:.0%})" for m in rm) + " |")
    return "\n".join(lines) + "\n"


def position_curves(results: dict, source: str, W: int, ratio: float, cut: str, bin_size: int = 16) -> dict:
    """Perplexity per bin of positions after the truncation point, per method (pooled over sequences)."""
    rs = [r for r in results["rows"] if (r["source"], r["W"], r["ratio"], r["cut"]) == (source, W, ratio, cut)]
    if not rs:
        return {}
    n = min(len(r["nll"]["TT"]) for r in rs)
    edges = list(range(0, n, bin_size))
    out = {"x": [e + min(bin_size, n - e) / 2 for e in edges]}
    for m in _methods([r["nll"] for r in rs]):
        arr = np.asarray([r["nll"][m][:n] for r in rs], np.float64)
        out[m] = [float(math.exp(arr[:, e : e + bin_size].mean())) for e in edges]
    return out


def plot(results: dict, path: Path, ratio: float = 0.5, bin_size: int = 16) -> Path | None:
    """PNG: perplexity against position after the truncation point, one panel per (source, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["source"], r["W"], r["cut"]) for r in results["rows"] if r["ratio"] == ratio
                   and r["cut"] in ("turn", "exact")})
    if not keys:
        return None
    srcs = sorted({k[0] for k in keys})
    Ws = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(srcs), len(Ws), figsize=(4 * len(Ws), 3.2 * len(srcs)), squeeze=False)
    styles = {"TT": ("k", "-"), "CA": ("tab:blue", "--"), "NKVT": ("tab:red", "-"), "Full": ("tab:green", ":"),
              "TT+sink": ("tab:gray", "-."), "CA+sink": ("tab:purple", "--")}
    for i, s in enumerate(srcs):
        for j, W in enumerate(Ws):
            ax = axes[i][j]
            cut = next((k[2] for k in keys if k[:2] == (s, W)), None)
            cur = position_curves(results, s, W, ratio, cut, bin_size) if cut else {}
            if not cur:
                ax.set_visible(False)
                continue
            for m in [k for k in cur if k in styles]:  # the sweep's pairs are in the sweep table, not here
                c, ls = styles[m]
                ax.plot(cur["x"], cur[m], color=c, linestyle=ls, label=m)
            ax.set_yscale("log")
            ax.set_title(f"{s}, W={W}, ratio {ratio}")
            ax.set_xlabel("tokens after the truncation point")
            ax.set_ylabel("perplexity")
    axes[0][0].legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict, out_dir: Path, header: dict[str, Any]) -> dict[str, Path]:
    """``results.json`` (header, summary, every row), ``tables.md`` and ``ppl_vs_position.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    tables = markdown(summary, header.get("model", {}).get("name", "model"))
    if results["rows"] and any("sweep_cuts" in r or "sink_cut" in r for r in results["rows"]):
        summary["sink_sweep"] = sweep.summarize(results["rows"])
        tables += "\n" + sweep.markdown(summary["sink_sweep"])
    body = {**header, "summary": summary, **results}
    (out_dir / "results.json").write_text(json.dumps(body, indent=1))
    (out_dir / "tables.md").write_text(tables)
    files = {"results": out_dir / "results.json", "tables": out_dir / "tables.md"}
    for ratio in sorted({r["ratio"] for r in results["rows"] if r["ratio"] is not None}):
        p = plot(results, out_dir / f"ppl_vs_position_r{ratio:g}.png", ratio=ratio)
        if p is not None:
            files[f"plot_r{ratio:g}"] = p
    return files
