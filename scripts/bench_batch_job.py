#!/usr/bin/env python
"""`cachedattn batch` on a synthetic file of conversations, SmolLM2, this machine, in one run:

  * cachedattn: ``cachedattn batch`` (history KV kept in the store between turns);
  * recompute: the same command with ``--no-cache`` (every turn recomputes its whole history);
  * transformers: a Python loop over the same token ids with Hugging Face transformers on the same
    GGUF weights, one in-memory ``DynamicCache`` per conversation (no store, nothing durable);
  * kill at 50 %: ``cachedattn batch`` SIGKILLed once half the turns are written, then started again
    with the same command; total wall against the uninterrupted run, turns recomputed, prefill tokens
    the resume did not redo.

Each conversation opens with a long user turn (a "document", ``--doc-words``) followed by short
questions (``--turns`` user turns in all), the shape of long-context evaluation sets. The cachedattn
systems run as subprocesses of the real command (model load and compile-cache reads included in
their process wall; turns/min is from the job's own summary, which excludes them); transformers runs
here with ``--threads`` torch threads.

    python scripts/bench_batch_job.py --conversations 200 --out runs/batch_job.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "data model memory cache token layer attention store disk host device turn history prefill decode "
         "conversation session reply question answer system engine batch queue window budget block page").split()


def _one_token_words() -> list[str]:
    """WORDS that SmolLM2's tokenizer encodes as one token after a space: every conversation of the
    file then has the same token counts, so the timed runs meet the prompt shapes the warm-up compiled."""
    from jax_cachedattn.assets import smollm2_gguf_path
    from jax_cachedattn.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(smollm2_gguf_path())
    return [w for w in WORDS if len(tok.encode(" " + w)) == 1]


def synthetic_file(path: Path, n: int, turns: int, doc_words: int, follow_words: int, seed: int) -> None:
    r = random.Random(seed)
    words = _one_token_words()
    with open(path, "w", encoding="utf-8") as f:
        for c in range(n):
            msgs = [{"role": "user", "content": "Read this and answer my questions.\n"
                     + " ".join(r.choice(words) for _ in range(doc_words))}]
            for t in range(1, turns):
                msgs.append({"role": "user", "content": f"Question {t}: "
                             + " ".join(r.choice(words) for _ in range(follow_words)) + "?"})
            f.write(json.dumps({"id": f"synth-{c:04d}", "messages": msgs}) + "\n")


def run_cli(inp: Path, out: Path, store: Path, max_new: int, extra: list[str], kill_at: int | None = None,
            kill_delay: float = 0.0) -> dict:
    """One ``cachedattn batch`` process; with ``kill_at``, SIGKILL it ``kill_delay`` seconds after that
    many turn lines exist (turns are in the engine then: lines come every few seconds on the
    continuous-batching engine, so the delay counts from the kill_at-th line, not from the last one)."""
    cmd = [sys.executable, "-m", "jax_cachedattn.cli", "batch", "--input", str(inp), "--output", str(out),
           "--store", str(store), "--max-new-tokens", str(max_new), "--no-progress", *extra]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last_line_at, lines, reached_at = t0, 0, None
    if kill_at is not None:
        while p.poll() is None:
            n = _turn_lines(out)
            if n != lines:
                lines, last_line_at = n, time.perf_counter()
            if n >= kill_at and reached_at is None:
                reached_at = time.perf_counter()
            if reached_at is not None and time.perf_counter() - reached_at >= kill_delay:
                p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
    _, err = p.communicate()
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "returncode": p.returncode}
    if kill_at is not None:
        res["lost_s"] = wall - (last_line_at - t0)   # the work in flight when the kill came
        res["lines_at_kill"] = _turn_lines(out)
    elif p.returncode != 0:
        raise RuntimeError(f"cachedattn batch failed ({p.returncode}): {err[-2000:]}")
    else:
        res["summary"] = _summary(out)
    return res


def _turn_lines(out: Path) -> int:
    if not out.exists():
        return 0
    return sum(1 for x in out.read_bytes().split(b"\n") if x.startswith(b'{"conversation"'))


def _summary(out: Path) -> dict:
    last = out.read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[-1]
    return json.loads(last)["summary"]


def _turn_stats(out: Path) -> dict:
    """Where a run's turns spent their time: prefill (time to first token) and decode, summed over turns
    (turns overlap on the batching engine, so the sums exceed the job's wall), by history source."""
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()[1:-1]]
    by: dict[str, dict] = {}
    for r in lines:
        b = by.setdefault(str(r["source"]), {"turns": 0, "ttft_s": 0.0, "decode_s": 0.0, "computed_tokens": 0})
        b["turns"] += 1
        b["ttft_s"] += r["ttft_s"] or 0.0
        b["decode_s"] += (r["total_s"] or 0.0) - (r["ttft_s"] or 0.0)
        b["computed_tokens"] += (r["prompt_tokens"] or 0) + (r["history_tokens"] or 0) - (r["reused_tokens"] or 0)
    return {k: {n: round(v, 3) if isinstance(v, float) else v for n, v in b.items()} for k, b in sorted(by.items())}


