"""Continuous batching on SmolLM2 fp32: decode tokens/s and finished turns/min with 1..16 sessions at
once, beside transformers' batched ``generate`` (left-padded, same weights, same machine, same run),
the device pool's KV bytes against tokens held x bytes per token, and the TTFT of a queued turn whose
history is idle in host memory against one whose history is in the device pool, each waiting while 8
other slots decode (``--ttft-history``; ``--ttft-busy-probe`` adds the earlier arrangement, the probe's
session busy in a slot until its turn).

Each session first gets a history (a first turn of a ragged length, also the compile warm-up); the
measured round is one more turn of every session at once (history from the device pool). Messages
are token ids (no stop token), so every turn generates exactly ``--new-tokens`` tokens on both sides.

    JAX_PLATFORMS=cpu python scripts/bench_batch.py --sessions 1,2,4,8,16 --out runs/bench_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def ours(cfg, params, hists, prompts, new: int, steps: int, page: int | None = None) -> dict:
    from jax_cachedattn.engine import Engine, EngineConfig
    from jax_cachedattn.engine import slots as SL
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    n = len(hists)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "bench-batch")
    store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=4 << 30, token_block=64), lay)
    held = sum(len(h) + len(p) + 2 * new + 8 for h, p in zip(hists, prompts))
    paging = {} if page is None else {"page_size": page}  # default: the engine's
    eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=new, max_slots=n, decode_steps=steps,
                                                        pool_tokens=held + 64 * (2 * n + 1), **paging))
    real = SL.generate
    acc = {"s": 0.0, "tokens": 0, "ratio": 0.0}
    marks = []  # per dispatch: (called, returned, result on the host)

    def timed(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        t1 = time.perf_counter()
        em = np.asarray(out[2])  # the host sync the loop makes anyway
        marks.append((t, t1, time.perf_counter()))
        acc["s"] += time.perf_counter() - t
        acc["tokens"] += int((em >= 0).sum())
        tokens = sum(int(x) for x in np.asarray(out[0].lengths)) + eng.pool.cached_tokens()
        ring = sum(x.nbytes for x in out[0].raw_k)  # the decode state's pre-RoPE key ring counts too
        acc["ratio"] = max(acc["ratio"], (eng.pool.used_bytes() + ring) / max(1, tokens * cfg.kv_bytes_per_token))
        return out

    SL.generate = timed
    try:
        eng.run_batch([(f"s{i}", h) for i, h in enumerate(hists)])  # histories + compile
        eng.run_batch([(f"s{i}", p) for i, p in enumerate(prompts)])  # compile the device-hit shapes
        for k in acc:
            acc[k] = 0.0 if k != "tokens" else 0
        marks.clear()
        t = time.perf_counter()
        res = eng.run_batch([(f"s{i}", p) for i, p in enumerate(prompts)])
        wall = time.perf_counter() - t
    finally:
        SL.generate = real
    eng.close()
    # The host side of a dispatch: generate's return (dispatch), the wait for its result, and the host
    # loop between two dispatches (after the first: the measured round's prefills come before it).
    host = {"dispatch_ms": 1e3 * float(np.median([b - a for a, b, _ in marks])),
            "wait_ms": 1e3 * float(np.median([c - b for _, b, c in marks])),
            "host_gap_ms": 1e3 * float(np.median([b[0] - a[2] for a, b in zip(marks, marks[1:])] or [0.0])),
            "dispatches": len(marks)}
    return {**host, "decode_tok_s": acc["tokens"] / acc["s"], "turns_per_min": 60 * n / wall, "wall_s": wall,
            "ttft_mean_s": float(np.mean([r.ttft_s for r in res])), "sources": sorted({r.source for r in res}),
            "device_kv_over_held": acc["ratio"]}


def load_per_token(cfg, tokens: int, blocks: list[int], reps: int) -> dict:
    """Host -> device load time per token of a ``tokens``-token history (every layer, ``load_layer``
    from the host tier, waited for) with the store's ``token_block`` at each of ``blocks``: what a
    host hit costs per token whatever the pool's page is (the pool takes the loaded rows row by row)."""
    import jax

    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    r = np.random.RandomState(3)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "bench-load")
    kv = [r.randn(2, tokens, cfg.num_kv_heads, cfg.head_dim).astype(np.float32) for _ in range(cfg.num_layers)]
    out = {}
    for tb in blocks:
        store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=4 << 30, device_bytes=0, token_block=tb), lay)
        for i, x in enumerate(kv):
            store.save_layer("s", i, x, start=0)
        store.commit_turn("s", np.zeros(tokens, np.int32)).result()
        times = []
        for rep in range(reps + 1):  # repetition 0 compiles
            t = time.perf_counter()
            jax.block_until_ready([store.load_layer("s", i, pad_to=tokens) for i in range(cfg.num_layers)])
            if rep:
                times.append(time.perf_counter() - t)
        store.close()
        out[tb] = {"s": float(np.median(times)), "us_per_token": 1e6 * float(np.median(times)) / tokens}
    return {"tokens": tokens, "reps": reps, "by_token_block": out}


