"""PNG plots beside results.json: TTFT CDF per system, hit rate by tier per system, hit rate by turn
index, and hit rate against host capacity per policy (when a sweep ran)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = results["systems"]
    written = []

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in systems.items():
        x = np.sort(np.asarray(r.get("ttft_samples_s", [])))
        if len(x):
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("CDF")
    ax.legend(fontsize=7)
    save(fig, "ttft_cdf.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(systems)
    bottom = np.zeros(len(names))
    for tier in ("device", "host", "disk"):
        v = np.array([systems[n]["hit_rate_by_tier"][tier] for n in names])
        ax.bar(names, v, bottom=bottom, label=tier)
        bottom += v
    ax.plot(names, [systems[n]["reuse_upper_bound"] for n in names], "k_", markersize=20, label="upper bound")
    ax.set_ylabel("token hit rate")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.legend(fontsize=7)
    save(fig, "hit_rate_by_tier.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in systems.items():
        bt = r["hit_rate_by_turn"]
        ax.plot(list(bt), [v["hit_rate"] for v in bt.values()], marker="o", label=name)
    if systems:
        bt = next(iter(systems.values()))["hit_rate_by_turn"]
        ax.plot(list(bt), [v["upper_bound"] for v in bt.values()], "k--", label="upper bound")
    ax.set_xlabel("turn index")
    ax.set_ylabel("token hit rate")
    ax.legend(fontsize=7)
    save(fig, "hit_rate_by_turn.png")

    sw = results.get("sweep")
    if sw:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, rows in sw["policies"].items():
            axes[0].plot(sw["host_capacity"], [r["token_hit_rate"] for r in rows], marker="o", label=name)
            axes[1].plot(sw["host_capacity"], [r["memory_hit_rate"] for r in rows], marker="o", label=name)
        ub = next(iter(sw["policies"].values()))
        axes[0].plot(sw["host_capacity"], [r["reuse_upper_bound"] for r in ub], "k--", label="upper bound")
        axes[0].set_title("token hit rate (any tier)")
        axes[1].set_title("served from device/host memory")
        for ax in axes:
            ax.set_xlabel(f"host capacity ({sw['unit']})")
            ax.set_xscale("log")
            ax.legend(fontsize=7)
        save(fig, "hit_rate_vs_capacity.png")
    return written
