"""The tiny random model (fp32, 1,024-token context) and random prompts the engine tests share."""

from __future__ import annotations

import jax
import numpy as np

from jax_cachedattn.model import ModelConfig, init_params


def tiny_model(seed: int):
    cfg = ModelConfig.preset("tiny", max_context=1024, rope_theta=30000.0)
    return cfg, init_params(cfg, jax.random.key(seed), norm_noise=0.3)


def random_ids(cfg, n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, cfg.vocab_size, n).astype(np.int32)
