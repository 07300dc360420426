"""Train the tiny byte-level Llama model used by the truncation experiment and its test.

    python scripts/train_tiny.py --out tests/data/tiny_bytes --steps 200 --seed 0

Trains `jax_cachedattn.evaluation.tiny.tiny_config()` with optax (AdamW, warm-up + cosine) on random
windows of the `pydoc_data.topics` training split (bytes as tokens), then writes the params with the
project's orbax `save_params` (config beside it as ``<out>.config.json``) and a ``<out>.train.json``
with the training config, the loss curve and the held-out loss. Seeded: same flags, same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/data/tiny_bytes", help="checkpoint folder (replaced)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=256, help="bytes per training sequence")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    ap.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    args = ap.parse_args(argv)

    from rich.progress import Progress

    from jax_cachedattn.checkpoint import save_params
    from jax_cachedattn.evaluation.text import pydoc_text
    from jax_cachedattn.evaluation.tiny import TrainConfig, encode_bytes, eval_loss, train

    try:
        tc = TrainConfig(steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                         warmup=min(args.warmup, args.steps), seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train_ids, eval_ids = encode_bytes(pydoc_text("train")), encode_bytes(pydoc_text("eval"))
    t0 = time.perf_counter()
    with Progress() as prog:
        task = prog.add_task("training", total=tc.steps)
        config, params, losses = train(train_ids, tc, on_step=lambda i, loss: prog.update(
            task, advance=1, description=f"training (loss {loss:.3f})"))
    wall = time.perf_counter() - t0
    held_out = eval_loss(params, config, eval_ids, tc.seq_len)
    out = save_params(args.out, params, config)
    meta = {"train": dataclasses.asdict(tc), "losses": [round(x, 5) for x in losses],
            "final_train_loss": float(np.mean(losses[-10:])), "held_out_loss": held_out, "wall_s": round(wall, 1),
            "train_bytes": int(len(train_ids)), "eval_bytes": int(len(eval_ids))}
    Path(str(out) + ".train.json").write_text(json.dumps(meta, indent=1))
    print(f"trained {tc.steps} steps in {wall:.0f} s: train loss {meta['final_train_loss']:.3f}, "
          f"held-out {held_out:.3f} nats/byte -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
