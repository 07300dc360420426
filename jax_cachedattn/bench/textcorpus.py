"""Real token text for a synthetic trace run on a real model with a tokenizer.

The text is English prose from the docstrings of Python's standard library (always installed,
nothing fetched); each turn's prompt is a window of the tokenised corpus of the turn's length,
taken at a seeded random offset.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import numpy as np

from jax_cachedattn.workload import Workload

_MODULES = ("argparse", "collections", "json", "pathlib", "threading", "subprocess", "email", "unittest", "logging",
            "asyncio", "datetime", "decimal", "textwrap", "string", "shutil", "tarfile", "zipfile", "heapq", "csv")


def corpus_text() -> str:
    parts = []
    for name in _MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for _, obj in inspect.getmembers(mod):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "").startswith(name):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(doc)
    return "\n\n".join(parts)


def with_text_ids(workload: Workload, tokenizer, seed: int = 0, replies: bool = False) -> Workload:
    """The workload with each turn's prompt ids a window of real tokenised text of its length (and,
    with ``replies``, its ``reply_ids`` another window, of the reply's length)."""
    ids = np.asarray(tokenizer.encode(corpus_text()), np.int32)
    rng = np.random.default_rng(seed)
    out = []
    for s in workload.sessions:
        turns = []
        for t in s.turns:
            n = min(t.user_tokens, len(ids) - 1)
            off = int(rng.integers(0, len(ids) - n))
            rep = None
            if replies:
                m = min(t.reply_tokens, len(ids) - 1)
                roff = int(rng.integers(0, len(ids) - m))
                rep = tuple(int(x) for x in ids[roff : roff + m])
            turns.append(dataclasses.replace(t, prompt_ids=tuple(int(x) for x in ids[off : off + n]), reply_ids=rep))
        out.append(dataclasses.replace(s, turns=tuple(turns)))
    return Workload(workload.name, out)
