"""A SmolLM2 chat in one process on a 14 MB tmpfs (issue 11's target): the turn that hits the full disk
fails with one line, every turn after space comes back succeeds, and the stored history answers
exactly like its recompute (same tokens; logits within fp32 reassociation, as in test_engine_smollm2).

SmolLM2-135M keeps 46,080 bytes of fp32 KV per token (30 layers x K and V x 3 heads x 64), so with
64-token blocks one block of a session is 2.95 MB on disk and the tmpfs holds 4 of them. Another
conversation takes 3; the chat fills the fourth, and its next block does not fit: ENOSPC from the real
filesystem. Deleting the other conversation frees the space; the failed message is sent again.
"""

import os
import sys

import numpy as np
import pytest

from jax_cachedattn.engine import Engine, EngineConfig
from jax_cachedattn.runtime import kv_layout, load_model
from jax_cachedattn.store import DiskFull, StoreConfig, TieredStore

sys.path.insert(0, os.path.dirname(__file__))
from _util import tmpfs  # noqa: E402

OTHER = ("Read this: Mount Everest, known locally as Sagarmatha in Nepal and Chomolungma in Tibet, is Earth's "
         "highest mountain above sea level. It lies in the Mahalangur Himal sub-range of the Himalayas, and the "
         "China-Nepal border runs across its summit point. Its elevation of 8,848.86 metres was most recently "
         "established in 2020 by the Chinese and Nepali authorities. Where is it?")
TURNS = [
    "Hello! My boat is called Harbour. Please remember that.",
    "What is the capital of France?",
    "And of Italy?",
    "What is my boat called?",
    "Say goodbye in one word.",
]
MAX_NEW = 8
TOKEN_BLOCK = 64


@pytest.fixture
def fs14(tmp_path):
    yield from tmpfs(tmp_path, "14m")


def close_logits(got, want):
    """Largest logit difference relative to each position's largest logit magnitude."""
    got, want = np.asarray(got), np.asarray(want)
    diff = np.abs(got - want).reshape(-1, want.shape[-1]).max(axis=-1)
    scale = np.abs(want).reshape(-1, want.shape[-1]).max(axis=-1)
    return float((diff / scale).max())


@pytest.mark.slow  # several minutes of SmolLM2 on the CPU (make test-all)
def test_smollm2_chat_on_a_full_14mb_tmpfs(smollm2_gguf, fs14):
    smol = load_model("smollm2")
    layout = kv_layout(smol.config, smol.fingerprint)
    # disk chunks of one block: the arithmetic above counts whole blocks on the tmpfs
    cfg = StoreConfig(root=str(fs14 / "st"), token_block=TOKEN_BLOCK, disk_chunk=TOKEN_BLOCK, disk_chunk_layers=1,
                      host_bytes=1 << 28)
    ec = EngineConfig(max_new_tokens=MAX_NEW, return_logits=True)
    eng = Engine(smol.config, smol.params, TieredStore(cfg, layout), smol.tokenizer, ec)
    other = eng.turn("other", OTHER)
    other.commit.result()
    assert eng.store.lookup("other").num_tokens > 2 * TOKEN_BLOCK  # 3 of the 4 blocks the tmpfs holds
    kept, results, failed = [], [], []
    for text in TURNS:
        res = eng.turn("harbour", text)
        try:
            res.commit.result()
        except DiskFull as e:
            assert not failed, "a turn failed after space came back"
            msg, turn = str(e), eng.store.lookup("harbour").turn
            assert "\n" not in msg and str(fs14) not in msg and "RESOURCE_EXHAUSTED" not in msg, msg
            assert msg == (f"disk full: turn {turn + 1} of session 'harbour' was not saved; the session stays at "
                           f"turn {turn} (free space and send it again)")
            failed.append(text)
            with pytest.raises(DiskFull):
                eng.flush()  # reported once more, then cleared
            eng.evict("other", "disk")  # space comes back: the other conversation is deleted
            res = eng.turn("harbour", text)  # the same message sent again
            res.commit.result()
        kept.append(text)
        results.append(res)
        eng.flush()
        eng.evict("harbour", "host")  # the next turn reads its history from the tmpfs
    assert len(failed) == 1, "the chat never hit the full disk: the test tests nothing"
    assert results[-1].source == "disk" and eng.store.lookup("harbour").turn == len(TURNS)
    history = eng.store.lookup("harbour").token_ids
    eng.close()
    eng = Engine(smol.config, smol.params, TieredStore(cfg, layout), smol.tokenizer, ec)  # reopened
    np.testing.assert_array_equal(eng.store.lookup("harbour").token_ids, history)
    last = eng.turn("harbour", "Thanks. What did we talk about?")
    last.commit.result()
    eng.close()

    ref = Engine(smol.config, smol.params, TieredStore(StoreConfig(kvstore={"driver": "memory"}), layout),
                 smol.tokenizer, EngineConfig(max_new_tokens=MAX_NEW, use_cache=False, return_logits=True))
    refs = [ref.turn("harbour", text) for text in kept + ["Thanks. What did we talk about?"]]
    ref.close()
    worst = 0.0
    for got, want in zip(results + [last], refs):
        assert got.history_tokens == want.history_tokens
        assert got.reply_tokens == want.reply_tokens, (got.reply, want.reply)
        worst = max(worst, close_logits(got.prompt_logits, want.prompt_logits),
                    *(close_logits(a, b) for a, b in zip(got.decode_logits, want.decode_logits)))
    assert worst <= 1e-5, worst
