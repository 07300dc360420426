"""Does chunked prefill pay on this machine? One SmolLM2 fp32 prefill of N new tokens as one program
against the same N tokens as N/C chunks, each against the history the chunks before it left (what a
chunked-prefill engine runs between decode steps). Chunking pays in throughput only if the chunks'
sum is not slower; its gain is latency for the slots decoding meanwhile (they wait for one chunk,
not the whole prefill), which the ratio below prices.

    JAX_PLATFORMS=cpu python scripts/bench_chunked_prefill.py --tokens 2048 --chunks 512,1024
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="new tokens of the prefill")
    ap.add_argument("--chunks", default="512,1024", help="chunk sizes to compare")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions (best is kept)")
    args = ap.parse_args()
    from jax_cachedattn.engine import programs as P
    from jax_cachedattn.model import unstack_layers
    from jax_cachedattn.runtime import load_model

    m = load_model("smollm2")
    cfg, layers = m.config, tuple(unstack_layers(m.params))
    N = args.tokens
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, N).astype(np.int32)
    nL = len(layers)

    def run(chunk: int) -> float:
        hists = None
        t = time.perf_counter()
        for c0 in range(0, N, chunk):
            x = P.embed_tokens(m.params, cfg, jnp.asarray(ids[c0:c0 + chunk]))
            pos = jnp.arange(c0, c0 + chunk, dtype=jnp.int32)
            if c0 == 0:
                blocks, offs = tuple(() for _ in range(nL)), jnp.zeros(nL, jnp.int32)
            else:
                blocks = tuple((jnp.concatenate([hists[i], news[i]], axis=1),) for i in range(nL))
                offs = jnp.zeros(nL, jnp.int32)
            x, h, news_ = P.layers_in_program(layers, cfg, x, blocks, offs, jnp.int32(c0), pos, c0, False)
            hists = [b[0] for b in blocks] if c0 else [jnp.zeros((2, 0, cfg.num_kv_heads, cfg.head_dim))] * nL
            news = news_
            x.block_until_ready()
        return time.perf_counter() - t

    rows = {}
    for chunk in [N] + [int(c) for c in args.chunks.split(",")]:
        run(chunk)  # compile
        rows[chunk] = min(run(chunk) for _ in range(args.reps))
        print(f"chunk {chunk:5d}: {rows[chunk]:.2f} s for {N} tokens ({rows[chunk] / rows[N]:.2f}x one program); "
              f"a decoding slot waits {rows[chunk] / (N // chunk):.2f} s per chunk", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
