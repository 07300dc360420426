"""A small Llama-family model trained here with optax on local text, so the truncation experiment
(and its test) runs on a model whose positional behaviour was learned on this machine.

Bytes are the tokens (vocabulary 256: no tokenizer file needed, any text encodes). The model is
the project's own ``model`` package (``init_params`` and ``layer_step``), trained on windows of
``pydoc_text("train")`` with AdamW and a warm-up + cosine schedule; everything is seeded, so the
same seed and step count give the same weights on the same machine.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_cachedattn.model import ModelConfig, embed, init_params, layer_rope_tables, layer_step, query_block, unembed


def encode_bytes(text: str) -> np.ndarray:
    """UTF-8 bytes as int32 token ids (0..255)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode_bytes(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_config(max_context: int = 4096) -> ModelConfig:
    """2 layers, d_model 96, 4 query heads over 2 KV heads (GQA), head dim 24: ~0.2M params, ~0.9 MB.

    ``max_context`` is the window the model may be asked to run (it was trained on ``seq_len``)."""
    return ModelConfig(vocab_size=256, d_model=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
                       ffn_dim=256, rope_theta=10000.0, tie_embeddings=True, max_context=max_context,
                       name="tiny-bytes")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps. batch: sequences per step. seq_len: tokens per sequence (the
    positions the model learns). lr: peak AdamW learning rate (linear warm-up over ``warmup`` steps,
    cosine decay to 10 % after). seed: weights init and batch order."""

    steps: int = 300
    batch: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("steps", "batch", "seq_len"):
            if getattr(self, f) < 1:
                raise ValueError(f"TrainConfig.{f} must be >= 1")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError("TrainConfig.warmup must be in [0, steps]")


def _logits(params, config: ModelConfig, tokens):
    """Full causal forward of one sequence ``[T]`` through the project's ``layer_step`` (differentiable)."""
    T = tokens.shape[0]
    empty = jnp.zeros((0, config.num_kv_heads, config.head_dim), config.jnp_dtype)
    positions = jnp.arange(T, dtype=jnp.int32)
    rope = layer_rope_tables(config, 0, positions)

    def body(x, lp):
        x, _, _ = layer_step(lp, x, empty, empty, jnp.int32(0), positions, config, query_block(T), rope=rope)
        return x, None

    x, _ = jax.lax.scan(body, embed(params, tokens), params["layers"])
    return unembed(params, config, x)


def loss_fn(params, config: ModelConfig, batch):
    """Mean next-token cross entropy over ``batch [B, T+1]``."""
    logits = jax.vmap(lambda t: _logits(params, config, t[:-1]))(batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and a warm-up + cosine schedule."""
    return _optimizer(tc.lr, tc.warmup, tc.steps, tc.weight_decay)


@functools.cache
def _optimizer(lr: float, warmup: int, steps: int, weight_decay: float) -> optax.GradientTransformation:
    # one object per schedule (not per seed), so the jitted step compiles once for runs that differ by seed
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=weight_decay))


@functools.partial(jax.jit, static_argnames=("config", "opt"), donate_argnums=(0, 1))
def _train_step(params, state, batch, config: ModelConfig, opt: optax.GradientTransformation):
    loss, grads = jax.value_and_grad(loss_fn)(params, config, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


def train(text_ids: np.ndarray, tc: TrainConfig, config: ModelConfig | None = None,
          on_step: Callable[[int, float], None] | None = None) -> tuple[ModelConfig, Any, list[float]]:
    """Train from scratch on random windows of ``text_ids``; returns ``(config, params, losses)``."""
    config = config or tiny_config()
    ids = np.asarray(text_ids, np.int32)
    if len(ids) <= tc.seq_len + 1:
        raise ValueError(f"{len(ids)} training tokens: need more than seq_len + 1 = {tc.seq_len + 1}")
    params = init_params(config, jax.random.key(tc.seed))
    opt = make_optimizer(tc)
    state = opt.init(params)
    rng = np.random.default_rng(tc.seed)
    offsets = np.arange(tc.seq_len + 1)
    losses = []
    for i in range(tc.steps):
        starts = rng.integers(0, len(ids) - tc.seq_len - 1, size=tc.batch)
        params, state, loss = _train_step(params, state, jnp.asarray(ids[starts[:, None] + offsets]), config, opt)
        losses.append(float(loss))
        if on_step is not None:
            on_step(i, losses[-1])
    return config, params, losses


def eval_loss(params, config: ModelConfig, text_ids: np.ndarray, seq_len: int, n: int = 8, seed: int = 1) -> float:
    """Mean next-token loss on ``n`` seeded windows of ``text_ids`` (nats per byte)."""
    ids = np.asarray(text_ids, np.int32)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len - 1, size=n)
    batch = jnp.asarray(ids[starts[:, None] + np.arange(seq_len + 1)])
    return float(jax.jit(loss_fn, static_argnums=1)(params, config, batch))
