"""The engine: one conversation turn over the tiered store, with layer-wise pre-loading,
asynchronous saving and truncation under decoupled RoPE."""

from jax_cachedattn.engine.config import SOURCES, EngineConfig, TurnResult
from jax_cachedattn.engine.engine import Engine, InputError
from jax_cachedattn.engine.truncation import ContextOverflow, plan_truncation

__all__ = ["SOURCES", "EngineConfig", "TurnResult", "Engine", "InputError", "ContextOverflow", "plan_truncation"]
