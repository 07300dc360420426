"""Where a reused turn's fixed part goes: the stages of a device-pool hit, timed one by one.

``python -m jax_cachedattn.bench.turncost`` found that a turn whose history is in the engine's page
pool costs 0.4-0.75 s before any new token (SmolLM2-135M fp32 on this CPU, 0.3-1.8K history). This
module splits that TTFT into the engine's own programs, in the order the engine runs them
(``engine.py``, ``_resume``): ``read_rows`` (the history's rows gathered out of the pool, every layer,
padded to the history bucket), ``embed_tokens``, ``layers_in_program`` (the 30 layers in one program:
the history assembled, RoPE, attention over the padded bucket, the weight matmuls), ``write_pages``
(the new rows into the pool), ``logits_at`` (final norm and the output projection of one row) and
``insert`` (the first token sampled, the slot's decode state). Each program is wrapped so that the
caller waits for its result before the next starts (the engine dispatches them asynchronously and
waits once, at the first token; the sum of the stages is therefore an upper bound of the serial
work, and ``TTFT - sum`` is the host's own time: planning, page bookkeeping, dispatch).

Then ``layers_in_program`` alone, with the same new tokens, against the history bucket and against
no history at all (``cap = 0``): the difference is what the history costs inside the program
(assembling the padded bucket, RoPE of the history keys, attention over it); the ``cap = 0`` run is
the weight matmuls of the new tokens. Before the measured turns the store's background saves are
flushed (``--no-flush`` keeps them running, as in a replay).

    python -m jax_cachedattn.bench.turnprofile --history 300,800,1800 --prompt 16 --repeat 3 --out runs/turnprofile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

STAGES = ("read_rows", "embed_tokens", "layers_in_program", "write_pages", "logits_at")


class StageTimer:
    """Wraps the engine's programs (module attributes, looked up at call time) with a timer that
    waits for each result; ``insert`` is the decode state's (``engine/slots.py``)."""

    def __init__(self):
        from jax_cachedattn.engine import programs as P, slots as SL

        self.times: dict[str, list[float]] = collections.defaultdict(list)
        self._undo = []
        for mod, names in ((P, STAGES), (SL, ("insert",))):
            for n in names:
                f = getattr(mod, n)
                self._undo.append((mod, n, f))
                setattr(mod, n, self._wrap(n, f))

    def _wrap(self, name, f):
        import jax

        def timed(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            jax.block_until_ready(out)
            self.times[name].append(time.perf_counter() - t)
            return out

        return timed

    def take(self) -> dict:
        out = {k: sum(v) for k, v in self.times.items()}
        self.times.clear()
        return out

    def close(self) -> None:
        for mod, n, f in self._undo:
            setattr(mod, n, f)


def _median(rows: list[dict]) -> dict:
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in rows[0]}