def matmul_ceiling(cfg, params, rows: list[int], reps: int) -> dict:
    """What bounds the decode step on this machine: the step's weight matmuls alone (every layer's
    q/k/v/o and MLP, then the output projection; no attention, no sampling), jitted in plain ``jnp``,
    and the same matmuls in numpy (the BLAS numpy links), at each batch of ``rows``. Tokens/s of
    ``r`` rows over 1 row is the most a batched decode step can gain over one session here."""
    import jax
    import jax.numpy as jnp

    from jax_cachedattn.model import unstack_layers

    layers = tuple(unstack_layers(params))
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    ws = tuple(tuple(lp[k] for k in names) for lp in layers)
    out_w = params["embed"] if cfg.tie_embeddings else params["lm_head"].T  # [V, D]

    @jax.jit
    def step(ws, out_w, x):
        for wq, wk, wv, wo, wg, wu, wd in ws:  # activations normed as the model does (cheap beside the dots)
            h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            q, k, v = h @ wq, h @ wk, h @ wv
            x = x + q @ wo + 0 * (k.sum() + v.sum())
            h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            x = x + (jax.nn.silu(h @ wg) * (h @ wu)) @ wd
        return jnp.matmul(x, out_w.T)

    np_ws = [[np.asarray(w) for w in t] for t in ws]
    np_out = np.ascontiguousarray(np.asarray(out_w).T)

    def np_step(x):
        for wq, wk, wv, wo, wg, wu, wd in np_ws:
            h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            q, k, v = h @ wq, h @ wk, h @ wv
            x = x + q @ wo
            h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
            g = h @ wg
            x = x + (g / (1 + np.exp(-g)) * (h @ wu)) @ wd
        return x @ np_out

    res = {}
    r = np.random.RandomState(4)
    for n in rows:
        x = r.randn(n, cfg.d_model).astype(np.float32)
        xj = jnp.asarray(x)
        jax.block_until_ready(step(ws, out_w, xj))
        np_step(x)
        tj, tn = [], []
        for _ in range(reps):  # interleaved, so both see the same load
            t = time.perf_counter()
            jax.block_until_ready(step(ws, out_w, xj))
            tj.append(time.perf_counter() - t)
            t = time.perf_counter()
            np_step(x)
            tn.append(time.perf_counter() - t)
        res[n] = {"jnp_ms": 1e3 * float(np.median(tj)), "numpy_ms": 1e3 * float(np.median(tn))}
    base = res[rows[0]]
    for n, v in res.items():
        v["jnp_tok_s_over_first"] = n * base["jnp_ms"] / (rows[0] * v["jnp_ms"])
        v["numpy_tok_s_over_first"] = n * base["numpy_ms"] / (rows[0] * v["numpy_ms"])
    return {"reps": reps, "by_rows": res}


