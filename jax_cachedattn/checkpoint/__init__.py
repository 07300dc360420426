"""Loading weights: GGUF (llama.cpp) and Hugging Face folders in, orbax checkpoints for fast restarts."""

from jax_cachedattn.checkpoint.gguf import GGUFError, load_gguf
from jax_cachedattn.checkpoint.hf import HFCheckpointError, load_hf

__all__ = ["GGUFError", "HFCheckpointError", "load_gguf", "load_hf"]
