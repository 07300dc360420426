"""``cachedattn bench --config PATH --out DIR [--mode] [--workload] [--systems] [--seed]``."""

from __future__ import annotations

import argparse


def cmd_bench(args) -> int:
    from . import config as C
    from .run import run_bench

    cfg = C.apply_overrides(C.load(args.config), mode=args.mode, workload=args.workload, systems=args.systems,
                            seed=args.seed)
    if args.sessions is not None:  # a shorter (or longer) trace: the warm-up keeps its share of the jobs
        old = int(cfg["workload"].get("sessions", args.sessions))
        cfg["workload"]["sessions"] = args.sessions
        cfg["warmup_turns"] = int(cfg["warmup_turns"] * args.sessions / max(1, old))
    run_bench(cfg, args.out, progress=not args.no_progress, jobs=args.jobs)
    return 0


def add_bench_command(sub) -> None:
    b = sub.add_parser("bench", help="every system of a config on one workload: results.json, a table, plots",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--config", required=True, help="YAML config (configs/bench/*.yaml)")
    b.add_argument("--out", required=True, help="output folder (results.json and PNG plots)")
    b.add_argument("--mode", choices=["real", "simulate"], default=None, help="override the config's mode")
    b.add_argument("--workload", default=None, help="override: sharegpt:FILE, sharegpt:package (the sharegpt extra) or synthetic:PRESET (sharegpt|paper|long)")
    b.add_argument("--systems", default=None, help="override: comma-separated systems, e.g. recompute,cachedattn,lru")
    b.add_argument("--seed", type=int, default=None, help="override the config's seed")
    b.add_argument("--sessions", type=int, default=None, help="override the number of sessions (the warm-up scaled with it)")
    b.add_argument("--jobs", type=int, default=1, help="simulate mode: worker processes for the systems and sweep points")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
