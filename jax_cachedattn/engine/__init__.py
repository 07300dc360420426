"""The engine: many sessions' turns at once over the tiered store and a paged device pool, with
layer-wise pre-loading, asynchronous saving and truncation under decoupled RoPE."""

from jax_cachedattn.engine.config import SOURCES, EngineConfig, TurnResult
from jax_cachedattn.engine.engine import Engine, InputError
from jax_cachedattn.engine.pool import PagePool, PoolFull
from jax_cachedattn.engine.truncation import ContextOverflow, plan_truncation

__all__ = ["SOURCES", "EngineConfig", "TurnResult", "Engine", "InputError", "ContextOverflow", "plan_truncation",
           "PagePool", "PoolFull"]