def ttft_beside_decode(cfg, params, hist: int, prompt: int, decode_new: int, reps: int, steps: int) -> dict:
    """TTFT of a turn that waits in the queue while 8 other slots decode, its ``hist``-token history in the
    device pool or idle in host memory (saved by an earlier turn, its pages given back: ``Engine.evict(p,
    "device")``), as a waiting job's history is in real use. Each repetition, on a fresh engine of 9
    slots: session p's first turn (the history, 1 token), then 8 jobs decoding ``decode_new`` tokens,
    a short job of another session (4 tokens, done after the first dispatch) and p's turn (the
    probe) queued behind it: the probe waits for the short job's slot, so the loop can bring its
    history forward (engine/pool_preload.py) while the 9 slots decode. TTFT is measured the same way
    for both: from the moment the probe leaves the queue (its prefill starts) to its first token
    (``TurnResult.ttft_s``); ``*_from_queue_s`` adds the time it waited (``queue_s``). The modes
    alternate repetition by repetition; the first repetition of each compiles and is not counted."""
    from jax_cachedattn.engine import Engine, EngineConfig
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    r = np.random.RandomState(1)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "bench-ttft")
    out: dict = {"device": [], "host": []}
    queued: dict = {"device": [], "host": []}
    preloads = []
    for rep in range(reps + 1):
        for where in ("device", "host"):
            store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=4 << 30, token_block=64), lay)
            eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=decode_new, max_slots=9, decode_steps=steps,
                                                                pool_tokens=16384))
            ids = lambda n: r.randint(0, cfg.vocab_size, n).astype(np.int32)  # noqa: E731
            eng.turn("p", ids(hist), max_new_tokens=1)
            eng.flush()
            if where == "host":
                eng.evict("p", "device")  # idle in host memory, its pages given back
            jobs = ([(f"d{i}", ids(prompt), decode_new) for i in range(8)] + [("q", ids(prompt), steps)]
                    + [("p", ids(prompt), 2)])
            res = eng.run_batch(jobs)
            eng.close()
            probe = res[-1]
            assert probe.source == where, (probe.source, where)
            if where == "host":
                preloads.append(probe.preload)
            if rep:
                out[where].append(probe.ttft_s)
                queued[where].append(probe.queue_s + probe.ttft_s)
    dev, host = float(np.median(out["device"])), float(np.median(out["host"]))
    qd, qh = float(np.median(queued["device"])), float(np.median(queued["host"]))
    return {"history": hist, "prompt": prompt, "decoding_slots": 8, "device_ttft_s": dev, "host_ttft_s": host,
            "host_over_device": host / dev, "device_from_queue_s": qd, "host_from_queue_s": qh,
            "host_over_device_from_queue": qh / qd, "host_preload": preloads, "reps": reps,
            "device_all": out["device"], "host_all": out["host"]}


