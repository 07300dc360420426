"""The simulator's cost model: what a turn costs on the engine, calibrated from measured figures.

Prefill of ``n`` new tokens over ``h`` cached history tokens:
``t = c0 + a n + b n (h + n / 2)`` (a matmul part linear in the tokens and an attention part
linear in the context each token attends to). Decode: ``decode_s_per_token`` per generated token.
Loading a history of ``bytes`` from a tier: transfer ``bytes / bandwidth[tier]``; with layer-wise
pre-loading it hides behind compute, so TTFT is ``max(compute, load) + load / L`` (the first layer
cannot hide) ``+ bytes x contention[tier]`` (the CPU the read takes from compute on a host with few
cores: 0 on an accelerator); with a synchronous load (the ``sync-load`` ablation) it is
``load + compute``. Saving is off the critical path unless synchronous (``sync-save``):
``bytes / write_bandwidth`` after the reply.

`CostModel.fit` takes the points of a benchmark table (the README's ``scripts/bench_overlap.py``
table: TTFT by history and new tokens for device, disk and recompute) and fits ``c0, a, b`` by
relative least squares and the disk contention per byte from the disk-minus-device gaps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CostModel:
    num_layers: int
    bytes_per_token: int
    c0: float
    a: float
    b: float
    decode_s_per_token: float
    bandwidth: dict  # tier -> bytes/s (device: inf)
    write_bandwidth: dict  # tier -> bytes/s
    contention: dict = dataclasses.field(default_factory=dict)  # tier -> seconds per byte

    def prefill_s(self, n_new: int, history: int) -> float:
        if n_new <= 0:
            return 0.0
        return self.c0 + self.a * n_new + self.b * n_new * (history + n_new / 2.0)

    def load_s(self, tier: str, nbytes: int) -> float:
        bw = self.bandwidth.get(tier, math.inf)
        return 0.0 if bw == math.inf or nbytes <= 0 else nbytes / bw

    def ttft_s(self, n_new: int, history: int, tier: str | None, nbytes: int, *, overlap: bool = True,
               load_s: float | None = None) -> float:
        """TTFT of a turn whose ``history`` tokens (``nbytes``) come from ``tier`` (None: recomputed,
        then ``history`` must be 0 and ``n_new`` counts every computed token). ``load_s``: the load
        time when the store knows it (a disk read sharing the disk with prefetches)."""
        comp = self.prefill_s(n_new, history)
        if tier is None or tier == "device" or nbytes <= 0:
            return comp
        load = self.load_s(tier, nbytes) if load_s is None else load_s
        cont = nbytes * self.contention.get(tier, 0.0)
        if not overlap:
            return load + comp + cont
        return max(comp, load) + load / self.num_layers + cont

    def decode_s(self, tokens: int) -> float:
        return max(0, tokens - 1) * self.decode_s_per_token

    def save_s(self, nbytes: int) -> float:
        return sum(nbytes / bw for bw in self.write_bandwidth.values() if bw and bw != math.inf)

    @classmethod
    def fit(cls, *, num_layers: int, bytes_per_token: int, points: Sequence[dict], decode_s_per_token: float,
            bandwidth: dict, write_bandwidth: dict) -> "CostModel":
        """Fit from measured points ``{history, new, device_ms, disk_ms?, recompute_ms?}``."""
        rows, ys = [], []
        for p in points:
            h, n = p["history"], p["new"]
            rows.append((1.0, n, n * (h + n / 2.0)))
            ys.append(p["device_ms"] / 1e3)
            if "recompute_ms" in p:
                m = h + n
                rows.append((1.0, m, m * m / 2.0))
                ys.append(p["recompute_ms"] / 1e3)
        A, y = np.asarray(rows), np.asarray(ys)
        w = 1.0 / y  # relative error
        coef, *_ = np.linalg.lstsq(A * w[:, None], y * w, rcond=None)
        c0, a, b = (max(0.0, float(x)) for x in coef)
        base = cls(num_layers, bytes_per_token, c0, a, b, decode_s_per_token, dict(bandwidth), dict(write_bandwidth))
        cont = {}
        gaps = []
        for p in points:
            if "disk_ms" in p:
                nb = p["history"] * bytes_per_token
                comp = p["device_ms"] / 1e3
                load = base.load_s("disk", nb)
                gaps.append((p["disk_ms"] / 1e3 - (max(comp, load) + load / num_layers)) / nb)
        if gaps:
            cont["disk"] = max(0.0, float(np.median(gaps)))
        return dataclasses.replace(base, contention=cont)

    def to_json(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                for k, v in dataclasses.asdict(self).items()}


def from_config(cfg: dict, *, num_layers: int, bytes_per_token: int) -> CostModel:
    """A cost model from a config's ``cost_model`` section: ``calibration`` points to fit, or the
    coefficients ``c0, a, b`` given directly; bandwidths in GB/s (``inf`` for none)."""
    def gbs(d: dict) -> dict:
        return {k: (math.inf if v in (None, "inf") else float(v) * 1e9) for k, v in d.items()}

    bw = gbs(cfg.get("bandwidth_gbs", {"device": "inf", "host": 8.0, "disk": 0.75}))
    wbw = gbs(cfg.get("write_bandwidth_gbs", {"disk": 0.45}))
    dec = float(cfg.get("decode_s_per_token", 0.02))
    if "calibration" in cfg:
        m = CostModel.fit(num_layers=num_layers, bytes_per_token=bytes_per_token, points=cfg["calibration"],
                          decode_s_per_token=dec, bandwidth=bw, write_bandwidth=wbw)
    else:
        m = CostModel(num_layers, bytes_per_token, float(cfg.get("c0", 0.0)), float(cfg["a"]), float(cfg.get("b", 0.0)),
                      dec, bw, wbw)
    if "contention_s_per_gb" in cfg:
        m = dataclasses.replace(m, contention={k: float(v) / 1e9 for k, v in cfg["contention_s_per_gb"].items()})
    return m
