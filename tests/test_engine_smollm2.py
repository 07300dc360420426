"""The engine on the real SmolLM2 weights: a chat served from disk equals recomputing it (3 turns in `make test`,
all 6 in `make test-all`), in one process and across processes (the command line)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.runtime import kv_layout, load_model
from jax_cachedattn.store import StoreConfig, TieredStore

PASSAGE = (
    "Mount Everest, known locally as Sagarmatha in Nepal and Chomolungma in Tibet, is Earth's highest mountain "
    "above sea level. It lies in the Mahalangur Himal sub-range of the Himalayas, and the China-Nepal border runs "
    "across its summit point. Its elevation of 8,848.86 metres was most recently established in 2020 by the "
    "Chinese and Nepali authorities. Mount Everest attracts many climbers, including highly experienced "
    "mountaineers. There are two main climbing routes, one approaching the summit from the southeast in Nepal "
    "and the other from the north in Tibet. While not posing substantial technical climbing challenges on the "
    "standard route, Everest presents dangers such as altitude sickness, weather, and wind, as well as hazards "
    "from avalanches and the Khumbu Icefall. As of 2024, over 300 people have died on Everest. "
)
TURNS = [
    "Read this and keep it in mind: " + PASSAGE * 2 + " What is the tallest mountain in the world?",
    "How high is it, roughly, in meters?",
    "Which country is it in?",
    "Name one other famous mountain in that region.",
    "What do climbers need to bring for such a climb?",
    "Thanks. Summarize our conversation in one sentence.",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return load_model("smollm2")


class _Recomputed:
    """The reference: every turn recomputes the whole history (no KV reuse). Turns are computed on first use and
    kept, so the 3-turn test and the slow 6-turn tests share the first three."""

    def __init__(self, smol):
        self.eng = Engine(smol.config, smol.params, TieredStore(StoreConfig(kvstore={"driver": "memory"}),
                                                                kv_layout(smol.config, smol.fingerprint)),
                          smol.tokenizer, EngineConfig(max_new_tokens=MAX_NEW, use_cache=False, return_logits=True))
        self.out = []

    def __getitem__(self, i):
        while len(self.out) <= i:
            self.out.append(self.eng.turn("ref", TURNS[len(self.out)]))
        assert [r.source for r in self.out] == ["new"] + ["recompute"] * (len(self.out) - 1)
        return self.out[i]


@pytest.fixture(scope="module")
def recomputed(smol):
    ref = _Recomputed(smol)
    yield ref
    ref.eng.close()


def _turns_from_disk_equal_recompute(smol, recomputed, tmp_path, n_turns):
    layout = kv_layout(smol.config, smol.fingerprint)
    store = TieredStore(StoreConfig(root=str(tmp_path), host_bytes=1 << 28), layout)
    eng = Engine(smol.config, smol.params, store, smol.tokenizer, EngineConfig(max_new_tokens=MAX_NEW, return_logits=True))
    worst = worst_rel = 0.0
    for i, text in enumerate(TURNS[:n_turns]):
        res = eng.turn("chat", text)
        ref = recomputed[i]
        assert res.source == ("new" if i == 0 else "disk")
        assert res.reused_tokens == res.history_tokens == ref.history_tokens
        assert res.reply_tokens == ref.reply_tokens and res.reply == ref.reply
        assert len(res.decode_logits) == len(ref.decode_logits)
        steps = [(res.prompt_logits, ref.prompt_logits), *zip(res.decode_logits, ref.decode_logits)]
        for got, want in steps:
            # Per position: the largest logit difference, absolute and relative to that position's
            # largest logit magnitude.
            diff = np.abs(np.asarray(got) - np.asarray(want)).reshape(-1, np.shape(want)[-1]).max(axis=-1)
            scale = np.abs(np.asarray(want)).reshape(-1, np.shape(want)[-1]).max(axis=-1)
            worst = max(worst, float(diff.max()))
            worst_rel = max(worst_rel, float((diff / scale).max()))
        # Force the next turn to find its history on disk only.
        eng.flush()
        eng.evict("chat", "host")  # the pool's pages and the store's host copy
    eng.close()
    print(f"\nSmolLM2 {n_turns}-turn cached-from-disk vs recompute: max |logit diff| = {worst:.2e}, "
          f"relative to the position's largest logit {worst_rel:.2e}")
    # Same tokens at every step (above). The logits differ only by fp32 reassociation: recompute
    # runs the history through matmuls and attention blocks of other shapes (a 560-token prefill
    # instead of 16-token prefills and single-token decode steps; XLA:CPU picks its dot kernel, and
    # so the order of the sums, by the number of rows), and over 30 layers that moves logits of
    # magnitude ~20-40 by ~1e-4. Hugging Face transformers on the same weights is no closer to
    # itself: its cached vs recomputed logits differ by 3.2e-5 after one 2048+100-token turn
    # (scripts/bench_peer.py). So the 1e-5 bound is held relative to each position's logit scale
    # (measured 3.6e-6); absolute differences stay under 2e-4 (measured 1.3e-4). The tiny-model tests
    # hold 1e-5 absolute; the check below that isolates the cache (disk vs never-evicted) is exact.
    assert worst_rel <= 1e-5
    assert worst <= 2e-4


def test_three_turns_from_disk_equal_recompute(smol, recomputed, tmp_path):
    """Turn 1 new, turns 2 and 3 from disk only (pool and host copies evicted after every turn) == recompute.
    The first turn's 388-token passage puts ~450 tokens of history behind turn 3 (7+ store blocks)."""
    _turns_from_disk_equal_recompute(smol, recomputed, tmp_path, 3)
    assert recomputed[2].history_tokens > 400


