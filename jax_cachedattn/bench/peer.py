"""The Hugging Face transformers peer on the same SmolLM2 weights (the same GGUF file), same trace.

``hf-recompute`` runs every turn over the whole context; ``hf-reuse`` keeps each session's own
in-memory ``DynamicCache`` across turns (no budget, no tiers: what transformers offers). Greedy
decoding of the turn's output budget, stopping at the tokenizer's stop ids like the engine.
Used only when torch and transformers are installed (the ``test`` extra).

With ``workload.feed_replies`` the peer does what the engine does (bench/real_exec.py): it decodes
``gen_tokens`` tokens, then runs the recorded reply's tokens through the model as one more forward
pass (into its cache for ``hf-reuse``; into the token history for both), counted in the job's
service time, not its TTFT.
"""

from __future__ import annotations

import time


from jax_cachedattn.scheduler import Job, Scheduler, SchedulerConfig, make_policy

from .driver import Driver, Outcome
from .metrics import summarize


class PeerExecutor:
    def __init__(self, model, stop_ids, reuse: bool, replies: dict | None = None, gen_tokens: int | None = None):
        self.model, self.stop_ids, self.reuse = model, set(stop_ids), reuse
        self.replies, self.gen_tokens = replies or {}, gen_tokens
        self.ids: dict[str, list[int]] = {}
        self.cache: dict[str, object] = {}

    def start(self, job: Job, now: float) -> Outcome:
        import torch

        hist = self.ids.get(job.sid, [])
        prompt = list(job.prompt_ids)
        reply = list(self.replies.get((job.sid, job.turn)) or [])
        max_new = min(job.max_new_tokens, self.gen_tokens) if reply and self.gen_tokens else job.max_new_tokens
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.reuse and job.sid in self.cache:
                cache = self.cache[job.sid]
                out = self.model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
                reused, source = len(hist), "host"
            else:
                out = self.model(torch.tensor([hist + prompt]), use_cache=True)
                reused, source = 0, ("recompute" if hist else "new")
            tok = int(torch.argmax(out.logits[0, -1]))
            ttft = time.perf_counter() - t0
            cache, gen = out.past_key_values, [tok]
            while len(gen) < max_new and tok not in self.stop_ids:
                out = self.model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                tok = int(torch.argmax(out.logits[0, -1]))
                gen.append(tok)
            if self.reuse:  # feed the last token (and the recorded reply) into the kept cache
                out = self.model(torch.tensor([[tok] + reply]), past_key_values=cache, use_cache=True)
        total = time.perf_counter() - t0
        self.ids[job.sid] = hist + prompt + gen + reply
        if self.reuse:
            self.cache[job.sid] = out.past_key_values
        return Outcome(ttft, total, source, reused, len(hist), len(prompt), len(gen), 0, len(self.ids[job.sid]))

    def complete(self, job: Job, outcome: Outcome, now: float) -> None:
        pass

    def sync(self, now: float) -> None:
        pass

    def idle(self, gap_s: float) -> None:
        pass


def run_peer(system, bench, on_job=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jax_cachedattn.assets import smollm2_gguf_path

    from .systems import NoStore

    torch.set_num_threads(int(bench.cfg.get("peer", {}).get("threads", 2)))
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    ex = PeerExecutor(model, bench.model.tokenizer.stop_ids, reuse=system.reuse,
                      replies=getattr(bench, "replies", None), gen_tokens=getattr(bench, "gen_tokens", None))
    with torch.inference_mode():
        model(torch.arange(16, 80)[None])  # warm-up
    sched = Scheduler(NoStore(), make_policy("lru"), SchedulerConfig(prefetch=False))
    drv = Driver(bench.workload, sched, ex, warmup_turns=bench.cfg["warmup_turns"], on_job=on_job)
    t0 = time.perf_counter()
    recs = drv.run()
    res = summarize(recs, wall_s=time.perf_counter() - t0, prices=bench.cfg.get("prices"))
    res["mode"] = "real"
    res["peer"] = f"transformers {__import__('transformers').__version__}, torch {torch.__version__}"
    return res


__all__ = ["PeerExecutor", "run_peer"]
