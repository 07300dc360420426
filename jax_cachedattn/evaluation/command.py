"""``cachedattn eval-truncation`` and ``scripts/eval_truncation.py``: arguments, model, sources, run.

    cachedattn eval-truncation --model smollm2 --out runs/eval_truncation
    cachedattn eval-truncation --model tests/data/tiny_bytes --windows 256 --continuation 64 --out runs/tiny

``--model``: ``smollm2`` (prose and self-generated chats, recall task) or an orbax checkpoint written
by ``save_params`` with its config beside it (the tiny byte-level model of ``scripts/train_tiny.py``:
prose only, bytes as tokens).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from jax_cachedattn.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or an orbax checkpoint folder (tiny byte model)")
    p.add_argument("--out", default="runs/eval_truncation", help="folder for results.json, tables.md and the plots")
    p.add_argument("--windows", default="512,1024,2048", help="context windows W, comma-separated")
    p.add_argument("--ratios", default="0.25,0.5", help="truncation ratios, comma-separated")
    p.add_argument("--continuation", type=int, default=128, help="tokens after the truncation point (C)")
    p.add_argument("--prose", type=int, default=2, help="pydoc windows per W")
    p.add_argument("--chats", type=int, default=2, help="self-generated conversations (smollm2 only)")
    p.add_argument("--chat-tokens", type=int, default=None,
                   help="generate conversations of at least this many tokens (default: largest W + C)")
    p.add_argument("--recall", type=int, default=4, help="recall items per W (smollm2 only)")
    p.add_argument("--sink", type=int, default=4,
                   help="also run TT+sink and CA+sink, which keep the first SINK tokens as the engine does "
                        "(EngineConfig.truncation_sink, default 4; 0: off)")
    p.add_argument("--sweep", default="",
                   help="more sink sizes to compare, comma-separated (e.g. 1,16): TT+sinkK and CA+sinkK per cut")
    p.add_argument("--no-variants", action="store_true", help="skip the mid-turn and system-prompt cuts")
    p.add_argument("--seed", type=int, default=0, help="seed of text offsets, conversations and facts")
    p.add_argument("--merge", default="", metavar="PATH,PATH",
                   help="no new run: pool the rows and recall items of earlier runs (their folders or results "
                        "files) into --out, with the sink sweep tables")
    p.add_argument("--conversations", default="", metavar="PATH,PATH",
                   help="with --merge: conversation files (conversations.json) of chat rows stored without their "
                        "tokens' roles (runs before roles were kept): the roles are added for the by-role table")


def _ints(s: str, what: str) -> tuple:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated integers, got {s!r}") from None


def _floats(s: str, what: str) -> tuple:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"--{what} must be comma-separated numbers, got {s!r}") from None


def load(spec: str) -> tuple[Any, Any, Any, str, str]:
    """``(config, params, tokenizer or None, fingerprint, name)`` for ``smollm2`` or an orbax folder."""
    if spec == "smollm2":
        from jax_cachedattn.runtime import load_model

        m = load_model("smollm2")
        return m.config, m.params, m.tokenizer, m.fingerprint, "SmolLM2-135M-Instruct"
    from jax_cachedattn.checkpoint import load_config, params_fingerprint, restore_params

    path = Path(spec)
    if not path.is_dir():
        raise UsageError(f"--model: {spec!r} is neither 'smollm2' nor an orbax checkpoint folder")
    config = load_config(path)
    params = restore_params(path)
    if config.vocab_size != 256:
        raise UsageError(f"--model {spec}: only byte-level checkpoints (vocabulary 256) have a tokenizer here")
    return config, params, None, params_fingerprint(config, params), config.name


def merge(dirs: list[Path], out: Path, conversations: list[Path] = ()) -> dict[str, Path]:
    """Pool earlier runs (a folder holding ``results.json``, or such a file) into one report in ``out``: the
    rows and recall items of every run, each row tagged with its run (``run``), the headers kept under
    ``merged_from``. ``conversations``: files of the chats the rows scored; a chat row stored without its
    tokens' roles gets them from its conversation (the longest stored with its seed)."""
    import json

    from jax_cachedattn.evaluation import report

    roles: dict[int, str] = {}
    if conversations:
        from jax_cachedattn.evaluation.text import token_roles

        convs: dict[int, dict] = {}
        for f in conversations:
            if not Path(f).is_file():
                raise UsageError(f"--conversations: {f} does not exist")
            for c in json.loads(Path(f).read_text())["conversations"]:
                if len(c["ids"]) > len(convs.get(c["seed"], {"ids": ()})["ids"]):
                    convs[c["seed"]] = c
        tok = load("smollm2")[2]
        roles = {s: token_roles(c, tok) for s, c in convs.items()}
    rows, recall, heads = [], [], []
    for d in dirs:
        f = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
        if not f.is_file():
            raise UsageError(f"--merge: {f} does not exist")
        body = json.loads(f.read_text())
        for r in body["rows"]:
            if r["source"] == "chat" and "roles" not in r and r["seq"] in roles:
                r["roles"] = roles[r["seq"]][r["W"] + 1 : r["W"] + r["C"]]
        rows += [{**r, "run": str(d)} for r in body["rows"]]
        recall += [{**r, "run": str(d)} for r in body["recall"]]
        # an unfinished run (stopped after some windows) counts with the windows it finished: "complete" says so
        heads.append({k: body.get(k) for k in ("config", "complete", "wall_s", "generation_s", "machine")} | {"dir": str(d)})
        model = body["model"]
    if len({h["dir"] for h in heads}) != len(heads):
        raise UsageError("--merge: a folder is named twice")
    return report.write({"rows": rows, "recall": recall}, out, {"model": model, "merged_from": heads, "complete": True})


