"""Runs a batch job on the tiny model in a process of its own (killed at random by test_batch_job).

usage: _batch_driver.py STORE INPUT OUTPUT EVENTS XLA_CACHE [history] [reply_all 0|1] [temperature] [warmup 0|1]
Appends one line per job event to EVENTS: ``<pid> compute|written|recovered <conversation> <turn>``.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _batch_model import tiny_engine  # noqa: E402

from jax_cachedattn.batch import BatchOptions, run_batch_job  # noqa: E402
from jax_cachedattn.runtime import XLA_CACHE_MAX_BYTES  # noqa: E402


def main() -> None:
    store, inp, out, events, xla = sys.argv[1:6]
    history = sys.argv[6] if len(sys.argv) > 6 else "generated"
    reply_all = len(sys.argv) > 7 and sys.argv[7] == "1"
    temperature = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
    warmup = not (len(sys.argv) > 9 and sys.argv[9] == "0")
    jax.config.update("jax_compilation_cache_dir", xla)
    # A size limit turns on the cache's LRU, which keeps an access-time file beside each entry; entries
    # written without one make every later write to the folder fail with a warning.
    jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log = open(events, "a", buffering=1)
    pid = os.getpid()

    def on_event(e: dict) -> None:
        if "conversation" in e:   # turn events (the job's "warmed" event is not one)
            log.write(f"{pid} {e['event']} {e['conversation']} {e['turn']}\n")

    engine = tiny_engine(store, temperature=temperature)
    try:
        summary = run_batch_job(engine, inp, out, BatchOptions(history=history, reply_all=reply_all, max_new_tokens=6,
                                                                   warmup=warmup),
                      progress=False, on_event=on_event, report=lambda line: None)
    finally:
        engine.close()
    log.write(f"{pid} finished - -\n")
    sys.exit(3 if summary.skipped else 0)   # a skipped conversation (e.g. store and output disagree) fails the test


if __name__ == "__main__":
    main()