def measure(history: list[int], prompt: int, repeat: int, flush: bool = True, max_context: int = 2048,
            model_name: str = "smollm2") -> dict:
    """Per history: the staged and the plain TTFT of ``repeat`` device-pool turns of ``prompt`` new tokens
    (random weights of ``model_name``'s shape), and ``layers_in_program`` alone with and without history."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_cachedattn.engine import programs as P
    from jax_cachedattn.model import bucket_length
    from jax_cachedattn.scheduler import make_policy

    from .real import load_bench_model, open_system
    from .systems import SYSTEMS

    cfg = {"seed": 0, "model": {"name": model_name, "max_context": max_context, "random_weights": True},
           "store": {"kvstore": "memory", "device_mib": 96, "host_mib": 512, "token_block": 128},
           "engine": {"max_new_tokens": 4, "prompt_bucket": 8}}
    model = load_bench_model(cfg)
    mc = model.config
    rng = np.random.default_rng(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        engine, _, store = open_system(SYSTEMS["cachedattn"], cfg, model, Path(tmp), make_policy("lru"))
        for H in history:
            sid = f"h{H}"
            engine.turn(sid, rng.integers(16, mc.vocab_size, H, dtype=np.int32), max_new_tokens=4)
            engine.turn(sid, rng.integers(16, mc.vocab_size, prompt, dtype=np.int32), max_new_tokens=4)  # compiles
            timer, rows = StageTimer(), []
            try:
                for _ in range(repeat):  # stage by stage, each program waited for
                    if flush:
                        store.flush()
                    r = engine.turn(sid, rng.integers(16, mc.vocab_size, prompt, dtype=np.int32), max_new_tokens=4)
                    st = timer.take()
                    st["ttft"] = r.ttft_s
                    st["source"] = 1.0 if r.source == "device" else 0.0
                    hist_len = r.history_tokens
                    rows.append(st)
            finally:
                timer.close()
            plain = []
            for _ in range(repeat):  # the same turns as the engine runs them (no waits between programs)
                if flush:
                    store.flush()
                plain.append(engine.turn(sid, rng.integers(16, mc.vocab_size, prompt, dtype=np.int32),
                                         max_new_tokens=4).ttft_s)
            # layers_in_program alone: against the history bucket, and against no history
            S = bucket_length(hist_len)
            x = P.embed_tokens(model.params, mc, jnp.zeros(prompt, jnp.int32))
            pos = jnp.arange(hist_len, hist_len + prompt, dtype=jnp.int32)
            z = jnp.zeros((2, S, mc.num_kv_heads, mc.head_dim), mc.jnp_dtype)
            L = len(engine.layers)
            calls = {"with_history": lambda: P.layers_in_program(
                         engine.layers, mc, x, tuple((z,) for _ in range(L)), jnp.zeros(L, jnp.int32),
                         jnp.int32(hist_len), pos, S, False, True),
                     "no_history": lambda: P.layers_in_program(
                         engine.layers, mc, x, tuple(() for _ in range(L)), jnp.zeros(L, jnp.int32), jnp.int32(0),
                         pos, 0, False)}
            alone = {}
            for k, f in calls.items():
                jax.block_until_ready(f())  # compile
                ts = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    jax.block_until_ready(f())
                    ts.append(time.perf_counter() - t)
                alone[k] = statistics.median(ts)
            med = _median(rows)
            staged = sum(med.get(k, 0.0) for k in STAGES + ("insert",))
            row = {"history": hist_len, "history_bucket": S, "prompt": prompt, "ttft_s": statistics.median(plain),
                   "ttft_staged_s": med["ttft"], "stages_s": {k: med.get(k, 0.0) for k in STAGES + ("insert",)},
                   "host_s": med["ttft"] - staged, "device_hits": sum(r["source"] for r in rows),
                   "layers_alone_s": alone, "history_part_s": alone["with_history"] - alone["no_history"]}
            out.append(row)
            print(json.dumps(row), flush=True)
            engine.evict(sid, "disk")
        engine.close()
    return {"rows": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", default="300,800,1800", help="history lengths (comma-separated)")
    ap.add_argument("--prompt", type=int, default=16, help="new tokens of each measured turn")
    ap.add_argument("--repeat", type=int, default=3, help="measured turns per history (after a compiling one)")
    ap.add_argument("--no-flush", action="store_true", help="leave the store's background saves running")
    ap.add_argument("--model", default="smollm2", help="model shape (random weights): smollm2 or a configs/model preset")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    t0 = time.time()
    res = measure([int(x) for x in args.history.split(",")], args.prompt, args.repeat, flush=not args.no_flush,
                  model_name=args.model)
    res.update(machine={"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
               args=vars(args), wall_s=time.time() - t0)
    for r in res["rows"]:
        st = " ".join(f"{k} {v * 1e3:.0f}" for k, v in r["stages_s"].items())
        print(f"history {r['history']} (bucket {r['history_bucket']}): TTFT {r['ttft_s'] * 1e3:.0f} ms; staged "
              f"{r['ttft_staged_s'] * 1e3:.0f} = {st} + host {r['host_s'] * 1e3:.0f}; layers alone "
              f"{r['layers_alone_s']['with_history'] * 1e3:.0f} vs no history {r['layers_alone_s']['no_history'] * 1e3:.0f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
