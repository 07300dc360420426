"""``real`` mode: the engine runs every turn; the trace clock advances by the measured engine time.

Each system gets a fresh `TieredStore` (TensorStore on a folder under the output directory) with
the config's budgets and the system's policy, an `Engine` over it, and the same `Scheduler` and
`Driver` as the simulator. The engine runs one job at a time through `Engine.turn` (the job is
handed over by `RealExecutor.start`; switching to batched slots changes only that method).

The executor and the store adapter are in :mod:`.real_exec` (how each system maps onto the
engine); ``oracle`` has device and host budgets larger than the trace.

``engine.warmup: programs`` (:mod:`.warm`): before its measured replay, each system's engine compiles
every program the trace's turns may run from every tier, and its appends' (the compile pass below
compiled only the tiers its own replay met, and left jobs out).

``engine.compile_pass``: before its measured replay, a system first replays the whole trace once,
unmeasured, on a scratch store, so the measured replay meets compiled programs; once per *program
family* (``recompute``; the systems that reuse KV with layer-wise loading; ``sync-load``),
since jitted programs are shared by every engine of the process: the family's later systems meet
the programs the first one compiled, and a job that still compiles is left out of the figures
(``jobs_excluded_compiling``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from jax_cachedattn.scheduler import Scheduler
from jax_cachedattn.workload import Workload

from . import config as C
from .driver import Driver
from .metrics import summarize
from .real_exec import RealExecutor, StoreAdapter
from .systems import System, policy_and_config

_BIG = 1 << 40


class RealBench:
    """Loads the model and the workload once; runs each system on a fresh store."""

    def __init__(self, cfg: dict, out: Path):
        from jax_cachedattn.workload import with_token_ids

        from .trace import build_workload
        from .textcorpus import with_text_ids

        self.cfg, self.out = cfg, Path(out)
        self.feed = bool(cfg["workload"].get("feed_replies"))
        self.model = load_bench_model(cfg)
        mc = self.model.config
        wl = build_workload(cfg, tokenizer=self.model.tokenizer)
        if wl.sessions and wl.sessions[0].turns[0].prompt_ids is None:
            wl = (with_text_ids(wl, self.model.tokenizer, seed=cfg["seed"], replies=self.feed)
                  if self.model.tokenizer is not None
                  else with_token_ids(wl, mc.vocab_size, seed=cfg["seed"]))
        self.workload = _fit_context(wl, mc.max_context)
        # feed_replies: (sid, turn) -> the recorded reply's ids, appended after the turn's few decoded tokens
        self.replies = ({(s.sid, k): t.reply_ids for s in self.workload.sessions for k, t in enumerate(s.turns)
                         if t.reply_ids} if self.feed else {})
        self.gen_tokens = int(cfg["engine"].get("max_new_tokens", 64)) if self.feed else None
        self._peer = None
        self._compiled: set[tuple] = set()  # program families whose compile pass ran

    def peer_available(self) -> bool:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return False
        return self.model.tokenizer is not None  # the peer loads the same GGUF (SmolLM2 only)

    def run_system(self, system: System, on_job=None, cost=None) -> dict:
        if system.peer:
            from .peer import run_peer

            return run_peer(system, self, on_job=on_job)
        if self.cfg["engine"].get("compile_pass") and cost is None and program_family(system) not in self._compiled:
            self._compile_pass(system)
            self._compiled.add(program_family(system))
        policy, scfg = policy_and_config(system, self.cfg)
        root = self.out / "stores" / system.name
        shutil.rmtree(root, ignore_errors=True)
        engine, rengine, store = open_system(system, self.cfg, self.model, root, policy, len(self.workload.sessions))
        adapter = StoreAdapter(store, engine)
        sched = Scheduler(adapter, store.policy, scfg)
        ex = RealExecutor(system, engine, rengine, adapter, cost=cost, replies=self.replies, gen_tokens=self.gen_tokens)
        self._warm_compile(engine, rengine)
        warm = None
        if self.cfg["engine"].get("warmup") == "programs" and cost is None:
            from .warm import trace_shapes, warm_engine

            turns, appends = trace_shapes(self.workload, self.replies, self.gen_tokens,
                                          int(self.cfg["engine"].get("max_new_tokens", 64)))
            warm = warm_engine(engine, rengine, turns, appends, unbounded=system.unbounded,
                               sources=self.cfg["engine"].get("warmup_sources", ("host", "device", "disk")))
        drv = Driver(self.workload, sched, ex, warmup_turns=self.cfg["warmup_turns"],
                     slots=1, on_job=on_job)
        if system.policy == "belady":
            policy.next_use = drv.next_use
        t0 = time.perf_counter()
        recs = drv.run()
        wall = time.perf_counter() - t0
        store.flush()
        st = store.stats.as_dict()
        res = summarize(recs, wall_s=wall, prices=self.cfg.get("prices"), host_bytes=store.budget["host"] or 0,
                        disk_bytes=store.usage()["disk"])
        # prefetches: the scheduler's disk -> host reads and how many had landed when their job started
        # (counted by the adapter: the store's own counters also count the promotions a load starts itself)
        res.update(mode="real", evictions=st["evictions"], bytes_read=st["bytes_read"], bytes_written=st["bytes_written"],
                   prefetches_issued=adapter.issued, prefetches_in_time=adapter.in_time, prefetches_late=adapter.late,
                   disk_promotions=st["prefetches_issued"], replies_fed=self.feed)
        res["decisions"] = len(sched.decisions)
        # what still compiled during the measured replay (program names; a turn's left the job out of the
        # TTFT figures, an append's only lengthened its service time)
        res["compiled_during_replay"] = [{"sid": sid, "turn": k, "turn_traced": a, "append_traced": b}
                                         for sid, k, a, b in ex.compiles]
        if warm is not None:
            res["warmup"] = {"programs": warm["programs"], "turns": warm["turns"], "seconds": round(warm["seconds"], 1)}
        self.last_scheduler = sched
        self.last_records = recs
        engine.close()
        return res

    def _compile_pass(self, system: System) -> None:
        """``engine.compile_pass``: replay the whole trace once on a scratch store, unmeasured, so the
        programs of every shape the measured replay meets are compiled (on a CPU a compile takes
        longer than the turns it serves; the jobs that still compile are left out of the figures)."""
        policy, scfg = policy_and_config(system, self.cfg)
        root = self.out / "stores" / f"{system.name}.compile-pass"
        shutil.rmtree(root, ignore_errors=True)
        engine, rengine, store = open_system(system, self.cfg, self.model, root, policy, len(self.workload.sessions))
        adapter = StoreAdapter(store, engine)
        drv = Driver(self.workload, Scheduler(adapter, store.policy, scfg),
                     RealExecutor(system, engine, rengine, adapter, replies=self.replies, gen_tokens=self.gen_tokens),
                     slots=1)
        if system.policy == "belady":
            policy.next_use = drv.next_use
        drv.run()
        store.flush()
        engine.close()
        shutil.rmtree(root, ignore_errors=True)

    def _warm_compile(self, engine, rengine) -> None:
        """One throwaway two-turn session per engine, so compile time is not charged to the trace."""
        for e in {id(engine): engine, id(rengine): rengine}.values():
            ids = np.arange(16, 16 + 24, dtype=np.int32) % self.model.config.vocab_size
            e.turn("warmup-compile", ids, max_new_tokens=4)
            e.turn("warmup-compile", ids, max_new_tokens=4)
            if e.store is not None:
                e.store.flush()
                e.store.delete("warmup-compile")

    def close(self) -> None:
        pass


def program_family(system: System) -> tuple:
    """Systems whose turns run the same compiled programs on the same trace (see the module docstring).
    The oracle's page pool has another shape than the bounded systems' (programs over the pool compile
    per shape), so it is a family of its own; its compile pass finds the prefill programs already built
    by cachedattn's and builds the pool's."""
    return (system.reuse, system.overlap, system.unbounded)


def open_system(system: System, cfg: dict, model, root: Path, policy, sessions: int = 1):
    """(engine, recompute engine, store) of one system; ``sessions``: the workload's (sizes the
    oracle's page pool)."""
    from jax_cachedattn.engine import Engine, EngineConfig
    from jax_cachedattn.runtime import kv_layout
    from jax_cachedattn.store import StoreConfig, TieredStore

    st = cfg["store"]
    dev = C.store_bytes(st, "device", 0)
    host = C.store_bytes(st, "host", 1 << 30)
    disk = C.store_bytes(st, "disk", None)
    if system.unbounded:
        dev, host, disk = _BIG, _BIG, None
    if system.device_only and not system.unbounded:
        if not dev:
            raise C.ConfigError("device-prefix needs store.device_mib (or device_gb) > 0")
        host, dev = dev, 0  # the device budget, held by the store's first tier; what falls out is recomputed
    need = model.config.max_context * model.config.num_layers * 2 * model.config.num_kv_heads * model.config.head_dim * \
        {"float32": 4, "bfloat16": 2, "float16": 2}[model.config.dtype]
    if host < need:
        raise C.ConfigError(f"{system.name}: the host budget ({host} bytes) must hold one full-context session "
                            f"({need} bytes)")
    kvstore = {"driver": "memory"} if st.get("kvstore") == "memory" else None
    # The device tier of a store-backed system is the engine's page pool (keep_pages): room for the
    # running job's context plus the device budget for finished sessions' pages. The engine's prefill
    # moves host blocks to the device inside its programs and never fills the store's device tier
    # (TieredStore.layer_blocks), so the store gets no device budget. device-prefix and the oracle keep
    # their KV in the store's first tier (relabelled device, real_exec.py).
    # The oracle (unbounded device memory) is that page pool with room for every session's whole
    # context: its reused turns run the same programs as cachedattn's device hits (only the programs
    # over the pool's own shape differ, which its family's compile pass builds), so the two compare
    # like for like; the store behind it never evicts.
    keep = bool(dev) and (not system.device_only or system.unbounded)
    pool_tokens = None
    if keep:
        per_token = need // model.config.max_context
        pool_tokens = (model.config.max_context * (1 + max(1, sessions)) if system.unbounded
                       else model.config.max_context + dev // per_token)
        dev = 0
    scfg = StoreConfig(root=str(root), kvstore=kvstore, device_bytes=dev, host_bytes=host, disk_bytes=disk,
                       token_block=st.get("token_block", 256))
    root.mkdir(parents=True, exist_ok=True)
    store = TieredStore(scfg, kv_layout(model.config, model.fingerprint), policy)
    ec = EngineConfig(max_new_tokens=cfg["engine"].get("max_new_tokens", 64),
                      prompt_bucket=cfg["engine"].get("prompt_bucket", 16),
                      preload="upfront" if not system.overlap else "auto",
                      keep_pages=keep, pool_tokens=pool_tokens)
    engine = Engine(model.config, model.params, store, model.tokenizer, ec)
    rengine = engine if system.reuse else Engine(model.config, model.params, store, model.tokenizer,
                                                 ec.replace(use_cache=False))
    return engine, rengine, store


@dataclasses.dataclass(frozen=True)
class BenchModel:
    config: object
    params: object
    tokenizer: object
    fingerprint: str


def load_bench_model(cfg: dict) -> BenchModel:
    m = cfg["model"]
    name = m.get("name", "smollm2")
    dtype = m.get("dtype", "float32")
    if name == "smollm2" and not m.get("random_weights"):
        from jax_cachedattn.runtime import load_model

        lm = load_model("smollm2", dtype)
        mc = lm.config.replace(max_context=int(m["max_context"])) if "max_context" in m else lm.config
        return BenchModel(mc, lm.params, lm.tokenizer, lm.fingerprint)
    import jax

    from jax_cachedattn.model import ModelConfig, init_params

    mc = ModelConfig.preset("smollm2-135m" if name == "smollm2" else name, dtype=dtype)
    if "max_context" in m:
        mc = mc.replace(max_context=int(m["max_context"]))
    params = init_params(mc, jax.random.key(cfg["seed"]))
    return BenchModel(mc, params, None, f"random-{name}-{dtype}-seed{cfg['seed']}")


def _fit_context(wl: Workload, max_context: int) -> Workload:
    """Cut prompts and reply budgets so that a single turn always fits the context window."""
    out = []
    for s in wl.sessions:
        turns = []
        for t in s.turns:
            gen = min(t.reply_tokens, max_context // 4)
            ids = t.prompt_ids[: max(1, max_context - gen - 2 - 16)]
            rids = t.reply_ids[:gen] if t.reply_ids else t.reply_ids
            turns.append(dataclasses.replace(t, prompt_ids=ids, user_tokens=len(ids), reply_tokens=gen, reply_ids=rids))
        out.append(dataclasses.replace(s, turns=tuple(turns)))
    return Workload(wl.name, out)
