"""``real`` mode: the engine runs every turn; the trace clock advances by the measured engine time.

Each system gets a fresh `TieredStore` (TensorStore on a folder under the output directory) with
the config's budgets and the system's policy, an `Engine` over it, and the same `Scheduler` and
`Driver` as the simulator. The engine runs one job at a time through `Engine.turn` (the job is
handed over by `RealExecutor.start`; switching to batched slots changes only that method).

How the systems map onto the engine: ``recompute`` runs with ``use_cache=False``; ``sync-load``
with ``preload="upfront"``; ``sync-save`` waits for the store to flush after every turn (counted in
the job's time); ``device-prefix`` keeps KV only within the device budget (a session whose KV fell
out of it is recomputed from its token ids: its store entry is dropped and the whole context is sent
again); ``naive-truncation`` does the same when the context overflows (post-RoPE keys cannot be
truncated); ``oracle`` has device and host budgets larger than the trace. ``clock="model"`` replaces
the measured times by a cost model's (tests use it to compare the two modes' decisions).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np

from jax_cachedattn.model import TRACE_COUNTS
from jax_cachedattn.scheduler import Job, Scheduler
from jax_cachedattn.workload import Workload

from . import config as C
from .driver import Driver, Outcome
from .metrics import summarize
from .systems import System, policy_and_config

_BIG = 1 << 40


class StoreAdapter:
    """The scheduler's `StoreView` over a real `TieredStore`."""

    def __init__(self, store):
        self.store = store
        self.running: set[str] = set()
        self.inflight: dict[str, object] = {}  # sid -> the future of a prefetch issued by the scheduler
        lay = store.layout
        self._L, self._B, self._bb = lay.num_layers, store.cfg.token_block, store.block_bytes

    def _info(self, sid):
        try:
            return self.store.lookup(sid)
        except Exception:  # noqa: BLE001 - an id the store refuses is simply absent
            return None

    def tier_of(self, sid):
        info = self._info(sid)
        return None if info is None or info.num_tokens == 0 else info.tier

    def kv_bytes(self, sid):
        info = self._info(sid)
        return 0 if info is None else self._L * -(-info.num_tokens // self._B) * self._bb

    def capacity(self, tier):
        return self.store.budget[tier]

    def used(self, tier):
        return self.store.usage()[tier]

    def sessions_in(self, tier):
        want = {"device": ("device",), "host": ("device", "host"), "disk": ("device", "host", "disk")}[tier]
        return [s for s in self.store.sessions() if self.tier_of(s) in want]

    def mean_kv_bytes(self):
        sizes = [self.kv_bytes(s) for s in self.store.sessions()]
        sizes = [b for b in sizes if b]
        return int(sum(sizes) / len(sizes)) if sizes else 0

    def prefetch(self, sid):
        self.inflight = {s: f for s, f in self.inflight.items() if not f.done()}
        self.inflight[sid] = self.store.prefetch(sid)

    def evict(self, sid, tier):
        self.store.evict(sid, tier)

    def busy(self, sid):
        f = self.inflight.get(sid)
        return sid in self.running or (f is not None and not f.done())

    def wait_prefetches(self, timeout_s: float) -> None:
        pending = [f for f in self.inflight.values() if not f.done()]
        if pending and timeout_s > 0:
            import concurrent.futures as cf

            cf.wait(pending, timeout=timeout_s)


class RealExecutor:
    def __init__(self, system: System, engine, recompute_engine, adapter: StoreAdapter, *, cost=None):
        self.system, self.engine, self.recompute_engine = system, engine, recompute_engine
        self.adapter, self.store = adapter, engine.store
        self.cost = cost  # clock="model": times from the cost model instead of the measurement

    def _fresh_context(self, sid: str, job: Job) -> np.ndarray | None:
        """device-prefix / naive-truncation: the context to recompute as a new session, or None."""
        sys_ = self.system
        info = self.store.lookup(sid)
        if info is None:
            return None
        hist = np.asarray(info.token_ids, np.int32)
        mc = self.engine.model_config
        if sys_.device_only and info.tier == "disk":
            pass  # fell out of the device budget: nothing behind it
        elif sys_.naive_truncation and len(hist) + job.new_tokens + job.max_new_tokens + 2 > mc.max_context:
            keep = mc.max_context - job.new_tokens - job.max_new_tokens - 2
            drop = max(len(hist) - keep, math.ceil(self.engine.config.truncation_ratio * len(hist)))
            hist = hist[drop:]
        else:
            return None
        self.store.delete(sid)
        return hist

    def start(self, job: Job, now: float) -> Outcome:
        sid = job.sid
        self.adapter.running.add(sid)
        prompt = np.asarray(job.prompt_ids, np.int32)
        fresh = self._fresh_context(sid, job) if (self.system.device_only or self.system.naive_truncation) else None
        msg = prompt if fresh is None else np.concatenate([fresh, prompt])
        engine = self.engine if self.system.reuse else self.recompute_engine
        traced = sum(TRACE_COUNTS.values())
        r = engine.turn(sid, msg, max_new_tokens=job.max_new_tokens)
        compiled = sum(TRACE_COUNTS.values()) != traced
        service = r.total_s
        if self.system.sync_save:
            t0 = time.perf_counter()
            self.store.flush()
            service += time.perf_counter() - t0
        hist = r.history_tokens if fresh is None else len(fresh)
        source = r.source if fresh is None else ("recompute" if len(fresh) else "new")
        if self.system.device_only and source in ("host", "disk"):
            source = "device"  # device-prefix: the store's first tier stands for the device budget
        reused = r.reused_tokens
        info = self.store.lookup(sid)
        after = info.num_tokens if info is not None else hist + len(prompt) + r.generated_tokens
        ttft = r.ttft_s
        if self.cost is not None:
            tier = source if source in ("device", "host", "disk") else None
            ttft = (self.cost.ttft_s(len(prompt), reused, tier, reused * self.cost.bytes_per_token) if tier
                    else self.cost.prefill_s(hist + len(prompt), 0))
            service = ttft + self.cost.decode_s(r.generated_tokens)
        return Outcome(ttft, service, source, reused, hist, len(prompt), r.generated_tokens, r.truncated_tokens, after,
                       reused * self.store.layout.bytes_per_token, compiled=compiled and self.cost is None)

    def complete(self, job: Job, outcome: Outcome, now: float) -> None:
        self.adapter.running.discard(job.sid)
        if self.cost is not None:
            self.store.flush()  # a modelled clock: let async work settle, so the store's state is deterministic

    def sync(self, now: float) -> None:
        pass

    def idle(self, gap_s: float) -> None:
        """The engine would idle ``gap_s`` seconds (the trace's think times are not slept): the store's
        prefetches get that long in real time to land, as they would on a live server."""
        if self.cost is not None:
            self.store.flush()
        else:
            self.adapter.wait_prefetches(gap_s)


class RealBench:
    """Loads the model and the workload once; runs each system on a fresh store."""

    def __init__(self, cfg: dict, out: Path):
        from jax_cachedattn.workload import with_token_ids

        from .run import build_workload
        from .textcorpus import with_text_ids

        self.cfg, self.out = cfg, Path(out)
        self.model = load_bench_model(cfg)
        mc = self.model.config
        wl = build_workload(cfg, tokenizer=self.model.tokenizer)
        if wl.sessions and wl.sessions[0].turns[0].prompt_ids is None:
            wl = (with_text_ids(wl, self.model.tokenizer, seed=cfg["seed"]) if self.model.tokenizer is not None
                  else with_token_ids(wl, mc.vocab_size, seed=cfg["seed"]))
        self.workload = _fit_context(wl, mc.max_context)
        self._peer = None

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
        if self.cfg["engine"].get("compile_pass") and cost is None:
            self._compile_pass(system)
        policy, scfg = policy_and_config(system, self.cfg)
        root = self.out / "stores" / system.name
        shutil.rmtree(root, ignore_errors=True)
        engine, rengine, store = open_system(system, self.cfg, self.model, root, policy)
        adapter = StoreAdapter(store)
        sched = Scheduler(adapter, store.policy, scfg)
        ex = RealExecutor(system, engine, rengine, adapter, cost=cost)
        self._warm_compile(engine, rengine)
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
        res.update(mode="real", evictions=st["evictions"], bytes_read=st["bytes_read"], bytes_written=st["bytes_written"],
                   prefetches_issued=st["prefetches_issued"], prefetches_in_time=st["prefetches_in_time"])
        res["decisions"] = len(sched.decisions)
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
        engine, rengine, store = open_system(system, self.cfg, self.model, root, policy)
        adapter = StoreAdapter(store)
        drv = Driver(self.workload, Scheduler(adapter, store.policy, scfg),
                     RealExecutor(system, engine, rengine, adapter), slots=1)
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


def open_system(system: System, cfg: dict, model, root: Path, policy):
    """(engine, recompute engine, store) of one system."""
    from jax_cachedattn.engine import Engine, EngineConfig
    from jax_cachedattn.runtime import kv_layout
    from jax_cachedattn.store import StoreConfig, TieredStore

    st = cfg["store"]
    dev = C.store_bytes(st, "device", 0)
    host = C.store_bytes(st, "host", 1 << 30)
    disk = C.store_bytes(st, "disk", None)
    if system.unbounded:
        dev, host, disk = _BIG, _BIG, None
    elif system.device_only:
        if not dev:
            raise C.ConfigError("device-prefix needs store.device_mib (or device_gb) > 0")
        host, dev = dev, 0  # the device budget, held by the store's first tier; what falls out is recomputed
    need = model.config.max_context * model.config.num_layers * 2 * model.config.num_kv_heads * model.config.head_dim * \
        {"float32": 4, "bfloat16": 2, "float16": 2}[model.config.dtype]
    if host < need:
        raise C.ConfigError(f"{system.name}: the host budget ({host} bytes) must hold one full-context session "
                            f"({need} bytes)")
    kvstore = {"driver": "memory"} if st.get("kvstore") == "memory" else None
    scfg = StoreConfig(root=str(root), kvstore=kvstore, device_bytes=dev, host_bytes=host, disk_bytes=disk,
                       token_block=st.get("token_block", 256))
    root.mkdir(parents=True, exist_ok=True)
    store = TieredStore(scfg, kv_layout(model.config, model.fingerprint), policy)
    ec = EngineConfig(max_new_tokens=cfg["engine"].get("max_new_tokens", 64),
                      prompt_bucket=cfg["engine"].get("prompt_bucket", 16),
                      preload="upfront" if not system.overlap else "auto",
                      keep_pages=False)  # the store's device tier is the device tier the scheduler sees
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
            turns.append(dataclasses.replace(t, prompt_ids=ids, user_tokens=len(ids), reply_tokens=gen))
        out.append(dataclasses.replace(s, turns=tuple(turns)))
    return Workload(wl.name, out)
