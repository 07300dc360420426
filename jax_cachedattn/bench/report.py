"""The printed table and the progress bar of ``cachedattn bench`` (rich)."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@contextlib.contextmanager
def progress_bar(enabled: bool = True, console: Console | None = None):
    """A rich progress bar (one task per system); a silent stand-in when disabled."""
    if not enabled:
        yield _Quiet()
        return
    with Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console or Console(stderr=True), transient=False) as bar:
        yield bar


class _Quiet:
    def add_task(self, *a, **k) -> int:
        return 0

    def advance(self, *a, **k) -> None:
        pass


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(results: dict) -> Table:
    systems = results["systems"]
    base = systems.get("recompute")
    t = Table(title=f"cachedattn bench ({results['config']['mode']}, {results['config']['workload'].get('kind')}:"
                    f"{results['config']['workload'].get('preset') if results['config']['workload'].get('kind') == 'synthetic' else results['config']['workload'].get('path')}"
                    f", {next(iter(systems.values()))['jobs'] if systems else 0} measured jobs)")
    for col in ("system", "TTFT mean s", "p50", "p99", "vs recompute", "turns 2+", "TPOT ms", "prefill tok/s", "hit rate",
                "dev/host/disk", "upper bound", "queue s"):
        t.add_column(col, justify="left" if col == "system" else "right")
    for name, r in systems.items():
        bt = r["hit_rate_by_tier"]
        t.add_row(name, f"{r['ttft_mean_s']:.3f}", f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p99_s']:.3f}",
                  _ratio(r["ttft_mean_s"], base["ttft_mean_s"]) if base else "-",
                  _ratio(r.get("ttft_mean_s_with_history", 0.0), base.get("ttft_mean_s_with_history", 0.0)) if base else "-",
                  f"{r['tpot_s'] * 1e3:.1f}",
                  f"{r['prefill_tokens_per_s']:.0f}", f"{r['token_hit_rate']:.3f}",
                  f"{bt['device']:.2f}/{bt['host']:.2f}/{bt['disk']:.2f}", f"{r['reuse_upper_bound']:.3f}",
                  f"{r['queue_wait_mean_s']:.2f}")
    return t


def sweep_table(results: dict) -> Table | None:
    sw = results.get("sweep")
    if not sw:
        return None
    t = Table(title=f"token hit rate (memory hit rate) against host capacity ({sw['unit']})")
    t.add_column("policy")
    for c in sw["host_capacity"]:
        t.add_column(f"{c:g}", justify="right")
    for name, rows in sw["policies"].items():
        t.add_row(name, *[f"{r['token_hit_rate']:.3f} ({r['memory_hit_rate']:.3f})" for r in rows])
    ub = next(iter(sw["policies"].values()))
    t.add_row("reuse upper bound", *[f"{r['reuse_upper_bound']:.3f}" for r in ub])
    return t


def print_table(results: dict, console: Console | None = None) -> None:
    console = console or Console(width=170)
    console.print(table(results))
    st = sweep_table(results)
    if st is not None:
        console.print(st)
    for name, why in results.get("skipped", {}).items():
        console.print(f"[dim]skipped {name}: {why}[/dim]")
