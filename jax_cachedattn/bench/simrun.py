"""``simulate`` mode: each system (and each point of a host-capacity sweep) replays the trace on a
`SimStore` with a `SimExecutor` (the cost model's clock), in this process or in worker processes."""

from __future__ import annotations

import json
import time

from jax_cachedattn.scheduler import Scheduler
from jax_cachedattn.workload import Workload

from . import config as C
from .costmodel import from_config
from .driver import Driver
from .metrics import summarize
from .simstore import SimStore
from .simulate import SimExecutor
from .systems import NoStore, System, get_systems, policy_and_config
from .trace import build_workload


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
                   on_job=None, policy=None, on_driver=None) -> tuple[dict, Driver]:
    """One replay. ``policy``: a policy object to use instead of the system's (diagnostics,
    ``bench/gap.py``); ``on_driver(driver, store)``: called before the replay starts."""
    mc = model_shape(cfg)
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[mc.dtype]
    bptl = 2 * mc.num_kv_heads * mc.head_dim * itemsize
    bpt = bptl * mc.num_layers
    cost = from_config(cfg.get("cost_model", {}), num_layers=mc.num_layers, bytes_per_token=bpt)
    st = cfg["store"]
    hb = host_bytes if host_bytes is not None else C.store_bytes(st, "host", 1 << 30)
    db = C.store_bytes(st, "disk", None)
    dev = C.store_bytes(st, "device", 0)
    own, scfg = policy_and_config(system, cfg)
    policy = own if policy is None else policy
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
    view = store if store is not None else NoStore()
    sched = Scheduler(view, policy, scfg)
    ex = SimExecutor(system, store, cost, max_context=mc.max_context, bytes_per_token=bpt)
    drv = Driver(workload, sched, ex, warmup_turns=cfg["warmup_turns"], slots=cfg["engine"].get("slots", 1), on_job=on_job)
    if system.policy == "belady":
        policy.next_use = drv.next_use
    if on_driver is not None:
        on_driver(drv, store)
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


def run_simulate(cfg: dict, results: dict, bar, jobs: int) -> None:
    """Every system of ``cfg`` and the sweep's points, into ``results`` (systems, sweep, skipped)."""
    systems = get_systems(cfg["systems"])
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
