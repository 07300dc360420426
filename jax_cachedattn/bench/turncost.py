"""What one reused turn costs against its prompt's padded length: the measurement behind the prompt
buckets (``engine/prefill.py``, ``prompt_bucket_length``) and the history buckets (``bucket_length``).

For every history length ``--history`` and padded prompt length ``--prompt`` (each a multiple of 8,
sent as exactly that many tokens, so the bucket is the prompt itself), a fresh session gets a first
turn of the history's length, then ``1 + --repeat`` turns of the prompt's length whose history is in
the engine's page pool (the device tier, what ``cachedattn bench``'s reused turns meet). The first of
them compiles (its time less the median of the rest is the compile time of that shape); the TTFT of
the rest is the cost. Per history, a least-squares line ``TTFT = c0 + a * T`` over the prompt
lengths splits the turn into a fixed part (``c0``: reading the history from the pool, attention
over it, the per-layer launches, the first token) and a per-new-token part (``a``).

    python -m jax_cachedattn.bench.turncost --history 300,800,1800 --prompt 8,16,32,64 --repeat 2 --out runs/turncost.json
    python -m jax_cachedattn.bench.turncost --count-programs configs/bench/cpu.yaml   # shapes per bucket rule
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def measure(history: list[int], prompts: list[int], repeat: int, weights: str = "random", max_context: int = 2048) -> dict:
    import numpy as np

    from jax_cachedattn.model.forward import bucket_length
    from jax_cachedattn.scheduler import make_policy

    from .real import load_bench_model, open_system
    from .systems import SYSTEMS

    cfg = {"seed": 0, "model": {"name": "smollm2", "max_context": max_context, "random_weights": weights == "random"},
           "store": {"kvstore": "memory", "device_mib": 96, "host_mib": 512, "token_block": 128},
           "engine": {"max_new_tokens": 4, "prompt_bucket": 8}}
    model = load_bench_model(cfg)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine, _, store = open_system(SYSTEMS["cachedattn"], cfg, model, Path(tmp), make_policy("lru"))
        rng = np.random.default_rng(0)
        vocab = model.config.vocab_size
        for H in history:
            fits = []
            for T in prompts:
                sid = f"h{H}-t{T}"
                engine.turn(sid, rng.integers(16, vocab, H, dtype=np.int32), max_new_tokens=4)
                times, sources, S = [], [], []
                for _ in range(1 + repeat):
                    r = engine.turn(sid, rng.integers(16, vocab, T, dtype=np.int32), max_new_tokens=4)
                    times.append(r.ttft_s)
                    sources.append(r.source)
                    S.append(bucket_length(r.history_tokens))
                steady = statistics.median(times[1:])
                row = {"history": H, "history_bucket": S[0], "prompt": T, "ttft_s": steady, "ttft_all_s": times,
                       "compile_s": max(0.0, times[0] - steady), "sources": sources, "buckets_seen": sorted(set(S))}
                rows.append(row)
                fits.append((T, steady))
                print(json.dumps({k: row[k] for k in ("history", "history_bucket", "prompt", "ttft_s", "compile_s",
                                                      "sources", "buckets_seen")}), flush=True)
                engine.evict(sid, "disk")
        engine.close()
    lines = {}
    for H in history:
        pts = [(r["prompt"], r["ttft_s"]) for r in rows if r["history"] == H]
        if len(pts) >= 2:
            a, c0 = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1)
            lines[str(H)] = {"fixed_s": float(c0), "per_token_s": float(a)}
    return {"rows": rows, "fit": lines}


def count_programs(cfg: dict, history_steps=(256, 512), prompt_steps=(64, 16, 8)) -> list[dict]:
    """Distinct (history bucket, prompt bucket) prefill shapes that a config's trace meets on the
    reusing path (each user turn against its history, then its fed reply appended), per bucket rule:
    history buckets powers of two up to ``step`` then multiples of it (``bucket_length``), prompt
    buckets ``prompt_bucket_length`` at each step. Counts, no timing: each shape is one compile of
    the in-program prefill (15-28 s each on this CPU, ``measure``). Also the padded tokens per turn."""
    from jax_cachedattn.engine.prefill import prompt_bucket_length
    from jax_cachedattn.model.forward import bucket_length

    from .real import RealBench

    bench = RealBench(cfg, Path("/tmp/turncost-count"))
    lens = [[(len(t.prompt_ids), len(bench.replies.get((s.sid, k), ()))) for k, t in enumerate(s.turns)]
            for s in bench.workload.sessions]
    out = []
    for hs in history_steps:
        for ps in prompt_steps:
            turns, appends, pad_p, pad_h, n = set(), set(), 0, 0, 0
            for sess in lens:
                h = 0
                for m, r in sess:
                    S, T = bucket_length(h, step=hs), prompt_bucket_length(m, ps)
                    turns.add((S, T))
                    pad_p, pad_h, n = pad_p + T - m, pad_h + S - h, n + 1
                    h += m + int(cfg["engine"].get("max_new_tokens", 4))
                    if r:
                        appends.add((bucket_length(h, step=hs), prompt_bucket_length(r, ps)))
                        h += r
            out.append({"history_step": hs, "prompt_step": ps, "turn_shapes": len(turns), "append_shapes": len(appends),
                        "shapes": len(turns | appends), "prompt_pad_per_turn": pad_p / n, "history_pad_per_turn": pad_h / n})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", default="300,800,1700", help="history lengths (comma-separated)")
    ap.add_argument("--prompt", default="8,16,32,64", help="prompt lengths, each sent as that many tokens")
    ap.add_argument("--repeat", type=int, default=3, help="measured turns per shape (after one compiling turn)")
    ap.add_argument("--weights", choices=("random", "smollm2"), default="random",
                    help="SmolLM2's shape with random weights (speed does not depend on the values) or the real ones")
    ap.add_argument("--out", default=None)
    ap.add_argument("--count-programs", metavar="CONFIG", default=None,
                    help="only count the prefill shapes CONFIG's trace meets under each bucket rule (no timing)")
    args = ap.parse_args(argv)
    if args.count_programs:
        from . import config as C

        rows = count_programs(C.validate(C.load(args.count_programs)))
        for r in rows:
            print(json.dumps(r))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))
        return 0
    hist = [int(x) for x in args.history.split(",")]
    prompts = [int(x) for x in args.prompt.split(",")]
    t0 = time.time()
    res = measure(hist, prompts, args.repeat, args.weights)
    res.update(machine={"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": None},
               args=vars(args), wall_s=time.time() - t0)
    for H, f in res["fit"].items():
        print(f"history {H}: TTFT ~ {f['fixed_s'] * 1e3:.0f} ms + {f['per_token_s'] * 1e3:.2f} ms x padded prompt tokens")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