@pytest.mark.slow  # make test-all: three more turns; test_three_turns_from_disk_equal_recompute covers new + disk turns in make test
def test_six_turns_from_disk_equal_recompute(smol, recomputed, tmp_path):
    _turns_from_disk_equal_recompute(smol, recomputed, tmp_path, len(TURNS))
    assert recomputed[len(TURNS) - 1].history_tokens > 500


@pytest.mark.slow  # make test-all
def test_disk_round_trip_is_bit_exact_on_real_weights(smol, tmp_path):
    """The same turns with the history kept in host memory and with it evicted to disk: identical bits."""
    layout = kv_layout(smol.config, smol.fingerprint)
    logits = {}
    for mode in ("host", "disk"):
        store = TieredStore(StoreConfig(root=str(tmp_path / mode), host_bytes=1 << 28), layout)
        eng = Engine(smol.config, smol.params, store, smol.tokenizer, EngineConfig(max_new_tokens=4, return_logits=True))
        logits[mode] = []
        for text in TURNS[:3]:
            res = eng.turn("c", text)
            logits[mode].append(res.prompt_logits)
            if mode == "disk":
                eng.flush()
                store.evict("c", "host")
        eng.close()
    for a, b in zip(logits["host"], logits["disk"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~2.5 min: a SmolLM2 process per turn (make test-all); the CLI's cross-process path is also in test_byom
def test_new_process_per_turn_equals_recompute(smol, recomputed, tmp_path):
    """``cachedattn run`` in a fresh process per turn continues the conversation from the disk store."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for i, text in enumerate(TURNS):
        proc = subprocess.run(
            [sys.executable, "-m", "jax_cachedattn.cli", "run", "--store", str(tmp_path / "store"), "--session",
             "cli-chat", "--prompt", text, "--max-new-tokens", str(MAX_NEW), "--json"],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert set(out) >= {"session", "reply", "history_tokens", "prompt_tokens", "generated_tokens",
                            "truncated_tokens", "ttft_s", "source"}
        assert out["source"] == ("new" if i == 0 else "disk")
        assert out["reply"] == recomputed[i].reply
        assert out["history_tokens"] == recomputed[i].history_tokens


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--session", "../evil", "--prompt", "hi"], "invalid session id"),
        (["--session", "", "--prompt", "hi"], "invalid session id"),
        (["--session", "ok", "--prompt", "   "], "empty"),
        (["--session", "ok", "--prompt", "word " * 9000], "context window"),
    ],
)
def test_cli_bad_input_exit_2(tmp_path, args, needle, smollm2_gguf):
    store = tmp_path / "store"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jax_cachedattn.cli", "run", "--store", str(store), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    # Nothing was written for the session.
    assert not (store / "s").exists() or not any((store / "s").iterdir())


@pytest.mark.slow  # make test-all
def test_cli_chat_status_lines(tmp_path, smollm2_gguf):
    """``cachedattn chat`` answers each line and prints a status line per turn (stdin driven)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jax_cachedattn.cli", "chat", "--store", str(tmp_path / "store"), "--session", "c1",
         "--max-new-tokens", "6"],
        input="Hello there!\n\nWhat is 2+2?\n/exit\n", capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2
    status = [l for l in proc.stderr.splitlines() if l.startswith("[ttft")]
    assert len(status) == 2
    # One process: the second turn finds its history in the engine's page pool (the device tier).
    assert "history from new" in status[0] and "history from device" in status[1]