def main(args: argparse.Namespace) -> int:
    if args.merge:
        files = merge([Path(d) for d in args.merge.split(",") if d.strip()], Path(args.out),
                      [Path(f) for f in args.conversations.split(",") if f.strip()])
        print(Path(files["tables"]).read_text())
        return 0
    import jax
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from jax_cachedattn.evaluation import experiment, report, text
    from jax_cachedattn.evaluation.methods import Truncator
    from jax_cachedattn.evaluation.tiny import encode_bytes

    console = Console(stderr=True)
    try:  # the flags' values are the user's input: a value the config rejects is bad input
        cfg = experiment.EvalConfig(windows=_ints(args.windows, "windows"), ratios=_floats(args.ratios, "ratios"),
                                    continuation=args.continuation, prose=args.prose, chats=args.chats,
                                    recall=args.recall, variants=not args.no_variants, sink=args.sink,
                                    sweep=_ints(args.sweep, "sweep"), seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None
    t0 = time.perf_counter()
    with console.status(f"loading {args.model}…"):
        config, params, tok, fp, name = load(args.model)
    need = max(cfg.windows) + cfg.continuation
    config = config.replace(max_context=max(config.max_context, need + 256))
    out = Path(args.out)
    if tok is None:  # byte model: held-out prose only
        stream = encode_bytes(text.pydoc_text("eval", seed=cfg.seed))
        prose_src = "pydoc (held out)"
    else:
        stream = np.asarray(tok.encode(text.pydoc_text("all", seed=cfg.seed)), np.int32)
        prose_src = "pydoc"
    seqs = [experiment.Sequence(prose_src, i, s) for i, s in enumerate(text.prose_sequences(stream, cfg.prose, need, cfg.seed))]
    convs: list[dict] = []
    gen_s = 0.0
    if tok is not None and (cfg.chats or cfg.recall):
        g0 = time.perf_counter()
        n_conv = max(cfg.chats, 1)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as prog:
            task = prog.add_task("conversations (generated once, cached)", total=n_conv)
            convs = text.load_or_generate_conversations(params, config, tok, n_conv, args.chat_tokens or need, cfg.seed,
                                                        out / "conversations.json", fp,
                                                        on_done=lambda s: prog.advance(task))
        gen_s = time.perf_counter() - g0
        boundary = tok.token_to_id("<|im_start|>")
        seqs += [experiment.Sequence("chat", c["seed"], np.asarray(c["ids"], np.int32), np.asarray(c["turn_starts"]), boundary,
                                     text.token_roles(c, tok))
                 for c in convs[: cfg.chats]]
    n_recall = {W: len(experiment.recall_items(convs, tok, W, cfg)) for W in cfg.windows} if convs and cfg.recall else {}
    truncator = Truncator(params, config)

    def header(done: bool) -> dict:
        return {"model": {"name": name, "spec": args.model, "fingerprint": fp, "config": config.to_dict()},
                "config": {**vars(cfg), "windows": list(cfg.windows), "ratios": list(cfg.ratios)},
                "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                            "jax_backend": jax.default_backend()},
                "complete": done, "wall_s": round(time.perf_counter() - t0, 1), "generation_s": round(gen_s, 1)}

    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as prog:
            task = prog.add_task("truncation eval", total=experiment.count_units(seqs, cfg, n_recall))
            res = experiment.run(truncator, seqs, cfg, conversations=convs if cfg.recall else None, tokenizer=tok,
                                 progress=lambda what, n=1: prog.update(task, advance=n, description=what),
                                 on_window=lambda partial: report.write(partial, out, header(False)))
    finally:
        truncator.close()
    wall = time.perf_counter() - t0
    files = report.write(res, out, header(True))
    console.print(Path(files["tables"]).read_text())
    console.print(f"{len(res['rows'])} rows, {len(res['recall'])} recall results in {wall:.0f} s -> "
                  + ", ".join(str(p) for p in files.values()))
    return 0
