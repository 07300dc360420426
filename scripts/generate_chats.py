"""Generate (or continue) one self-generated SmolLM2 conversation for the truncation experiment.

    python scripts/generate_chats.py --seed 4 --out runs/chat4.json

Writes ``{"fingerprint", "generation": {seed: {...}}, "conversations": [conv]}`` (the format of
``docs/results/truncation_conversations_extended.json``; ``conversations.json`` of ``eval-truncation``
reads it) after every turn, with each turn's tokens, wall and CPU seconds and load average, so a run
that is stopped keeps its whole turns; run again, it continues the stored conversation
(``generate_conversation(prefix=...)``) as a new session. Settings: ``paste_prob=0.75,
passage_words=240`` (docs/truncation.md, items 4 and 6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON file, written after every turn")
    p.add_argument("--tokens", type=int, default=2200, help="stop once the conversation has this many tokens")
    p.add_argument("--paste-prob", type=float, default=0.75)
    p.add_argument("--passage-words", type=int, default=240)
    args = p.parse_args(argv)

    from jax_cachedattn.evaluation import text
    from jax_cachedattn.runtime import load_model

    m = load_model("smollm2")
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if stored and stored.get("fingerprint") != m.fingerprint:
        print(f"{args.out}: written for another model", file=sys.stderr)
        return 2
    prefix = next((c for c in stored.get("conversations", []) if c["seed"] == args.seed), None)
    gen = stored.get("generation", {}).get(str(args.seed)) or {
        "paste_prob": args.paste_prob, "passage_words": args.passage_words, "min_tokens": args.tokens,
        "extended_from": 0, "done": False, "sessions": [], "wall_s": 0.0}
    n0 = len(prefix["ids"]) if prefix else 0
    if n0 >= args.tokens:
        print(f"seed {args.seed}: already {n0} tokens")
        return 0
    session = {"from": n0, "to": n0, "wall_s": 0.0, "cpu_s": 0.0, "turns": []}
    gen["sessions"].append(session)
    before = gen["wall_s"]
    t0, c0 = time.time(), _cpu()

    def save(conv: dict) -> None:
        wall, cpu = round(time.time() - t0, 1), round(_cpu() - c0, 1)
        session.update(to=len(conv["ids"]), wall_s=wall, cpu_s=cpu)
        session["turns"].append({"tokens": len(conv["ids"]), "wall_s": wall, "cpu_s": cpu,
                                 "load": os.getloadavg()[0], "utc": time.strftime("%H:%M:%S", time.gmtime())})
        gen.update(wall_s=round(before + wall, 1), done=len(conv["ids"]) >= args.tokens)
        body = {"fingerprint": m.fingerprint, "generation": {str(args.seed): gen}, "conversations": [conv]}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(args.out)
        print(f"seed {args.seed}: {len(conv['ids'])} tokens, {wall} s, {cpu} CPU-s, load {os.getloadavg()[0]:.1f}",
              flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    text.generate_conversation(m.params, m.config, m.tokenizer, args.tokens, args.seed, prefix=prefix,
                               paste_prob=args.paste_prob, passage_words=args.passage_words, on_partial=save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
