"""bench/turnprofile.py: the stages of a device-pool hit, timed one by one (tiny model; slow: it compiles the engine's programs)."""

from __future__ import annotations

import pytest

from jax_cachedattn.bench import turnprofile
from jax_cachedattn.engine import programs as P, slots as SL


@pytest.mark.slow  # ~7 min at nice 19 on the loaded 2-core VM (compiles the engine's programs)
def test_stages_of_a_device_hit_are_timed_and_the_programs_restored():
    before = {n: getattr(P, n) for n in turnprofile.STAGES} | {"insert": SL.insert}
    res = turnprofile.measure([40], prompt=8, repeat=2, model_name="tiny", max_context=256)
    (row,) = res["rows"]
    assert row["device_hits"] == 2  # every measured turn found its history in the page pool
    assert row["history"] >= 40 and row["history_bucket"] >= row["history"]
    # each program of a device hit ran and was waited for
    for name in turnprofile.STAGES + ("insert",):
        assert row["stages_s"][name] > 0, name
    assert row["ttft_staged_s"] >= sum(row["stages_s"].values())
    assert row["host_s"] == row["ttft_staged_s"] - sum(row["stages_s"].values())
    assert set(row["layers_alone_s"]) == {"with_history", "no_history"}
    assert row["ttft_s"] > 0
    # the wrappers are gone: the engine runs its own programs again
    after = {n: getattr(P, n) for n in turnprofile.STAGES} | {"insert": SL.insert}
    assert after == before
