"""Benchmark configuration: a YAML file (``configs/bench/*.yaml``), command-line flags override it.

Sections (every key optional unless marked): ``mode`` (``simulate`` | ``real``), ``seed``,
``systems`` (list), ``warmup_turns``; ``workload``: ``kind`` (``synthetic`` | ``sharegpt``), ``preset``,
``path``, ``sessions``, ``rate_per_s``, ``think_median_s``, ``think_sigma``, ``time_compression``,
``length_scale``, ``max_turns``, ``min_turns`` (keep sessions with at least this many turns),
``max_user_tokens``, ``max_reply_tokens``, ``feed_replies`` (real mode: each turn decodes only
``engine.max_new_tokens`` tokens, then the recorded reply's tokens go into the history with
``Engine.append``, prefilled, not decoded); ``model``: ``name``
(``smollm2`` or a ``configs/model`` preset), ``dtype``, ``max_context``, ``random_weights``;
``store``: ``token_block``, ``device_mib``, ``host_mib``, ``disk_mib`` (null: unlimited), or the same
in ``_gb``; ``scheduler``: `SchedulerConfig` fields; ``engine``: ``slots``; ``cost_model``: see
`costmodel.from_config`; ``prices``; ``sweep``: ``host_gb`` or ``host_mib`` (list) and ``policies``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

_TOP = {"mode", "seed", "systems", "warmup_turns", "workload", "model", "store", "scheduler", "engine",
        "cost_model", "prices", "sweep", "name", "peer"}
_WORKLOAD = {"kind", "preset", "path", "sessions", "rate_per_s", "think_median_s", "think_sigma", "time_compression",
             "length_scale", "max_turns", "max_user_tokens", "max_reply_tokens", "max_prompt_tokens",
             "min_turns", "feed_replies"}


class ConfigError(ValueError):
    """A bad benchmark configuration (one line)."""


def load(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no such config file: {p}")
    try:
        cfg = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return validate(cfg, str(p))


def validate(cfg: dict, where: str = "config") -> dict:
    unknown = set(cfg) - _TOP
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    cfg = copy.deepcopy(cfg)
    cfg.setdefault("mode", "simulate")
    if cfg["mode"] not in ("simulate", "real"):
        raise ConfigError(f"{where}: mode must be 'simulate' or 'real', got {cfg['mode']!r}")
    cfg.setdefault("seed", 0)
    cfg.setdefault("warmup_turns", 0)
    w = cfg.setdefault("workload", {})
    bad = set(w) - _WORKLOAD
    if bad:
        raise ConfigError(f"{where}: unknown workload keys {sorted(bad)}")
    w.setdefault("kind", "synthetic")
    if w["kind"] not in ("synthetic", "sharegpt"):
        raise ConfigError(f"{where}: workload.kind must be 'synthetic' or 'sharegpt'")
    w.setdefault("preset", "sharegpt")
    w.setdefault("sessions", 100)
    cfg.setdefault("model", {"name": "smollm2"})
    cfg.setdefault("store", {})
    cfg.setdefault("scheduler", {})
    cfg.setdefault("engine", {})
    cfg.setdefault("systems", ["recompute", "cachedattn", "lru"])
    if not isinstance(cfg["systems"], list) or not cfg["systems"]:
        raise ConfigError(f"{where}: systems must be a non-empty list")
    return cfg


def apply_overrides(cfg: dict, *, mode: str | None = None, workload: str | None = None, systems: str | None = None,
                    seed: int | None = None) -> dict:
    """``--mode``, ``--workload sharegpt:FILE|synthetic:PRESET``, ``--systems a,b``, ``--seed``."""
    cfg = copy.deepcopy(cfg)
    if mode is not None:
        cfg["mode"] = mode
    if seed is not None:
        cfg["seed"] = seed
    if systems is not None:
        cfg["systems"] = [s.strip() for s in systems.split(",") if s.strip()]
    if workload is not None:
        kind, _, arg = workload.partition(":")
        if kind == "synthetic" and arg:
            cfg["workload"].update(kind="synthetic", preset=arg)
        elif kind == "sharegpt" and arg:
            cfg["workload"].update(kind="sharegpt", path=arg)
        else:
            raise ConfigError(f"--workload must be sharegpt:FILE or synthetic:PRESET, got {workload!r}")
    return validate(cfg, "config (with overrides)")


def store_bytes(store: dict, key: str, default: int | None) -> int | None:
    """``{key}_gb``, ``_mib``, ``_kib`` or ``_bytes`` in bytes (null: None = unlimited)."""
    for unit, mult in (("_gb", 10**9), ("_mib", 1 << 20), ("_kib", 1 << 10), ("_bytes", 1)):
        if key + unit in store:
            v = store[key + unit]
            return None if v is None else int(float(v) * mult)
    return default
