"""Real weights: our SmolLM2 (from the Q4_1 GGUF) vs transformers loading the same GGUF, float32.

Both dequantize the same Q4_1 blocks to float32 (bit-identical weights, checked below), so the only
differences are float32 summation order; measured ~1e-4 on 30 layers and logits of magnitude ~20-30.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch
import transformers

from jax_cachedattn.checkpoint import load_gguf  # noqa: E402
from jax_cachedattn.model import forward  # noqa: E402

TOL = 2e-3  # ~10x the measured float32 reordering noise, far below any real bug (those show as >1e-1)
N_GREEDY = 32  # make test-all; make test checks the first 16 (each step is a full ~400-token forward of our model)

PROMPT = [
    {"role": "user", "content": "I am planning a three-day trip to Kyoto in autumn. " * 3
     + "Which temples should I visit, how do I get around, and what food should I try? Please be specific."},
    {"role": "assistant", "content": "Kyoto in autumn is beautiful. Visit Kiyomizu-dera, Fushimi Inari, Kinkaku-ji, "
     "Tofuku-ji for the maples, and Arashiyama's bamboo grove. Use the city buses and the subway; a one-day pass "
     "saves money. Try yudofu (simmered tofu), kaiseki, matcha sweets in Uji and street food at Nishiki Market. " * 2},
    {"role": "user", "content": "Thanks! Now write a short Python function that computes the Fibonacci numbers "
     "up to n iteratively, with a docstring, and explain its complexity in one sentence."},
]


@pytest.fixture(scope="module")
def both(smollm2_gguf):
    torch.set_num_threads(2)
    cfg, params, tok = load_gguf(smollm2_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    return cfg, params, tok, hf


def test_weights_identical_to_transformers(both):
    cfg, params, _, hf = both
    sd = hf.state_dict()
    np.testing.assert_array_equal(np.asarray(params["embed"]), sd["model.embed_tokens.weight"].numpy())
    for i in (0, cfg.num_layers - 1):
        np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][i]),
                                      sd[f"model.layers.{i}.self_attn.q_proj.weight"].numpy().T)
        np.testing.assert_array_equal(np.asarray(params["layers"]["wk"][i]),
                                      sd[f"model.layers.{i}.self_attn.k_proj.weight"].numpy().T)
        np.testing.assert_array_equal(np.asarray(params["layers"]["w_down"][i]),
                                      sd[f"model.layers.{i}.mlp.down_proj.weight"].numpy().T)
    hf_theta = hf.config.rope_parameters["rope_theta"] if hasattr(hf.config, "rope_parameters") else hf.config.rope_theta
    assert cfg.rope_theta == hf_theta


@pytest.mark.parametrize("n_greedy", [16, pytest.param(N_GREEDY, marks=pytest.mark.slow)])
def test_logits_and_greedy_match_transformers(both, n_greedy):
    cfg, params, tok, hf = both
    ids = tok.chat(PROMPT)
    assert len(ids) >= 300, len(ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(forward(params, cfg, np.asarray(ids, np.int32)))
    diff = float(np.max(np.abs(ours - ref)))
    print(f"\n[parity smollm2] {len(ids)} tokens: max |logit diff| = {diff:.3e} (logit scale {np.abs(ref).max():.1f})")
    assert diff <= TOL

    # n_greedy-token greedy continuation by full recompute (our reference path), padded to one fixed length so it
    # compiles once (causal: tokens after the last real one cannot change its logits). Then one transformers
    # forward over prompt + continuation: its argmax at every position must be the token we chose, which is
    # exactly "transformers' uncached greedy loop yields the same n_greedy tokens", at 1/n_greedy of the cost.
    # (transformers' generate() with its KV cache departs from its own full forward on this prompt at step 11,
    # where the top-2 gap is 0.14, so the uncached forward is the reference here.)
    seq = list(ids)
    padded = np.zeros(len(ids) + n_greedy, np.int32)
    for _ in range(n_greedy):
        padded[: len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(forward(params, cfg, padded))[len(seq) - 1])))
    with torch.no_grad():
        hf_next = hf(torch.tensor([seq])).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
    print(f"[parity smollm2] greedy: {tok.decode(seq[len(ids):])!r}")
    assert seq[len(ids):] == hf_next