def _phases(out: Path, wall: float) -> dict:
    """What caching can shorten and what it cannot, from a run's lines (the engine's loop is one host
    thread: a round prefills, then dispatches one decode step of every busy slot, so the job's wall is
    about the sum of its prefills plus its decode rounds and commits). ``prefill_s``: the turns' time
    to first token summed (one chunk each on this file's shape, so it is their prefill);
    ``later_prefill_s``: the same for the turns that had a history (what caching removes);
    ``rest_s``: the job's wall less ``prefill_s`` (decode rounds, commits, the feed), which caching
    does not shorten."""
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()[1:-1]]
    pre = sum(r["ttft_s"] or 0.0 for r in lines)
    later = sum(r["ttft_s"] or 0.0 for r in lines if r["history_tokens"])
    return {"prefill_s": round(pre, 3), "later_prefill_s": round(later, 3), "first_prefill_s": round(pre - later, 3),
            "rest_s": round(wall - pre, 3), "rest_share": round((wall - pre) / wall, 4)}


def _loaded_on_resume(lines: list[dict], done_before: int) -> dict:
    """For each conversation cut by the kill, the history its first resumed turn read from the store."""
    started = {r["conversation"] for r in lines[:done_before]}
    first: dict[str, dict] = {}
    for r in lines[done_before:]:
        if r["conversation"] in started and r["conversation"] not in first:
            first[r["conversation"]] = r
    return {"conversations": len(first), "tokens": sum(r["reused_tokens"] or 0 for r in first.values()),
            "recomputed_tokens": sum((r["history_tokens"] or 0) - (r["reused_tokens"] or 0) for r in first.values()),
            "sources": sorted({str(r["source"]) for r in first.values()})}


