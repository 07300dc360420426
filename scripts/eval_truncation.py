"""Does a truncated cache still answer well? TT / CA / NKVT / Full perplexity, agreement and recall.

    python scripts/eval_truncation.py --model smollm2 --out runs/eval_truncation
    python scripts/eval_truncation.py --model tests/data/tiny_bytes --windows 256 --continuation 64 --out runs/tiny

The same as ``cachedattn eval-truncation`` (flags: ``--help``); see docs/truncation.md.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from jax_cachedattn.cli import main as cli_main

    return cli_main(["eval-truncation", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
