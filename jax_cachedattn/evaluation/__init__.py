"""Does a truncated cache still answer well? TT / CA / NKVT / Full on real text (docs/truncation.md).

Above ``engine``, ``store``, ``model`` and ``checkpoint``; used by ``scripts/eval_truncation.py``,
``scripts/train_tiny.py`` and ``cachedattn eval-truncation``.
"""

from jax_cachedattn.evaluation.experiment import EvalConfig, Sequence, cuts, run
from jax_cachedattn.evaluation.methods import METHODS, StoredKVMismatch, Truncator, memory_store

__all__ = ["EvalConfig", "METHODS", "Sequence", "StoredKVMismatch", "Truncator", "cuts", "memory_store", "run"]
