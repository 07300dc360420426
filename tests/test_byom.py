"""Bring your own model: load_model and --model with every kind of spec (Hugging Face folder, GGUF,
import-hf checkpoint, smollm2), bad specs exit 2 with one line, and a multi-turn conversation of each
family through the store equal to a recompute."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from byom_fixtures import CHATML_TEMPLATE, FAMILIES, byom_folder, save_tiny_model
from jax_cachedattn import cli
from jax_cachedattn.runtime import ModelSpecError, load_model, model_kind


@pytest.fixture(autouse=True)
def _no_xla_cache(monkeypatch):
    monkeypatch.setenv("CACHEDATTN_NO_XLA_CACHE", "1")


@pytest.fixture(scope="module")
def hf_qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-chatml")
    byom_folder(folder, "qwen2", "chatml", seed=11)
    return folder


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _turn(capsys, model, store, prompt, session="s1"):
    rc, out, err = _run(capsys, "run", "--model", str(model), "--store", str(store), "--session", session,
                        "--prompt", prompt, "--max-new-tokens", "4", "--json")
    assert rc == 0, err
    return json.loads(out)


def test_spec_kinds(tmp_path, hf_qwen):
    assert model_kind("smollm2") == "smollm2" and model_kind(str(hf_qwen)) == "hf"
    p = cli.build_parser()
    for cmd in (["run", "--session", "a", "--prompt", "x"], ["chat", "--session", "a"]):
        assert p.parse_args(cmd + ["--store", "s"]).model == "smollm2"  # the default
        assert p.parse_args(cmd + ["--store", "s", "--model", str(hf_qwen)]).model == str(hf_qwen)
    assert p.parse_args(["demo"]).model == "smollm2"


def test_hf_folder_then_imported_checkpoint_continue_one_conversation(tmp_path, capsys, hf_qwen):
    store = tmp_path / "store"
    r1 = _turn(capsys, hf_qwen, store, "What is the capital of France?")
    assert r1["source"] == "new" and r1["prompt_tokens"] > 10 and r1["generated_tokens"] >= 1
    shutil.copytree(store, tmp_path / "store2")
    rc, out, err = _run(capsys, "import-hf", "--hf", str(hf_qwen), "--out", str(tmp_path / "ckpt"))
    assert rc == 0, err
    meta = json.loads(out)
    assert sorted(p.name for p in (tmp_path / "ckpt" / "tokenizer").iterdir()) == [
        "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    a, b = load_model(str(hf_qwen)), load_model(str(tmp_path / "ckpt"))
    assert a.fingerprint == b.fingerprint == meta["fingerprint"] and a.config.replace(name="x") == b.config.replace(name="x")
    assert a.tokenizer.chat_template == b.tokenizer.chat_template == CHATML_TEMPLATE
    # The imported checkpoint names the same model: its turn reuses the KV the folder's turn stored.
    r2 = _turn(capsys, tmp_path / "ckpt", store, "Tell me a joke about cats.")
    assert r2["history_tokens"] > r1["prompt_tokens"] and r2["source"] in ("disk", "host")
    # Same greedy reply as the Hugging Face folder recomputing the same turn from scratch.
    r3 = _run(capsys, "run", "--model", str(hf_qwen), "--store", str(tmp_path / "store2"), "--session", "s1",
              "--prompt", "Tell me a joke about cats.", "--max-new-tokens", "4", "--json", "--no-cache")
    r3 = json.loads(r3[1])
    assert r3["source"] == "recompute" and r3["history_tokens"] == r2["history_tokens"] and r3["reply"] == r2["reply"]


def test_gguf_spec_runs_with_its_chat_template(tmp_path, capsys):
    from test_checkpoint import _write_gguf

    model = save_tiny_model(tmp_path / "hf", "qwen2", "mqa", vocab_size=320, seed=2)
    _write_gguf(tmp_path / "m.gguf", model, arch="qwen2", chat_template=CHATML_TEMPLATE)
    assert model_kind(str(tmp_path / "m.gguf")) == "gguf"
    m = load_model(str(tmp_path / "m.gguf"))
    assert m.config.attn_bias and m.tokenizer.chat_template == CHATML_TEMPLATE
    r = _turn(capsys, tmp_path / "m.gguf", tmp_path / "store", "ab ab")
    assert r["source"] == "new" and r["prompt_tokens"] > 5


def test_chat_takes_model(tmp_path, capsys, monkeypatch, hf_qwen):
    lines = iter(["What is the capital of France?", "Tell me a joke.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    rc, out, err = _run(capsys, "chat", "--model", str(hf_qwen), "--store", str(tmp_path / "c"), "--session", "c",
                        "--max-new-tokens", "3")
    assert rc == 0 and out.count("assistant> ") == 2, err
    assert "history from host" in err.splitlines()[-1] or "history from device" in err.splitlines()[-1]


@pytest.mark.slow
def test_demo_takes_model(tmp_path, capsys, hf_qwen):
    rc, out, err = _run(capsys, "demo", "--model", str(hf_qwen), "--store", str(tmp_path / "d"),
                        "--max-new-tokens", "3", "--json")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert [r["source"] for r in res["recompute"]][1:] == ["recompute", "recompute"]
    assert all(r["source"] in ("host", "device", "disk") for r in res["cachedattn"][1:])


def _corrupt_safetensors(folder):
    f = next(folder.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:200])


def _edit_config(**change):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(change)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


BAD = {
    "missing": (None, "no such file or folder"),
    "empty-folder": (lambda f: [p.unlink() for p in f.iterdir()], "neither config.json"),
    "unsupported-family": (_edit_config(model_type="gemma"), "unsupported model_type 'gemma'"),
    "sliding-window": (_edit_config(model_type="mistral", sliding_window=64), "sliding-window"),
    "unknown-scaling": (_edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
    "corrupt-safetensors": (_corrupt_safetensors, "corrupt or truncated"),
    "no-tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
    "not-gguf": ("file", "not a GGUF file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_exits_2_with_one_line(tmp_path, capsys, hf_qwen, case):
    edit, match = BAD[case]
    spec = tmp_path / "model"
    if edit == "file":
        spec.write_bytes(b"not a model")
    elif edit is not None:
        shutil.copytree(hf_qwen, spec)
        edit(spec)
    with pytest.raises(ModelSpecError, match=match):
        load_model(str(spec))
    for cmd in (["run", "--session", "a", "--prompt", "hi"], ["chat", "--session", "a"], ["demo"]):
        rc, out, err = _run(capsys, *cmd, "--model", str(spec), "--store", str(tmp_path / "s"))
        assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, (cmd, err)
        assert err.startswith("cachedattn: error: --model") and match in err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())  # nothing written


def test_import_hf_bad_input_exits_2(tmp_path, capsys, hf_qwen):
    rc, out, err = _run(capsys, "import-hf", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no such file" in err
    spec = tmp_path / "m"
    shutil.copytree(hf_qwen, spec)
    _corrupt_safetensors(spec)
    rc, out, err = _run(capsys, "import-hf", "--hf", str(spec), "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "corrupt or truncated" in err
    assert not (tmp_path / "o").exists()


# ---- a conversation of each family through the store equals a recompute --------------------------

@pytest.mark.parametrize("family", [f if f in ("llama3", "qwen2") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in FAMILIES])  # scaling and biases fast; the plain paths in test-all
def test_multi_turn_from_store_equals_recompute(tmp_path, family):
    from jax_cachedattn.engine import EngineConfig
    from jax_cachedattn.model import forward
    from jax_cachedattn.runtime import open_engine

    save_tiny_model(tmp_path / "hf", family, "gqa", vocab_size=320, seed=4, max_pos=1024, original_ctx=64)
    from jax_cachedattn.checkpoint import load_hf, params_fingerprint
    from jax_cachedattn.runtime import LoadedModel

    cfg, params = load_hf(tmp_path / "hf")
    m = LoadedModel(cfg, params, None, params_fingerprint(cfg, params), str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    conversation: list[np.ndarray] = []
    for t in range(3):
        eng = open_engine(tmp_path / "store", model=m, compilation_cache=False,
                          engine_config=EngineConfig(max_new_tokens=5, return_logits=True))
        msg = rng.integers(0, cfg.vocab_size, 60 if t else 90).astype(np.int32)
        res = eng.turn("c", msg)
        eng.flush()
        eng.close()
        assert res.source == ("new" if t == 0 else "disk")
        full = np.concatenate(conversation + [msg])
        gen = np.asarray(res.reply_tokens, np.int32)
        ref = np.asarray(forward(params, cfg, np.concatenate([full, gen])))
        assert float(np.abs(res.prompt_logits - ref[len(full) - len(msg):len(full)]).max()) <= 1e-4
        for i, lg in enumerate(res.decode_logits):
            assert float(np.abs(lg - ref[len(full) - 1 + i]).max()) <= 1e-4
        conversation += [msg, gen]
    assert len(np.concatenate(conversation)) > 64  # the llama3 case runs past its original context


def test_open_engine_turns_on_the_persistent_compilation_cache(tmp_path):
    """In a fresh process (the setting is process-wide): off with compilation_cache=False or
    $CACHEDATTN_NO_XLA_CACHE; then on by default under the cache folder, even after an earlier compile,
    and written to by the next compile; a folder the application set is kept."""
    import os
    import subprocess
    import sys

    script = r'''
import json, os, sys, jax, jax.numpy as jnp
from jax_cachedattn.model import ModelConfig, init_params
from jax_cachedattn.runtime import LoadedModel, open_engine
cfg = ModelConfig.preset("tiny")
m = LoadedModel(cfg, init_params(cfg, jax.random.key(0)), None, "fp")
jax.jit(lambda x: x * 2)(jnp.arange(3))  # a compile before any engine opens
seen = []
open_engine(None, model=m, compilation_cache=False).close(); seen.append(jax.config.jax_compilation_cache_dir)
os.environ["CACHEDATTN_NO_XLA_CACHE"] = "1"
open_engine(None, model=m).close(); seen.append(jax.config.jax_compilation_cache_dir)
del os.environ["CACHEDATTN_NO_XLA_CACHE"]
open_engine(None, model=m).close(); seen.append(jax.config.jax_compilation_cache_dir)
jax.jit(lambda x: x + 41)(jnp.arange(5)).block_until_ready()
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
open_engine(None, model=m).close(); seen.append(jax.config.jax_compilation_cache_dir)
seen.append(jax.config.jax_compilation_cache_max_size)
print(json.dumps(seen))
'''
    env = {**os.environ, "CACHEDATTN_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    env.pop("CACHEDATTN_NO_XLA_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "mine")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == [None, None, str(tmp_path / "cache" / "xla"), str(tmp_path / "mine"), 4 << 30]
    assert any((tmp_path / "cache" / "xla").glob("*-cache"))  # the compile after open_engine was persisted
    assert (tmp_path / "cache" / "xla" / ".lockfile").exists()  # ... under the lock other processes take
