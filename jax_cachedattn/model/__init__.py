"""The Llama-architecture model as pure functions over a params pytree, with pre-RoPE KV caching."""

from jax_cachedattn.model.config import ModelConfig, RopeScaling, configs_dir
from jax_cachedattn.model.forward import (
    TokenError,
    bucket_length,
    embed_jit,
    layer_step_jit,
    unembed_jit,
    decode_step,
    embed,
    forward,
    init_params,
    layer_slice,
    prefill,
    query_block,
    unembed,
    unstack_layers,
    validate_tokens,
)
from jax_cachedattn.model.layers import (
    TRACE_COUNTS, attention, attention_reference, layer_rope_tables, layer_step, mlp, project_qkv, rms_norm,
)
from jax_cachedattn.model.rope import apply_rope, rope_inv_freq, rope_tables
from jax_cachedattn.model.sampling import sample

__all__ = [
    "ModelConfig", "RopeScaling", "configs_dir", "bucket_length", "embed_jit", "layer_step_jit", "unembed_jit", "TokenError", "decode_step", "embed", "forward", "init_params", "layer_slice",
    "prefill", "query_block", "unembed", "unstack_layers", "validate_tokens", "TRACE_COUNTS", "attention", "attention_reference",
    "layer_rope_tables", "layer_step", "mlp", "project_qkv", "rms_norm", "apply_rope", "rope_inv_freq", "rope_tables",
    "sample",
]
