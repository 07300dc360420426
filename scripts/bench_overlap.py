#!/usr/bin/env python
"""TTFT of one turn by where the history's KV lives: how much of the load does layer-wise
pre-loading hide?

For each (history, new tokens) pair it measures the time to first token with the history
  (a) already on the device (the oracle),
  (b) in host memory, the engine's default (``preload="auto"``: one jitted program that moves each
      layer's pinned_host blocks to the device itself and lets XLA overlap the copies with compute);
      (b') the same history loaded by per-layer dispatch (one jitted step per layer, the load of
      layer l+k issued through async dispatch before layer l computes),
  (c) in host memory, loaded completely before prefill starts,
  (d) on disk only (page cache dropped), the engine's default (from disk: four such programs of
      growing size, each dispatched when its layers are read and verified),
  (e) recomputed from its token ids (no cache; the engine's default: one scanned program),
and reports the hidden fraction ``1 - (b - a)/(c - a)``, ``b/a``, ``b'/a``, ``d/a`` and ``e/b``.
(a), (b), (d) and (e) run exactly what ``Engine.turn`` runs by default, so each ratio compares
the best path for each case; ``--preload`` forces one for all of them.

The history's KV is synthetic (random values written through the store): speed does not
depend on the values. Every shape and mode is run once untimed first so compilation is excluded;
then the modes take turns, one timed turn each per round, so that drift in a shared machine's speed
hits them alike; ratios are medians of the per-round ratios.

    python scripts/bench_overlap.py --out runs/overlap.json            # SmolLM2 shape, CPU
    python scripts/bench_overlap.py --model llama2-7b --dtype bfloat16  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.model import ModelConfig, bucket_length, init_params
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

MODES = ("device", "host", "host_layerwise", "host_upfront", "disk", "recompute")


def drop_page_cache(root: Path) -> None:
    """Ask the kernel to forget cached pages of every file under ``root`` (no root needed)."""
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_history(store: TieredStore, sid: str, n: int, cfg: ModelConfig, rng: np.random.Generator) -> np.ndarray:
    """A committed session of ``n`` tokens with random KV and random token ids."""
    dt = store.layout.np_dtype
    for layer in range(cfg.num_layers):
        kv = rng.standard_normal((2, n, cfg.num_kv_heads, cfg.head_dim), dtype=np.float32).astype(dt)
        store.save_layer(sid, layer, kv, 0)
    ids = rng.integers(0, cfg.vocab_size, n, dtype=np.int32)
    store.commit_turn(sid, ids).result()
    return ids


def measure(params, cfg, root: Path, mode: str, hist: int, new: int, reps: int, rng, default: str = "auto",
            overrides: dict | None = None, warmup: bool = True) -> list[float]:
    """TTFT of ``reps`` turns of one mode, each on a fresh store (``warmup``: one untimed turn first,
    which compiles)."""
    dev_bytes = 0
    if mode == "device":
        dev_bytes = 4 * (hist + new + 64) * cfg.kv_bytes_per_token
    host_bytes = 4 * (hist + new + 1024) * cfg.kv_bytes_per_token
    times = []
    for rep in range(reps + int(warmup)):
        folder = root / f"{mode}-{hist}-{new}-{rep}"
        store = TieredStore(StoreConfig(root=str(folder), device_bytes=dev_bytes, host_bytes=host_bytes,
                                        token_block=256), KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                                   cfg.dtype, "bench"))
        preload = {"host_upfront": "upfront", "host_layerwise": "layerwise"}.get(mode, default)
        ec = EngineConfig(max_new_tokens=1, use_cache=mode != "recompute", preload=preload, **(overrides or {}))
        eng = Engine(cfg, params, store, None, ec)
        write_history(store, "s", hist, cfg, rng)
        store.flush()
        S = bucket_length(hist)
        if mode == "device":
            jax.block_until_ready([store.load_layer("s", l, pad_to=S) for l in range(cfg.num_layers)])
            assert store.lookup("s").tier == "device"
        elif mode == "disk":
            store.evict("s", "host")
            drop_page_cache(folder)
            assert store.lookup("s").tier == "disk"
        msg = rng.integers(0, cfg.vocab_size, new, dtype=np.int32)
        res = eng.turn("s", msg)
        expected = {"device": "device", "host": "host", "host_layerwise": "host", "host_upfront": "host",
                    "disk": "disk", "recompute": "recompute"}[mode]
        assert res.source == expected, (mode, res.source)
        if rep or not warmup:
            times.append(res.ttft_s)
        eng.close()
        shutil.rmtree(folder, ignore_errors=True)  # an 8K-token cell writes GBs: keep the disk free
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model preset in configs/model (default smollm2-135m)")
    ap.add_argument("--dtype", default=None, help="override the preset's dtype (float32, bfloat16)")
    ap.add_argument("--history", default="512,1024,2048,4096", help="comma-separated history lengths (tokens)")
    ap.add_argument("--new", default="32,100,512", help="comma-separated new-token counts")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per cell (median reported)")
    ap.add_argument("--recompute-reps", type=int, default=1, help="timed repetitions of the slow recompute mode")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--dir", default=None, help="folder for the disk tier (default: a temp folder under runs/, which git ignores)")
    ap.add_argument("--preload", default="auto", choices=("auto", "layerwise", "in_program"),
                    help="how (a), (b), (d) and (e) load the history (default: the engine's default, auto)")
    ap.add_argument("--program-groups", type=int, default=None, help="EngineConfig.program_groups (default: the engine's)")
    ap.add_argument("--group-growth", type=float, default=None, help="EngineConfig.group_growth (default: the engine's)")
    ap.add_argument("--prompt-bucket", type=int, default=None, help="EngineConfig.prompt_bucket (default: the engine's)")
    ap.add_argument("--quick", action="store_true", help="history 512,2048 and new 100 only, 2 reps")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    overrides = {"dtype": args.dtype} if args.dtype else {}
    cfg = ModelConfig.preset(args.model, **overrides)
    hists = [512, 2048] if args.quick else [int(x) for x in args.history.split(",")]
    news = [100] if args.quick else [int(x) for x in args.new.split(",")]
    reps = 2 if args.quick else args.reps
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")
    cfg = cfg.replace(max_context=max(cfg.max_context, max(hists) + max(news) + 64))
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    if args.dir is None:
        Path("runs").mkdir(exist_ok=True)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench-overlap-", dir="runs"))
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "jax": jax.__version__,
               "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, "cpus": os.cpu_count()}
    overrides = {k: v for k, v in (("program_groups", args.program_groups), ("group_growth", args.group_growth),
                                   ("prompt_bucket", args.prompt_bucket)) if v is not None}
    rows = []
    print(f"model {cfg.name} ({cfg.dtype}) on {machine['device_kind']}; TTFT median in ms", flush=True)
    print(f"{'hist':>6} {'new':>5} " + " ".join(f"{m:>15}" for m in modes) + "  hidden   b/a  b'/a   d/a   e/b", flush=True)
    for h in hists:
        for n in news:
            cell = {"history": h, "new": n}
            # Modes interleave round by round (after one untimed, compiling turn each), so that drift
            # in the machine's speed hits every mode alike; ratios are medians of per-round ratios.
            for m in modes:
                measure(params, cfg, root, m, h, n, 0, rng, args.preload, overrides)
            times = {m: [] for m in modes}
            for r in range(max(reps, args.recompute_reps)):
                for m in modes:
                    if r < (args.recompute_reps if m == "recompute" else reps):
                        times[m] += measure(params, cfg, root, m, h, n, 1, rng, args.preload, overrides, warmup=False)
            for m in modes:
                cell[m] = statistics.median(times[m])
                cell[m + "_all"] = times[m]

            def ratio(x: str, y: str) -> float | None:
                pairs = list(zip(times.get(x, []), times.get(y, [])))
                return statistics.median(p / q for p, q in pairs) if pairs else None

            a, c = cell.get("device"), cell.get("host_upfront")
            b = cell.get("host")
            if None not in (a, b, c):
                cell["hidden_fraction"] = 1 - (b - a) / (c - a) if c > a else float("nan")
            for key, (x, y) in {"b_over_a": ("host", "device"), "layerwise_over_a": ("host_layerwise", "device"),
                                "d_over_a": ("disk", "device"), "e_over_b": ("recompute", "host")}.items():
                v = ratio(x, y)
                if v is not None:
                    cell[key] = v
            rows.append(cell)
            fmt = lambda k: f"{cell[k]:6.2f}" if k in cell else "     -"  # noqa: E731
            print(f"{h:>6} {n:>5} " + " ".join(f"{cell[m] * 1000:15.1f}" for m in modes)
                  + f"  {fmt('hidden_fraction')} {fmt('b_over_a')} {fmt('layerwise_over_a')} {fmt('d_over_a')} {fmt('e_over_b')}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": cfg.to_dict(), "machine": machine, "preload": args.preload,
                                               "engine_overrides": overrides, "command": sys.argv,
                                               "rows": rows}, indent=1))
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