def run_transformers(inp: Path, max_new: int, threads: int, limit: int | None = None) -> dict:
    """A loop over the same conversations and token ids: transformers, in-memory cache per conversation
    (the first ``limit`` conversations only: every conversation of the file has the same token counts,
    so its turns/min is the whole file's)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from jax_cachedattn.assets import smollm2_gguf_path
    from jax_cachedattn.batch import plan_units, turn_tokens
    from jax_cachedattn.conversations import Conversation, read_conversations
    from jax_cachedattn.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    gguf = smollm2_gguf_path()
    tok = Tokenizer.from_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    stop, end = tok.stop_ids, tok.assistant_end()
    convs = [c for c in read_conversations(inp) if isinstance(c, Conversation)][:limit]
    turns = generated = prefilled = 0
    with torch.inference_mode():
        model(torch.tensor([end]))   # warm-up
        t0 = time.perf_counter()
        for conv in convs:
            cache, last, hist = DynamicCache(), None, []
            for u in plan_units(conv, "generated"):
                new = [{"role": m.role, "content": m.content} for m in u.before + (u.user,)]
                closing, rendered = turn_tokens(tok, hist, new, last)   # the batch job's tokens, same template
                ids = closing + rendered
                x = torch.tensor([ids])
                prefilled += len(ids)
                reply = []
                for i in range(max_new):
                    logits = model(x, past_key_values=cache, use_cache=True).logits[0, -1]
                    last = int(torch.argmax(logits))
                    reply.append(last)
                    generated += 1
                    if last in stop or i == max_new - 1:
                        break
                    x = torch.tensor([[last]])
                # The last sampled token is fed with the next prompt (as the engine stores it).
                model(torch.tensor([[last]]), past_key_values=cache, use_cache=True)
                hist += new + [{"role": "assistant",
                                "content": tok.decode([t for t in reply if t not in stop], skip_special_tokens=True)}]
                turns += 1
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "conversations": len(convs), "turns": turns, "turns_per_min": 60 * turns / wall,
            "generated_tokens": generated, "prefilled_tokens": prefilled, "threads": threads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conversations", type=int, default=200, help="conversations in the synthetic file")
    p.add_argument("--turns", type=int, default=5, help="user turns per conversation")
    p.add_argument("--doc-words", type=int, default=700, help="words of each conversation's first user turn")
    p.add_argument("--follow-words", type=int, default=20, help="words of each later user turn")
    p.add_argument("--max-new-tokens", type=int, default=16, help="reply budget per turn")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the transformers loop")
    p.add_argument("--hf-conversations", type=int, default=None, help="run the transformers loop on the first "
                   "this many conversations only (its turns/min holds for the file: every conversation has the "
                   "same token counts)")
    p.add_argument("--extrapolate", type=int, default=200, help="also give each system's minutes for a file of "
                   "this many conversations, from its measured turns/min")
    p.add_argument("--systems", default="cachedattn,recompute,transformers,kill",
                   help="comma-separated subset of cachedattn,recompute,transformers,kill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kill-lines", type=int, default=None, help="kill once this many turns are written "
                   "(default: half the turns, plus one)")
    p.add_argument("--kill-delay", type=float, default=3.0, help="seconds after that line before the kill")
    p.add_argument("--base", default=None, help="a previous --out JSON: take its uninterrupted cachedattn run "
                   "(with --systems kill, to measure the kill alone)")
    p.add_argument("--warmup", type=int, default=2, help="conversations of an untimed run first (compile cache)")
    p.add_argument("--no-warmup-resume", action="store_true", help="the warm-up does not kill and resume its cached "
                   "run (by default it does, so the resumed run's programs are in the compile cache as the "
                   "uninterrupted run's are)")
    p.add_argument("--max-slots", type=int, default=None, help="cachedattn batch --max-slots (both modes)")
    p.add_argument("--window", type=int, default=None, help="cachedattn batch --window (both modes)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one under runs/)")
    p.add_argument("--out", default=None, help="write the JSON result here")
    args = p.parse_args(argv)
    systems = args.systems.split(",")
    flags = (["--max-slots", str(args.max_slots)] if args.max_slots else []) + \
        (["--window", str(args.window)] if args.window is not None else [])
    Path("runs").mkdir(exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_batch_job-", dir="runs"))
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "conversations.jsonl"
    synthetic_file(inp, args.conversations, args.turns, args.doc_words, args.follow_words, args.seed)
    total = args.conversations * args.turns
    res: dict = {"config": vars(args), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "load_avg_at_start": os.getloadavg()}, "systems": {}}
    sysres = res["systems"]

    def say(name):
        print(f"{name}: {json.dumps(sysres[name])}", file=sys.stderr, flush=True)
        if args.out:   # what is measured so far survives a run cut by its time limit
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))

    if args.warmup:
        # Fill the persistent compile cache (~/.cache/jax_cachedattn/xla) with this file's shapes, so
        # the timed runs measure the job, not XLA compiling (same for both modes).
        warm = work / "warmup.jsonl"
        synthetic_file(warm, args.warmup, args.turns, args.doc_words, args.follow_words, args.seed + 1)
        for mode in ([], ["--no-cache"]):
            t = time.perf_counter()
            run_cli(warm, work / f"warmup{len(mode)}.jsonl", work / f"store-warmup{len(mode)}", args.max_new_tokens,
                    mode + flags)
            print(f"warm-up {mode or ['cached']}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        if "kill" in systems and not args.no_warmup_resume:
            # The resumed process's programs (histories read back from the store) into the compile cache too.
            t = time.perf_counter()
            half = args.warmup * args.turns // 2 + 1
            run_cli(warm, work / "warmup-k.jsonl", work / "store-warmup-k", args.max_new_tokens, flags, kill_at=half)
            run_cli(warm, work / "warmup-k.jsonl", work / "store-warmup-k", args.max_new_tokens, flags)
            print(f"warm-up kill + resume: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    if args.base:
        sysres["cachedattn"] = json.loads(Path(args.base).read_text())["systems"]["cachedattn"]
    elif "cachedattn" in systems or "kill" in systems:
        sysres["cachedattn"] = run_cli(inp, work / "cached.jsonl", work / "store-cached", args.max_new_tokens, flags)
        sysres["cachedattn"]["turns"] = _turn_stats(work / "cached.jsonl")
        sysres["cachedattn"]["phases"] = _phases(work / "cached.jsonl", sysres["cachedattn"]["summary"]["wall_s"])
        say("cachedattn")
    if "kill" in systems:
        out, store = work / "killed.jsonl", work / "store-killed"
        # Past half the turns, inside a conversation (its earlier turns are in the store).
        first = run_cli(inp, out, store, args.max_new_tokens, flags, kill_at=args.kill_lines or total // 2 + 1,
                        kill_delay=args.kill_delay)
        second = run_cli(inp, out, store, args.max_new_tokens, flags)
        lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()[1:-1]]
        keys = [(r["conversation"], r["turn"]) for r in lines]
        ref = {(r["conversation"], r["turn"]): r["reply"] for r in
               (json.loads(x) for x in (work / "cached.jsonl").read_text(encoding="utf-8").splitlines()[1:-1])}
        s2 = second["summary"]
        before = lines[: s2["turns_done_before"]]
        base = sysres["cachedattn"]["wall_s"]
        sysres["kill"] = {
            "killed_after_s": first["wall_s"], "lines_at_kill": first["lines_at_kill"], "lost_s": first["lost_s"],
            "resumed_wall_s": second["wall_s"], "total_wall_s": first["wall_s"] + second["wall_s"],
            "added_wall_s": first["wall_s"] + second["wall_s"] - base - first["lost_s"],
            "added_fraction": (first["wall_s"] + second["wall_s"] - base - first["lost_s"]) / base,
            "turns_exactly_once": len(keys) == len(set(keys)) == total,
            "replies_equal_uninterrupted": all(ref.get(k) == r["reply"] for k, r in zip(keys, lines)),
            "resume_summary": s2,
            "finished_turns_recomputed": s2["turns_written"] + s2["turns_recovered"] - (total - s2["turns_done_before"]),
            "prefill_tokens_not_redone": sum(r["prompt_tokens"] + r["history_tokens"] - r["reused_tokens"]
                                             for r in before if r.get("prompt_tokens") is not None),
            "history_tokens_loaded_on_resume": _loaded_on_resume(lines, s2["turns_done_before"]),
        }
        # What a restart costs on its own: the resumed process's start (interpreter, model load, compile-cache
        # reads) and its warm-up, neither in the job's wall; the rest of the added wall is the job itself.
        u = sysres["cachedattn"]
        restart = second["wall_s"] - s2["wall_s"]
        sysres["kill"]["resume_start_and_warmup_s"] = restart
        sysres["kill"]["resume_warmup_s"] = s2.get("warmup_s")
        sysres["kill"]["added_job_wall_s"] = sysres["kill"]["added_wall_s"] - restart
        sysres["kill"]["added_job_fraction_of_uninterrupted_job"] = sysres["kill"]["added_job_wall_s"] / u["summary"]["wall_s"]
        say("kill")
    if "recompute" in systems:
        sysres["recompute"] = run_cli(inp, work / "recompute.jsonl", work / "store-recompute", args.max_new_tokens,
                                      ["--no-cache"] + flags)
        sysres["recompute"]["turns"] = _turn_stats(work / "recompute.jsonl")
        sysres["recompute"]["phases"] = _phases(work / "recompute.jsonl", sysres["recompute"]["summary"]["wall_s"])
        say("recompute")
    if "transformers" in systems:
        sysres["transformers"] = run_transformers(inp, args.max_new_tokens, args.threads, args.hf_conversations)
        say("transformers")
    c = sysres.get("cachedattn", {}).get("summary")
    if c:
        res["ratios"] = {}
        if "recompute" in sysres:
            res["ratios"]["turns_per_min_vs_recompute"] = c["turns_per_min"] / sysres["recompute"]["summary"]["turns_per_min"]
            res["ratios"]["process_wall_vs_recompute"] = sysres["recompute"]["wall_s"] / sysres["cachedattn"]["wall_s"]
            # Caching removes the later turns' prefill and nothing else: the most it can give on this file
            # (cached later turns free) and what it gives at the cached run's later-turn prefill.
            rp, cp = sysres["recompute"]["phases"], sysres["cachedattn"]["phases"]
            rw = sysres["recompute"]["summary"]["wall_s"]
            res["ratios"]["bound_if_later_prefill_free"] = rw / (rw - rp["later_prefill_s"])
            res["ratios"]["model_with_cached_later_prefill"] = rw / (rw - rp["later_prefill_s"] + cp["later_prefill_s"])
        if "transformers" in sysres:
            res["ratios"]["turns_per_min_vs_transformers"] = c["turns_per_min"] / sysres["transformers"]["turns_per_min"]
    res["extrapolated_minutes"] = {"conversations": args.extrapolate, "turns": args.extrapolate * args.turns, **{
        k: round(args.extrapolate * args.turns / r, 2) for k, r in (
            ("cachedattn", c and c["turns_per_min"]),
            ("recompute", sysres.get("recompute", {}).get("summary", {}).get("turns_per_min")),
            ("transformers", sysres.get("transformers", {}).get("turns_per_min"))) if r}}
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
