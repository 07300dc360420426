"""The checkpoint ``cachedattn import-hf`` writes: orbax params with the model's tokenizer beside them.

Layout of ``OUT/``::

    params/              orbax StandardCheckpointer checkpoint of the params pytree
    params.config.json   the ModelConfig (as ``save_params`` writes it)
    tokenizer/           the Hugging Face tokenizer files, copied as they were (tokenizer.json,
                         tokenizer_config.json with its chat template, generation_config.json, ...)
    meta.json            {"config", "fingerprint", "source"}; written last, so its presence marks a
                         complete checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from jax_cachedattn.checkpoint.hf import HFCheckpointError, load_hf
from jax_cachedattn.checkpoint.orbax_io import params_fingerprint, restore_params, save_params
from jax_cachedattn.model.config import ModelConfig
from jax_cachedattn.tokenizer import HF_TOKENIZER_FILES, Tokenizer


def is_imported(path: Any) -> bool:
    """Whether ``path`` is a complete checkpoint written by :func:`import_hf`."""
    p = Path(path)
    return (p / "meta.json").is_file() and (p / "params").is_dir()


def import_hf(hf_folder: Any, out: Any, dtype: str | None = None) -> dict[str, Any]:
    """Convert a Hugging Face folder to ``out`` (replaced if it exists); returns the meta dict.

    The tokenizer is loaded first, so a folder whose tokenizer files are missing or broken fails
    before any conversion work.
    """
    src = Path(hf_folder)
    Tokenizer.from_hf_folder(src)  # validate: a checkpoint that cannot chat is no use to the commands
    config, params = load_hf(src, dtype=dtype)
    dst = Path(out).absolute()
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        save_params(tmp / "params", params, config)
        (tmp / "tokenizer").mkdir()
        for name in HF_TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / "tokenizer" / name)
        meta = {"config": config.to_dict(), "fingerprint": params_fingerprint(config, params), "source": str(src.absolute())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks the checkpoint complete
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(dst), **meta}


def load_imported(path: Any) -> tuple[ModelConfig, Any, Tokenizer, str]:
    """``(config, params, tokenizer, fingerprint)`` of a checkpoint written by :func:`import_hf`."""
    p = Path(path)
    if not is_imported(p):
        raise HFCheckpointError(f"{p} is not a checkpoint written by import-hf (no meta.json and params/)")
    try:
        meta = json.loads((p / "meta.json").read_text())
        config = ModelConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HFCheckpointError(f"{p / 'meta.json'} is unreadable: {e}") from e
    tokenizer = Tokenizer.from_hf_folder(p / "tokenizer")
    try:
        params = restore_params(p / "params")
    except FileNotFoundError:
        raise
    except Exception as e:  # orbax raises many types on damaged checkpoints
        raise HFCheckpointError(f"{p / 'params'} is not a readable orbax checkpoint: {type(e).__name__}: {e}") from e
    return config, params, tokenizer, str(meta["fingerprint"])
