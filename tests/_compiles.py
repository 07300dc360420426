"""Counting the programs XLA compiles while a block runs (jax.log_compiles), for the no-recompile tests."""

from __future__ import annotations

import collections
import contextlib
import logging
import re

import jax


class Compiles(logging.Handler):
    """``n``: programs compiled; ``count``: by jitted function name; ``at_warm``: ``n`` when a batch job's
    warm-up ended (pass ``event`` as the job's ``on_event``)."""

    def __init__(self):
        super().__init__()
        self.n, self.at_warm, self.count = 0, None, collections.Counter()

    def emit(self, record):
        msg = record.getMessage()
        if "Finished XLA compilation of jit(" in msg:
            self.n += 1
            m = re.search(r"Finished XLA compilation of jit\((\w+)\)", msg)
            if m:
                self.count[m.group(1)] += 1

    def event(self, e):
        if e["event"] == "warmed":
            self.at_warm = self.n


@contextlib.contextmanager
def counting_compiles():
    """``with counting_compiles() as h:`` counts into ``h`` (a :class:`Compiles`) what compiles inside."""
    h = Compiles()
    log = logging.getLogger("jax")
    old = log.level
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield h
    finally:
        log.removeHandler(h)
        log.setLevel(old)
