"""Where one decode step of continuous batching spends its time, at 1 and at 8 slots (SmolLM2 fp32).

Each piece of ``engine.slots.generate`` is jitted alone over the model's 30 layers, on the same
weights, pool and block tables as the whole step, and timed (median of ``--reps``, after a compiling
call); the pieces alternate slot count by slot count, so both see the same load:

- ``step``: ``slots.generate`` itself, ``decode_steps`` steps per dispatch, per token step;
- ``matmuls``: every layer's norms, q/k/v, output and MLP projections (no attention);
- ``output projection``: the final norm and the tied 576 x 49152 unembedding;
- ``paged attention``: ``paged_decode_attention`` of every layer over the slots' pages;
- ``kv write``: every layer's new K/V scattered into the (donated) pool, the key rotated;
- ``embed + rope``: the token embedding and the step's RoPE tables;
- ``sampling + state``: per-slot key split, sampling, and the slot state's bookkeeping (phases,
  closing tails, the pre-RoPE key ring of every layer);

and the host side from a real engine run (``scripts/bench_batch.py``'s measured round, histories of
``--hist-min`` to ``--hist-max`` tokens): per dispatch, the time ``generate`` takes to return (the
dispatch: Python, argument flattening, the runtime's launch), the wait for its result, and the host
loop's time between two dispatches (the slots' page growth, result bookkeeping, saves).

``--rows-per-step`` compares settings of ``model.paged_attention.ROWS_PER_STEP`` (the rows of each
slot one loop step of the attention reads) on the whole step and the attention piece, in the same run
(at the first ``--page-size``; the other page sizes at the library's setting).

    JAX_PLATFORMS=cpu python scripts/bench_batch_profile.py --slots 1,8 --out runs/profile.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def _bench_batch():
    """scripts/bench_batch.py as a module (its engine-run measurement is reused here)."""
    spec = importlib.util.spec_from_file_location("bench_batch", Path(__file__).with_name("bench_batch.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def setup(cfg, params, S: int, hist_min: int, hist_max: int, page: int, steps: int, reps: int):
    """Weights, a pool holding S ragged histories (random K/V), and a decode state of S slots in GEN."""
    from jax_cachedattn.engine import slots as SL
    from jax_cachedattn.model import unstack_layers

    layers = tuple(unstack_layers(params))
    top = {k: v for k, v in params.items() if k != "layers"}
    lengths = np.linspace(hist_min, hist_max, S).round().astype(np.int32)
    grow = 4 * steps * (reps + 1)  # rows the timed steps add to every slot (up to 3 rows-per-step settings)
    need = [-(-(int(n) + grow) // page) for n in lengths]
    P = 1 + sum(need)
    width = -(-(cfg.max_context + 4) // page)  # as the engine's block tables
    r = np.random.RandomState(5)
    pool = tuple(jnp.asarray(r.randn(2, P, page, cfg.num_kv_heads, cfg.head_dim).astype(np.float32) * 0.5)
                 for _ in range(cfg.num_layers))
    tables = np.zeros((S, width), np.int32)
    nxt = 1
    for s, n in enumerate(need):
        tables[s, :n] = np.arange(nxt, nxt + n)
        nxt += n
    st = SL.empty_state(S, width, 1, ring=8, raw_shape=(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim))
    st = st.replace(tokens=jnp.asarray(r.randint(0, cfg.vocab_size, S).astype(np.int32)), lengths=jnp.asarray(lengths),
                    tables=jnp.asarray(tables), phase=jnp.full((S,), SL.GEN, jnp.int32),
                    budget=jnp.full((S,), 1 << 20, jnp.int32))
    return top, layers, pool, jax.device_put(st, jax.devices()[0])


# ---- the pieces, each one program over every layer ----------------------------------------------

def make_pieces(cfg):
    from jax_cachedattn.engine import slots as SL
    from jax_cachedattn.model import apply_rope, embed, mlp, project_qkv, rms_norm, rope_tables, unembed
    from jax_cachedattn.model import paged_attention as PA

    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    @jax.jit
    def matmuls(layers, x):
        extra = jnp.zeros((), jnp.float32)
        for lp in layers:
            h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
            q, k, v = project_qkv(lp, h, cfg)
            extra = extra + k[0, 0] + v[0, 0]  # keep k and v (the step writes them into the pool)
            x = x + q @ lp["wo"]  # q stands in for the attention's output (same shape)
            x = x + mlp(lp, rms_norm(x, lp["mlp_norm"], cfg.rms_eps))
        return x, extra

    @jax.jit
    def out_proj(top, x):
        return unembed(top, cfg, x)

    @jax.jit
    def attention(pool, q, tables, lengths):
        return tuple(PA.paged_decode_attention(q, kv, tables, lengths) for kv in pool)

    @jax.jit
    def embed_rope(top, tokens, pos):
        return embed(top, tokens), rope_tables(pos, Dh, cfg.rope_theta, cfg.rope_scaling)

    @jax.jit
    def sampling(logits, st, stop_ids, k_new):
        S = logits.shape[0]
        idx = jnp.arange(S)
        keys, subs = jnp.moveaxis(jax.vmap(jax.random.split)(st.keys), 1, 0)
        sampled = SL._sample(logits, subs, st.temperature, st.top_p)
        live = (st.phase == SL.GEN) | (st.phase == SL.CLOSE)
        r = st.lengths % st.raw_k[0].shape[1]
        raw = tuple(rk.at[idx, r].set(jnp.where(live[:, None, None], k_new, rk[idx, r])) for rk in st.raw_k)
        st = st.replace(raw_k=raw, lengths=st.lengths + live, keys=keys)
        closing = st.phase == SL.CLOSE
        more = st.tail_pos < st.tail_len
        nxt = st.tail[idx, jnp.minimum(st.tail_pos, st.tail.shape[1] - 1)]
        st = st.replace(tokens=jnp.where(closing & more, nxt, st.tokens), tail_pos=st.tail_pos + (closing & more),
                        phase=jnp.where(closing & ~more, SL.DONE, st.phase))
        return SL._advance(st, sampled, st.phase == SL.GEN, stop_ids)

    def kv_write_fn(pool, tables, pos, k, v):
        B, M = pool[0].shape[2], tables.shape[1]
        S = pos.shape[0]
        page = tables[jnp.arange(S), jnp.minimum(pos // B, M - 1)]
        cos, sin = rope_tables(pos, Dh, cfg.rope_theta, cfg.rope_scaling)
        new = jnp.stack([apply_rope(k, cos, sin), v])
        return tuple(kv.at[:, page, pos % B].set(new) for kv in pool)

    kv_write = jax.jit(kv_write_fn, donate_argnums=(0,))
    del H, K
    return {"matmuls": matmuls, "out_proj": out_proj, "attention": attention, "embed_rope": embed_rope,
            "sampling": sampling, "kv_write": kv_write}


def _median_ms(fn, reps: int) -> float:
    fn()  # compiles (first call of this shape)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))


def profile(cfg, params, slots: list[int], hist_min: int, hist_max: int, pages: list[int], steps: int, reps: int,
            rows_per_step: list[int]) -> dict:
    """Milliseconds per token step of each piece, by slot count; the pieces that read or write pages
    (the whole step, the attention, the KV write) at each page size in ``pages``."""
    from jax_cachedattn.engine import slots as SL
    from jax_cachedattn.model import paged_attention as PA

    pieces = make_pieces(cfg)
    stop = jax.device_put(jnp.asarray([-1], jnp.int32), jax.devices()[0])
    r = np.random.RandomState(6)
    ctx = {(S, B): setup(cfg, params, S, hist_min, hist_max, B, steps, reps) for S in slots for B in pages}
    out: dict = {S: {} for S in slots}
    default_rps = PA.ROWS_PER_STEP

    def whole_step(S, B, n_steps):
        top, layers, _, _ = ctx[S, B]

        def run():
            st, pool, em, _ = SL.generate(top, layers, cfg, ctx[S, B][3], ctx[S, B][2], stop, n_steps)
            np.asarray(em)  # the sync the loop makes
            ctx[S, B] = (top, layers, pool, st)  # donated: carry the outputs on
        return run

    for rps in rows_per_step:  # each setting recompiles the programs that read the pages
        PA.ROWS_PER_STEP = rps
        jax.clear_caches()
        for B in (pages if rps == default_rps else pages[:1]):  # other settings at the first page size only
            for S in slots:
                out[S][f"step [page {B}, rows/step {rps}]"] = _median_ms(whole_step(S, B, steps), reps) / steps
                top, layers, pool, st = ctx[S, B]
                q = jnp.asarray(r.randn(S, cfg.num_heads, cfg.head_dim).astype(np.float32))
                lens = st.lengths + 1
                out[S][f"paged attention [page {B}, rows/step {rps}]"] = _median_ms(
                    lambda: jax.block_until_ready(pieces["attention"](pool, q, st.tables, lens)), reps)
    PA.ROWS_PER_STEP = default_rps
    jax.clear_caches()
    B0 = pages[0]
    for S in slots:
        out[S][f"step, 1 step per dispatch [page {B0}]"] = _median_ms(whole_step(S, B0, 1), reps)
        top, layers, pool, st = ctx[S, B0]
        x = jnp.asarray(r.randn(S, cfg.d_model).astype(np.float32))
        out[S]["layer matmuls (30 layers)"] = _median_ms(lambda: jax.block_until_ready(pieces["matmuls"](layers, x)), reps)
        out[S]["output projection"] = _median_ms(lambda: jax.block_until_ready(pieces["out_proj"](top, x)), reps)
        out[S]["embed + rope"] = _median_ms(
            lambda: jax.block_until_ready(pieces["embed_rope"](top, st.tokens, st.lengths)), reps)
        logits = jnp.asarray(r.randn(S, cfg.vocab_size).astype(np.float32))
        kn = jnp.asarray(r.randn(S, cfg.num_kv_heads, cfg.head_dim).astype(np.float32))
        out[S]["sampling + slot state"] = _median_ms(
            lambda: jax.block_until_ready(pieces["sampling"](logits, st, stop, kn)), reps)
        for B in pages:
            def write(B=B):
                p = pieces["kv_write"](ctx[S, B][2], ctx[S, B][3].tables, ctx[S, B][3].lengths, kn, kn)
                jax.block_until_ready(p)
                ctx[S, B] = (*ctx[S, B][:2], p, ctx[S, B][3])
            out[S][f"kv write [page {B}]"] = _median_ms(write, reps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="1,8", help="comma-separated slot counts")
    ap.add_argument("--hist-min", type=int, default=64, help="shortest history (tokens)")
    ap.add_argument("--hist-max", type=int, default=256, help="longest history (tokens)")
    ap.add_argument("--page-size", default="16", help="comma-separated pool pages (EngineConfig.page_size) to compare")
    ap.add_argument("--decode-steps", type=int, default=4, help="decode steps per dispatch")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions of each piece")
    ap.add_argument("--rows-per-step", default="64", help="comma-separated ROWS_PER_STEP settings to compare")
    ap.add_argument("--engine", action="store_true", help="also time the host loop in a real engine run")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens per turn of the engine run")
    ap.add_argument("--out", default="runs/bench_batch_profile.json", help="JSON result file")
    args = ap.parse_args()

    from jax_cachedattn.runtime import load_model

    m = load_model("smollm2")
    slots = [int(x) for x in args.slots.split(",")]
    rps = [int(x) for x in args.rows_per_step.split(",")]
    pages = [int(x) for x in args.page_size.split(",")]
    prof = profile(m.config, m.params, slots, args.hist_min, args.hist_max, pages, args.decode_steps,
                   args.reps, rps)
    print(json.dumps(prof), flush=True)
    host = {}
    if args.engine:
        bb = _bench_batch()
        r = np.random.RandomState(0)
        for S in slots:
            hists = [r.randint(0, m.config.vocab_size, int(x)).astype(np.int32)
                     for x in np.linspace(args.hist_min, args.hist_max, S).round()]
            prompts = [r.randint(0, m.config.vocab_size, 24).astype(np.int32) for _ in range(S)]
            host[S] = bb.ours(m.config, m.params, hists, prompts, args.new_tokens, args.decode_steps, pages[0])
            print(json.dumps({S: host[S]}), flush=True)

    names = [k for k in prof[slots[0]]]
    print("\n| piece (ms per token step) | " + " | ".join(f"{S} slot{'s' if S > 1 else ''}" for S in slots)
          + (f" | {slots[-1]} / {slots[0]} |" if len(slots) > 1 else " |"))
    print("|---" * (len(slots) + 1 + (len(slots) > 1)) + "|")
    for k in names:
        vals = [prof[S][k] for S in slots]
        print(f"| {k} | " + " | ".join(f"{v:.1f}" for v in vals) + (f" | {vals[-1] / vals[0]:.2f} |" if len(slots) > 1 else " |"))
    for k in ("dispatch_ms", "wait_ms", "host_gap_ms"):
        if host:
            vals = [host[S][k] / args.decode_steps for S in slots]
            print(f"| engine run: {k} | " + " | ".join(f"{v:.1f}" for v in vals)
                  + (f" | {vals[-1] / vals[0]:.2f} |" if len(slots) > 1 else " |"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                                          "args": vars(args), "pieces_ms": prof, "engine": host}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
