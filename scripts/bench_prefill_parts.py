#!/usr/bin/env python
"""Where a short prefill against a long history spends its time: the whole decoder stack, its
attention alone, and its matmuls alone, each as one jitted program over every layer.

For ``--history`` cached tokens and ``--new`` new tokens (padded like the engine pads them), on
random weights of the model's shape:

* layers: ``layer_step`` over every layer (what the engine runs for a cached turn);
* attention: every layer's :func:`attention` over the history and the new tokens, with the
  history keys' RoPE (the part that grows with the history);
* matmuls: every layer's projections and MLP with no attention at all (the part that does not).

Medians of ``--repeat`` timed runs after one compiling run, in ms, all from one run of this script.

    python scripts/bench_prefill_parts.py --history 2048 --new 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jax_cachedattn.engine.prefill import prompt_bucket_length  # noqa: E402
from jax_cachedattn.model.config import ModelConfig  # noqa: E402
from jax_cachedattn.model.forward import bucket_length, init_params, query_block, unstack_layers  # noqa: E402
from jax_cachedattn.model.layers import apply_rope, attention, layer_rope_tables, layer_step, mlp, rms_norm  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model preset (configs/model/)")
    ap.add_argument("--history", type=int, default=2048)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = ap.parse_args(argv)

    cfg = ModelConfig.preset(args.model)
    L, H, K, Dh, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model
    S, T = bucket_length(args.history), prompt_bucket_length(args.new)
    layers = unstack_layers(init_params(cfg, jax.random.key(0)))
    ks = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(ks[0], (T, D), cfg.jnp_dtype)
    hist = [0.5 * jax.random.normal(k, (2, S, K, Dh), cfg.jnp_dtype) for k in jax.random.split(ks[1], L)]
    q = jax.random.normal(ks[2], (T, H, Dh), cfg.jnp_dtype)
    kn = q[:, :K]
    history_len = jnp.int32(args.history)
    positions = history_len + jnp.arange(T, dtype=jnp.int32)

    @jax.jit
    def stack(layers, x, hist):
        rope = layer_rope_tables(cfg, S, positions)
        for lp, kv in zip(layers, hist):
            x, _, _ = layer_step(lp, x, kv[0], kv[1], history_len, positions, cfg, query_block(T), rope=rope)
        return x

    @jax.jit
    def attention_only(q, kn, hist):
        cos_h, sin_h, cos_n, sin_n = layer_rope_tables(cfg, S, positions)
        out = jnp.zeros((), jnp.float32)
        for kv in hist:  # each layer's output feeds a scalar so that XLA cannot drop or merge layers
            k_hist = apply_rope(kv[0], cos_h, sin_h)
            a = attention(apply_rope(q, cos_n, sin_n), k_hist, kv[1], apply_rope(kn, cos_n, sin_n), kn, history_len,
                          block_q=query_block(T))
            out = out + a[0, 0, 0].astype(jnp.float32)
            q = q + a * 1e-3
        return out

    @jax.jit
    def matmuls_only(layers, x):
        for lp in layers:
            h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
            q, k, v = h @ lp["wq"], h @ lp["wk"], h @ lp["wv"]  # k, v feed x so that XLA keeps them
            x = x + q @ lp["wo"] + 1e-3 * (k.sum(axis=-1, keepdims=True) + v.sum(axis=-1, keepdims=True))
            x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_eps))
        return x

    parts = {
        "layers": lambda: stack(layers, x, hist),
        "attention": lambda: attention_only(q, kn, hist),
        "matmuls": lambda: matmuls_only(layers, x),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for f in parts.values():
        jax.block_until_ready(f())  # compile
    for _ in range(args.repeat):  # interleaved, so drift hits every part alike
        for name, f in parts.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - t0)
    res = {
        "model": cfg.name, "history": args.history, "new": args.new, "padded_new": T, "history_capacity": S,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(jax.devices()[0])},
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
    }
    print(f"{cfg.name}: {L} layers, history {args.history} (capacity {S}), new {args.new} (padded {T}); "
          f"median of {args.repeat} in ms")
    for k in parts:
        print(f"  {k:10s} {res[k + '_ms']:8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
