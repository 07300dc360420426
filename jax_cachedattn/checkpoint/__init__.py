"""Loading weights: GGUF (llama.cpp) and Hugging Face folders in, orbax checkpoints (with the tokenizer) for fast restarts."""

from jax_cachedattn.checkpoint.gguf import GGUFError, load_gguf
from jax_cachedattn.checkpoint.hf import HFCheckpointError, load_hf
from jax_cachedattn.checkpoint.imported import import_hf, is_imported, load_imported
from jax_cachedattn.checkpoint.orbax_io import (
    load_config,
    load_smollm2,
    params_fingerprint,
    restore_params,
    save_params,
    smollm2_fingerprint,
)

__all__ = [
    "GGUFError", "HFCheckpointError", "import_hf", "is_imported", "load_imported", "load_config", "load_gguf", "load_hf", "load_smollm2", "params_fingerprint",
    "restore_params", "save_params", "smollm2_fingerprint",
]