def ttft_busy_probe(cfg, params, hist: int, prompt: int, decode_new: int, reps: int, steps: int) -> dict:
    """The earlier arrangement (``--ttft-busy-probe``): TTFT of a turn started while 8 other slots decode, its
    ``hist``-token history in the device pool
    (``keep_pages=True``) or in host memory (``keep_pages=False``: every history is loaded from the
    store). Each repetition: session p's first turn (the history, 1 token) and 8 decoding jobs start
    together; p's turn ends after the first dispatch, so p's second turn (the probe) is prefilled in a
    later round, beside the 8 slots still decoding. The probe's session is busy in a slot until just
    before its turn, so nothing can be brought forward for it (its history in host memory is copied
    and written into its pages by its own prefill). The modes alternate repetition by repetition;
    the first repetition of each compiles and is not counted."""
    from jax_cachedattn.engine import Engine, EngineConfig
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    r = np.random.RandomState(1)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "bench-ttft")
    out: dict = {"device": [], "host": []}
    for rep in range(reps + 1):
        for where in ("device", "host"):
            store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=4 << 30, token_block=64), lay)
            eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=decode_new, max_slots=9, decode_steps=steps,
                                                                keep_pages=where == "device", pool_tokens=16384))
            ids = lambda n: r.randint(0, cfg.vocab_size, n).astype(np.int32)  # noqa: E731
            jobs = [("p", ids(hist), 1)] + [(f"d{i}", ids(prompt), decode_new) for i in range(8)] + [("p", ids(prompt), 2)]
            res = eng.run_batch(jobs)
            eng.close()
            probe = res[-1]
            assert probe.source == where, (probe.source, where)
            if rep:
                out[where].append(probe.ttft_s)
    dev, host = float(np.median(out["device"])), float(np.median(out["host"]))
    return {"history": hist, "prompt": prompt, "decoding_slots": 8, "device_ttft_s": dev, "host_ttft_s": host,
            "host_over_device": host / dev, "reps": reps, "device_all": out["device"], "host_all": out["host"]}


def chunked_beside_decode(cfg, params, long: int, prompt: int, decode_new: int, reps: int, steps: int,
                          budget: int) -> dict:
    """A ``long``-token prompt prefilled while 8 other slots decode, with and without chunked prefill
    (``EngineConfig.chunked_prefill``, chunks of ``budget`` tokens): its TTFT, the longest wait of the
    decoding slots between two decode dispatches (the prefill's stall), and the 8 slots' decode
    tokens/s over the run (their tokens over the wall time from the first to the last dispatch).
    Repetition 0 of each mode compiles and is not counted; the modes alternate."""
    from jax_cachedattn.engine import Engine, EngineConfig
    from jax_cachedattn.engine import slots as SL
    from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore

    r = np.random.RandomState(2)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "bench-chunk")
    out: dict = {True: [], False: []}
    real = SL.generate
    for rep in range(reps + 1):
        for chunked in (True, False):
            store = TieredStore(StoreConfig(kvstore={"driver": "memory"}, host_bytes=4 << 30, token_block=64), lay)
            eng = Engine(cfg, params, store, None, EngineConfig(max_new_tokens=decode_new, max_slots=9, decode_steps=steps,
                                                                prefill_budget=budget, chunked_prefill=chunked,
                                                                pool_tokens=16384))
            marks = []

            def timed(*a, **k):
                t = time.perf_counter()
                o = real(*a, **k)
                em = np.asarray(o[2])
                marks.append((t, time.perf_counter(), int((em >= 0).sum())))
                return o

            ids = lambda n: r.randint(0, cfg.vocab_size, n).astype(np.int32)  # noqa: E731
            jobs = [("p", ids(8), 1)] + [(f"d{i}", ids(prompt), decode_new) for i in range(8)] + [("p", ids(long), 2)]
            SL.generate = timed
            try:
                res = eng.run_batch(jobs)
            finally:
                SL.generate = real
            eng.close()
            gaps = [b[0] - a[1] for a, b in zip(marks, marks[1:])]
            if rep:
                out[chunked].append({"ttft_s": res[-1].ttft_s, "max_stall_s": max(gaps),
                                     "decode_tok_s": sum(m[2] for m in marks) / (marks[-1][1] - marks[0][0])})
    med = {("chunked" if c else "one_program"): {k: float(np.median([x[k] for x in v])) for k in v[0]}
           for c, v in out.items()}
    return {"long_prompt": long, "budget": budget, "decoding_slots": 8, "reps": reps, **med}


