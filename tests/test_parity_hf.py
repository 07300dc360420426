"""Parity of ``forward`` with Hugging Face ``LlamaForCausalLM`` on tiny random configs read by ``load_hf``.

Parameterised over MHA, GQA and MQA, tied and untied embeddings, non-default ``rope_theta``; norm weights
randomised (mean 1, std 0.5) so scaling bugs show; initializer_range 0.2 so logits are O(10), not O(0.1); 640-token inputs so RoPE bugs at large positions show.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch
import transformers

from jax_cachedattn.checkpoint import load_hf  # noqa: E402
from jax_cachedattn.model import forward  # noqa: E402

PARITY_FIGURES: list[tuple[str, float]] = []
T = 640
TOL = 1e-4
IR = 0.1


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for name, diff in PARITY_FIGURES:
        print(f"\n[parity hf] {name}: max |logit diff| = {diff:.3e}")


CASES = {
    "mha-untied-theta1e4": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "gqa-tied-theta5e5": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0),
    "gqa-untied-theta1e5": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=100000.0),
    "mqa-tied-theta1e5": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0),
}


def _save_tiny_llama(folder, seed: int, **kw):
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, initializer_range=IR, head_dim=64 // kw["num_attention_heads"], **kw)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, mean=1.0, std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_llama_parity(tmp_path, case):
    kw = CASES[case]
    model = _save_tiny_llama(tmp_path, seed=sorted(CASES).index(case), **kw)
    cfg, params = load_hf(tmp_path)
    assert cfg.tie_embeddings == kw["tie_word_embeddings"] and ("lm_head" in params) != cfg.tie_embeddings
    assert cfg.rope_theta == kw["rope_theta"] and cfg.num_kv_heads == kw["num_key_value_heads"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=T).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].numpy()
    ours = np.asarray(forward(params, cfg, tokens))
    assert ours.shape == ref.shape == (T, cfg.vocab_size)
    diff = float(np.max(np.abs(ours - ref)))
    PARITY_FIGURES.append((case, diff))
    print(f"[parity hf] {case}: max |logit diff| = {diff:.3e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= TOL, f"{case}: max |logit diff| {diff:.3e} > {TOL}"


# ---- every supported family: Llama 3.1-style llama3 scaling, linear scaling, Qwen2 (biases), Mistral ----

from byom_fixtures import ATTN, FAMILIES, save_tiny_model  # noqa: E402

FAMILY_T = 640  # > original_max_position (128) of the llama3 case: positions past the original context


def _family_case(tmp_path, family, attn):
    model = save_tiny_model(tmp_path, family, attn, seed=FAMILIES.index(family) * 3 + list(ATTN).index(attn))
    cfg, params = load_hf(tmp_path)
    assert cfg.num_kv_heads == ATTN[attn][1]
    assert cfg.attn_bias == (family == "qwen2") and ("bq" in params["layers"]) == cfg.attn_bias
    assert (cfg.rope_scaling is not None) == family.startswith("llama")
    T = FAMILY_T if family == "llama3" else 320
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=T).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].numpy()
    return cfg, params, tokens, ref


@pytest.mark.parametrize("attn", list(ATTN))
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(tmp_path, family, attn):
    cfg, params, tokens, ref = _family_case(tmp_path, family, attn)
    ours = np.asarray(forward(params, cfg, tokens))
    diff = float(np.max(np.abs(ours - ref)))
    PARITY_FIGURES.append((f"{family}-{attn}", diff))
    assert diff <= TOL, f"{family}-{attn}: max |logit diff| {diff:.3e} > {TOL}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_cached_equals_uncached(tmp_path, family):
    """A history prefilled once, the rest prefilled against its pre-RoPE KV, then one decode step: equal
    to transformers' full forward (the history reaches past the llama3 case's original context)."""
    import jax.numpy as jnp

    from jax_cachedattn.model import decode_step, prefill

    cfg, params, tokens, ref = _family_case(tmp_path, family, "gqa")
    T, L, K, Dh = len(tokens), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    H = T - 100
    _, kv = prefill(params, cfg, jnp.asarray(tokens[:H]), jnp.zeros((L, 2, 0, K, Dh)), jnp.int32(0))
    cache = jnp.zeros((L, 2, T + 16, K, Dh)).at[:, :, :H].set(kv)
    got, new_kv = prefill(params, cfg, jnp.asarray(tokens[H:-1]), cache, jnp.int32(H))
    assert float(np.abs(np.asarray(got) - ref[H:-1]).max()) <= TOL
    cache = cache.at[:, :, H:T - 1].set(new_kv)
    last, _ = decode_step(params, cfg, jnp.int32(tokens[-1]), cache, jnp.int32(T - 1))
    assert float(np.abs(np.asarray(last) - ref[-1]).max()) <= TOL
