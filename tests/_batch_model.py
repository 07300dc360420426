"""The tiny random model and a byte-level ChatML tokenizer for batch-job tests (no download)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.model import ModelConfig, init_params
from jax_cachedattn.store import KVLayout, StoreConfig, TieredStore
from jax_cachedattn.tokenizer import Tokenizer, _bytes_to_unicode


@functools.cache
def byte_tokenizer() -> Tokenizer:
    """256 byte tokens (any UTF-8 text encodes) and the three ChatML control tokens: 259 ids."""
    tokens = list(_bytes_to_unicode().values()) + ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    return Tokenizer.from_gguf_fields({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": [1] * 256 + [3, 3, 3], "tokenizer.ggml.eos_token_id": 258,
        "tokenizer.chat_template": CHATML})


# ChatML as SmolLM2 ships it, with no default system block (the batch job renders what the file holds).
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.cache
def tiny_model(num_layers: int = 2):
    """Projections 10x the default init (std 0.2, embeddings ~3x): with std 0.02 the residual stream
    is the last token's embedding and greedy replies barely depend on the history, which would make
    'equal replies' a weak check.
    Drawn with numpy in init_params' layout (``jax.eval_shape`` gives it without compiling anything:
    jax.random would compile one program per shape, seconds in every test process).
    """
    cfg = ModelConfig.preset("tiny", max_context=1024, rope_theta=30000.0, num_layers=num_layers)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(7), norm_noise=0.3))
    rng = np.random.RandomState(7)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1.0 + 0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
        std = 0.02 * (10 ** 0.5 if "embed" in name else 10)
        return jnp.asarray(std * rng.standard_normal(leaf.shape), leaf.dtype)

    return cfg, jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_store(root: str | None, num_layers: int = 2, **kw) -> TieredStore:
    cfg, _ = tiny_model(num_layers)
    lay = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, "tiny-batch" if num_layers == 2 else f"tiny-batch-{num_layers}")
    sc = dict(host_bytes=1 << 24, device_bytes=0, token_block=64)
    sc.update(kw)
    if root is None:
        return TieredStore(StoreConfig(kvstore={"driver": "memory"}, **sc), lay)
    return TieredStore(StoreConfig(root=str(root), **sc), lay)


def tiny_engine(root: str | None, max_context: int | None = None, tokenizer: Tokenizer | None = None,
                num_layers: int = 2, **ec) -> Engine:
    """Prompts padded to 128 tokens: few shapes, so few compilations (seconds each on 2 cores).
    ``tokenizer``: default the byte ChatML one (any tokenizer of at most 512 ids fits the model);
    ``num_layers``: more than the default 2 gives the read-ahead counts between its default and all."""
    cfg, params = tiny_model(num_layers)
    if max_context is not None:
        cfg = cfg.replace(max_context=max_context)
    return Engine(cfg, params, tiny_store(root, num_layers), tokenizer or byte_tokenizer(),
                  EngineConfig(**{"max_new_tokens": 6, "prompt_bucket": 128, **ec}))
