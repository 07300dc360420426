"""``cachedattn bench``: every system of a config on one workload in one process.

For each system a fresh policy, store, scheduler and executor run the same trace through the
`Driver`; the figures go to ``results.json`` (the DESIGN.md contract), a printed table and PNG plots.
In ``simulate`` mode a host-capacity sweep per policy follows when the config has a ``sweep``.
The trace comes from :mod:`.trace`; ``real`` mode runs in :mod:`.real`, ``simulate`` in :mod:`.simrun`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from . import config as C
from .systems import get_systems


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
        from .simrun import run_simulate

        with progress_bar(progress, console) as bar:
            run_simulate(cfg, results, bar, jobs)
    _write(out, results)
    print_table(results, console)
    write_plots(results, out)
    return results


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