def transformers_generate(gguf: Path, hists, prompts, new: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    seqs = [np.concatenate([h, p]) for h, p in zip(hists, prompts)]
    L = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):  # left-padded
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1

    def gen(k):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - t

    gen(2)  # warm-up
    t1, tn = gen(1), gen(new)
    return {"decode_tok_s": len(seqs) * (new - 1) / max(1e-9, tn - t1), "turns_per_min": 60 * len(seqs) / tn,
            "wall_s": tn, "prefill_s": t1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1,2,4,8,16", help="comma-separated concurrent session counts")
    ap.add_argument("--hist-min", type=int, default=64, help="shortest history (tokens)")
    ap.add_argument("--hist-max", type=int, default=512, help="longest history (tokens)")
    ap.add_argument("--prompt", type=int, default=24, help="tokens of each new message")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per turn")
    ap.add_argument("--decode-steps", type=int, default=4, help="decode steps per dispatch (EngineConfig.decode_steps)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads for transformers")
    ap.add_argument("--skip-hf", action="store_true", help="do not run transformers")
    ap.add_argument("--hf-sessions", default=None, help="comma-separated session counts to run transformers at (default: all)")
    ap.add_argument("--ttft-history", type=int, default=1024, help="history tokens of the TTFT probe (0: skip it)")
    ap.add_argument("--ttft-reps", type=int, default=3, help="timed repetitions of the TTFT probe per source")
    ap.add_argument("--ttft-decode", type=int, default=32, help="tokens each of the 8 slots decodes beside the probe")
    ap.add_argument("--ttft-busy-probe", action="store_true",
                    help="also run the earlier TTFT arrangement: the probe's session busy in a slot until just before its turn")
    ap.add_argument("--chunk-prompt", type=int, default=0,
                    help="new tokens of a prompt prefilled beside 8 decoding slots, with and without chunked prefill (0: skip)")
    ap.add_argument("--chunk-reps", type=int, default=1, help="timed repetitions of the chunked-prefill probe per mode")
    ap.add_argument("--prefill-budget", type=int, default=512, help="EngineConfig.prefill_budget (the chunk size)")
    ap.add_argument("--page-size", default=None,
                    help="EngineConfig.page_size; comma-separated to compare several in one run (default: the engine's)")
    ap.add_argument("--load-probe", default="", help="comma-separated store token_blocks to time a host->device load at (\"\": skip)")
    ap.add_argument("--load-tokens", type=int, default=1024, help="history tokens of the load probe")
    ap.add_argument("--ceiling", default="", help="comma-separated row counts to time the step's matmuls alone at (\"\": skip)")
    ap.add_argument("--out", default="runs/bench_batch.json", help="JSON result file")
    args = ap.parse_args()

    from jax_cachedattn.assets import smollm2_gguf_path
    from jax_cachedattn.runtime import load_model

    m = load_model("smollm2")
    r = np.random.RandomState(0)
    rows = []
    pages = [int(x) for x in args.page_size.split(",")] if args.page_size else [None]
    for n in [int(x) for x in args.sessions.split(",") if x.strip()]:  # "": only the probes
        hists = [r.randint(0, m.config.vocab_size, int(x)).astype(np.int32)
                 for x in np.linspace(args.hist_min, args.hist_max, n).round()]
        prompts = [r.randint(0, m.config.vocab_size, args.prompt).astype(np.int32) for _ in range(n)]
        for page in pages:  # the same sessions at every page size, one after the other
            row = {"sessions": n, "page_size": page, "ours": ours(m.config, m.params, hists, prompts, args.new_tokens,
                                                                  args.decode_steps, page)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.skip_hf and (args.hf_sessions is None or n in {int(x) for x in args.hf_sessions.split(",")}):
            # transformers sees the same conversation as one prompt per sequence (history + message).
            # Same lengths as our measured turn: history, reply, message, reply, then the new message.
            z = np.zeros(args.new_tokens, np.int32)
            hh = [np.concatenate([h, z, p, z]) for h, p in zip(hists, prompts)]
            row["transformers"] = transformers_generate(smollm2_gguf_path(), hh, prompts, args.new_tokens, args.threads)
            print(json.dumps(row), flush=True)
    ceiling = None
    if args.ceiling:
        ceiling = matmul_ceiling(m.config, m.params, [int(x) for x in args.ceiling.split(",")], 5)
        print(json.dumps(ceiling), flush=True)
    load = None
    if args.load_probe:
        load = load_per_token(m.config, args.load_tokens, [int(x) for x in args.load_probe.split(",")], 3)
        print(json.dumps(load), flush=True)
    ttft = None
    if args.ttft_history:
        try:
            ttft = ttft_beside_decode(m.config, m.params, args.ttft_history, args.prompt, args.ttft_decode, args.ttft_reps,
                                      args.decode_steps)
            print(json.dumps(ttft), flush=True)
        except Exception as e:  # the throughput rows above still get written
            print(f"TTFT probe failed: {e!r}", file=sys.stderr, flush=True)
    busy = None
    if args.ttft_history and args.ttft_busy_probe:
        busy = ttft_busy_probe(m.config, m.params, args.ttft_history, args.prompt, args.ttft_decode, args.ttft_reps,
                               args.decode_steps)
        print(json.dumps(busy), flush=True)
    chunk = None
    if args.chunk_prompt:
        chunk = chunked_beside_decode(m.config, m.params, args.chunk_prompt, args.prompt, args.ttft_decode, args.chunk_reps,
                                      args.decode_steps, args.prefill_budget)
        print(json.dumps(chunk), flush=True)
    base = {}  # per page size: the first session count's decode tok/s
    for row in rows:
        base.setdefault(row["page_size"], row["ours"]["decode_tok_s"])
    print("\n| sessions | page | ours decode tok/s | x vs first | transformers decode tok/s | ours/transformers | ours turns/min |"
          " transformers turns/min | device KV / held |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        o, h = row["ours"], row.get("transformers")
        print(f"| {row['sessions']} | {row['page_size'] or 'default'} | {o['decode_tok_s']:.1f} | "
              f"{o['decode_tok_s'] / base[row['page_size']]:.2f} | "
              f"{h['decode_tok_s'] if h else float('nan'):.1f} | {o['decode_tok_s'] / h['decode_tok_s'] if h else float('nan'):.2f} | "
              f"{o['turns_per_min']:.1f} | {h['turns_per_min'] if h else float('nan'):.1f} | {o['device_kv_over_held']:.2f} |")
    if ttft:
        print(f"\nTTFT of a queued turn with 8 slots decoding beside it, {ttft['history']}-token history: device "
              f"{ttft['device_ttft_s'] * 1e3:.0f} ms, host {ttft['host_ttft_s'] * 1e3:.0f} ms (preload: "
              f"{','.join(ttft['host_preload'])}), host/device {ttft['host_over_device']:.3f} (median of {ttft['reps']}); "
              f"from its arrival in the queue: {ttft['host_over_device_from_queue']:.3f}")
    if busy:
        print(f"TTFT, probe busy in a slot until its turn (earlier arrangement): device {busy['device_ttft_s'] * 1e3:.0f} ms,"
              f" host {busy['host_ttft_s'] * 1e3:.0f} ms, host/device {busy['host_over_device']:.3f} (median of {busy['reps']})")
    if chunk:
        c, o = chunk["chunked"], chunk["one_program"]
        print(f"\n{chunk['long_prompt']}-token prompt beside 8 decoding slots (chunks of {chunk['budget']}): "
              f"TTFT chunked {c['ttft_s']:.2f} s / one program {o['ttft_s']:.2f} s; longest decode stall "
              f"{c['max_stall_s']:.2f} / {o['max_stall_s']:.2f} s; decode tok/s {c['decode_tok_s']:.1f} / {o['decode_tok_s']:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                          "args": vars(args), "rows": rows, "ttft": ttft, "ttft_busy_probe": busy, "load": load, "ceiling": ceiling,
                                          "chunked_prefill": chunk}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
