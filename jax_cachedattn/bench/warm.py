"""``engine.warmup: programs`` of real mode: compile, before the measured replay, every program the
trace's turns and appends may run, from every tier a history may be found in.

A real replay's programs are known up front: each turn's prompt and recorded reply are token ids of
known length and a turn decodes at most ``gen_tokens`` tokens, so every turn's history lies in a
known range (`trace_shapes`). Which tier a history comes from is not known: it depends on the
replay's timing (queueing, evictions, prefetches). The whole-trace compile pass
(``engine.compile_pass``) compiled only the tiers its own replay happened to meet, and its replay ran
with compile time on its clock, so it met other tiers than the measured replay: the cpu.yaml run of
2026-12-02 02:25 still left 5 of cachedattn's 22 jobs out as compiling. `warm_engine` compiles each
turn shape from every tier (`engine.warmup.programs_for` / `warmup_programs`, scratch sessions in a
scratch store), the appends from the device pool where the turn just left them, and the recompute
engine's whole-context programs, on the very engine (and page pool) the measured replay uses.
"""

from __future__ import annotations

from jax_cachedattn.engine.warmup import TurnShape, programs_for, warmup_programs


def trace_shapes(workload, replies: dict, gen_tokens: int | None, max_new: int) -> tuple[list, list]:
    """``(turn shapes, append shapes)`` of a replay: a turn's history is every earlier prompt, decoded
    tokens (0 to the turn's budget: a stop token may end it early) and fed reply."""
    turns, appends = [], []
    for s in workload.sessions:
        lo = hi = 0
        for k, t in enumerate(s.turns):
            p = len(t.prompt_ids)
            turns.append(TurnShape((lo, hi), (p, p)))
            gen = t.reply_tokens if gen_tokens is None else min(gen_tokens, t.reply_tokens or max_new)
            lo, hi = lo + p, hi + p + max(1, gen)
            r = replies.get((s.sid, k))
            if r is not None and len(r):
                appends.append(TurnShape((lo, hi), (len(r), len(r))))
                lo, hi = lo + len(r), hi + len(r)
    return turns, appends


def warm_engine(engine, rengine, turns: list, appends: list, *, unbounded: bool = False,
                sources=("host", "device", "disk")) -> dict:
    """Compile the programs of ``turns`` and ``appends`` on ``engine`` (caching) and ``rengine``
    (recompute; may be ``engine``). ``sources``: the tiers a turn's history is warmed from;
    ``unbounded`` (the oracle: every history stays in its page pool): the device pool only. Returns
    ``{"turns", "seconds", "programs"}``."""
    progs = set()
    if rengine is not engine:
        progs_r = programs_for(rengine, turns)
        out_r = warmup_programs(rengine, progs_r, preload_counts=(0,))
    else:
        progs_r, out_r = set(), {"turns": 0, "seconds": 0.0}
    mc = engine.model_config
    fits = [sh for sh in turns if sh.history[1] + sh.prompt[1] < mc.max_context]
    if engine is rengine:  # the reusing systems: every turn from every tier its history may be in
        progs |= programs_for(engine, fits, ("device",) if unbounded else tuple(sources))
        # the appends, from the page pool the turn just left them in (recompute's appends run on the
        # caching engine against a history its pool never held: not warmed; an append's compile is
        # service time only, never a TTFT, see real_exec.py)
        progs |= programs_for(engine, [sh for sh in appends if sh.history[1] + sh.prompt[1] < mc.max_context],
                              ("device",))
    out = warmup_programs(engine, progs, preload_counts=(0,))
    return {"turns": out["turns"] + out_r["turns"], "seconds": out["seconds"] + out_r["seconds"],
            "programs": len(progs) + len(progs_r)}
