"""When will an idle session (no job in the queue) send its next turn, if ever?

A naive ranking by "last reply + median think time" evicts exactly the sessions most likely to come
back soon and keeps the ones whose conversation has ended (DESIGN.md, Measuring). This predictor
weighs both questions:

* ``p_cont(k)``: the chance that a session that has finished ``k`` turns sends another. Estimated
  online from the sessions seen so far: those that came back after turn ``k`` against those that
  stayed silent longer than ``end_after_s`` (then presumed ended), with a prior of weight 2 toward the
  pooled estimate over all ``k``.
* the think time: log-normal; each session's log think times vary around its own mean (spread
  ``sigma_w``, within sessions) and the session means around the global one (spread ``tau``); both
  are estimated online (pooled within-session variance, and the total less it). A session with ``n``
  observed think times gets the empirical-Bayes posterior: mean shrunk toward the global one by
  ``w = n / (n + sigma_w^2 / tau^2)``, spread ``sqrt(sigma_w^2 + (1 - w) tau^2)``.

For a session idle for ``e`` seconds after ``k`` turns, the chance it is still coming is
``q = p S(e) / (p S(e) + 1 - p)`` (``S``: survival of its think time), and the chance that its next
turn arrives within a horizon ``H`` is ``q (1 - S(e + H) / S(e))``. ``H`` is about how long a session
kept in host memory stays there (the scheduler passes the prefetch window over the job rate).
Eviction takes the least likely first. (Ranking by the expected wait ``E[T - e | T > e] / q``
instead was tried: on the paper trace it kept fewer host hits than this, and ranking by
"last finish + think time" alone is worse than LRU: it evicts the sessions about to return.)
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np
from scipy.special import erf as _erf


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _phi_v(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


@dataclasses.dataclass
class _Sess:
    turns: int = 0
    last_finish: float | None = None
    log_thinks_sum: float = 0.0
    log_thinks_sum2: float = 0.0
    n_thinks: int = 0
    counted_end: bool = False


class NextTurnPredictor:
    """Online model of each session's next-turn time; see the module docstring."""

    def __init__(self, end_after_s: float | None = None, min_samples: int = 20):
        self._s: dict[str, _Sess] = defaultdict(_Sess)
        self._cont = defaultdict(int)  # k -> sessions that came back after turn k
        self._ended = defaultdict(int)  # k -> sessions silent past end_after_s after turn k
        self._sum = self._sum2 = 0.0
        self._n = 0
        self._within_ss = 0.0  # sum over sessions of their squared deviations from their own mean
        self._within_df = 0  # sum over sessions of (thinks - 1)
        self._fixed_end = end_after_s
        self.min_samples = min_samples
        self._idle: dict[str, None] = {}  # sessions finished and not yet back (insertion ordered)

    # ---- observations --------------------------------------------------------------------------
    def arrived(self, sid: str, now: float) -> None:
        """A new turn of ``sid`` entered the queue at ``now``."""
        s = self._s[sid]
        if s.last_finish is not None:
            lt = math.log(max(1e-3, now - s.last_finish))
            self._sum += lt
            self._sum2 += lt * lt
            self._n += 1
            if s.n_thinks:
                self._within_ss -= s.log_thinks_sum2 - s.log_thinks_sum ** 2 / s.n_thinks
                self._within_df -= s.n_thinks - 1
            s.log_thinks_sum += lt
            s.log_thinks_sum2 += lt * lt
            s.n_thinks += 1
            self._within_ss += s.log_thinks_sum2 - s.log_thinks_sum ** 2 / s.n_thinks
            self._within_df += s.n_thinks - 1
            if s.counted_end:  # presumed ended, came back after all
                self._ended[s.turns] -= 1
                s.counted_end = False
            self._cont[s.turns] += 1
        self._idle.pop(sid, None)

    def finished(self, sid: str, now: float) -> None:
        """A turn of ``sid`` finished (its reply is out) at ``now``."""
        s = self._s[sid]
        s.turns += 1
        s.last_finish = now
        s.counted_end = False
        self._idle[sid] = None

    def recent_idle(self, k: int) -> list[str]:
        """Up to ``k`` sessions finished and not yet back (nor presumed ended), latest finish first."""
        out = []
        for sid in reversed(self._idle):
            if len(out) >= k:
                break
            out.append(sid)
        return out

    def forget(self, sid: str) -> None:
        self._idle.pop(sid, None)

    # ---- the model ---------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._n >= self.min_samples

    def _components(self) -> tuple[float, float, float]:
        """(global mean, within-session variance, between-session variance) of log think times."""
        mu = self._sum / self._n
        var = max(1e-6, self._sum2 / self._n - mu * mu)
        within = self._within_ss / self._within_df if self._within_df >= 10 else var / 2.0
        within = min(max(within, 1e-6), var)
        return mu, within, max(1e-4 * var, var - within)

    def _lognormal(self, s: _Sess) -> tuple[float, float]:
        mu, sw2, tau2 = self._components()
        w = s.n_thinks / (s.n_thinks + sw2 / tau2)
        if s.n_thinks:
            mu = (1 - w) * mu + w * (s.log_thinks_sum / s.n_thinks)
        return mu, math.sqrt(sw2 + (1 - w) * tau2)

    def end_after_s(self) -> float:
        """Silence after which a session is presumed ended: the 99.9th percentile of think times."""
        if self._fixed_end is not None:
            return self._fixed_end
        mu = self._sum / self._n
        sd = math.sqrt(max(1e-6, self._sum2 / self._n - mu * mu))
        return math.exp(mu + 3.1 * sd)

    def update_ended(self, now: float) -> None:
        """Count the sessions silent for longer than ``end_after_s`` as ended (once each)."""
        if not self.ready:
            return
        limit = self.end_after_s()
        for sid in list(self._idle):
            s = self._s[sid]
            if s.last_finish is None or now - s.last_finish <= limit:
                break  # idle sessions are kept in finish order: the rest are younger
            s.counted_end = True
            self._ended[s.turns] += 1
            del self._idle[sid]

    def p_continue(self, k: int) -> float:
        tot_c, tot_e = sum(self._cont.values()), sum(self._ended.values())
        pooled = (tot_c + 1.0) / (tot_c + tot_e + 2.0)
        c, e = self._cont.get(k, 0), self._ended.get(k, 0)
        return (c + 2.0 * pooled) / (c + e + 2.0)

    def continue_probs(self, sids: list[str], turns: list[int], pooled: float) -> np.ndarray:
        """`p_continue` of each session (``turns[i]`` finished turns); ``pooled``: the estimate over all
        ``k``. A diagnostic oracle (``bench/gap.py``) replaces it by the truth."""
        c = np.asarray([self._cont.get(x, 0) for x in turns], float)
        en = np.asarray([self._ended.get(x, 0) for x in turns], float)
        return (c + 2.0 * pooled) / (c + en + 2.0)

    def return_prob(self, sid: str, now: float, horizon_s: float) -> float:
        """Chance that ``sid`` sends its next turn within ``horizon_s`` from ``now`` (nan: no model yet)."""
        s = self._s.get(sid)
        if s is None or s.last_finish is None or not self.ready:
            return float("nan")
        mu, sd = self._lognormal(s)
        e = max(1e-3, now - s.last_finish)
        surv = max(1e-12, 1.0 - _phi((math.log(e) - mu) / sd))
        surv_h = 1.0 - _phi((math.log(e + horizon_s) - mu) / sd)
        p = self.p_continue(s.turns)
        q = p * surv / (p * surv + (1.0 - p))
        return q * max(0.0, 1.0 - surv_h / surv)

    def return_probs(self, sids: list[str], now: float, horizon_s: float) -> np.ndarray:
        """`return_prob` of many sessions at once (vectorised; nan where there is no model)."""
        out = np.full(len(sids), np.nan)
        if not self.ready or not sids:
            return out
        mu0, sw2, tau2 = self._components()
        tot_c, tot_e = sum(self._cont.values()), sum(self._ended.values())
        pooled = (tot_c + 1.0) / (tot_c + tot_e + 2.0)
        idx, fin, n, lsum, k = [], [], [], [], []
        for i, sid in enumerate(sids):
            st = self._s.get(sid)
            if st is None or st.last_finish is None:
                continue
            idx.append(i)
            fin.append(st.last_finish)
            n.append(st.n_thinks)
            lsum.append(st.log_thinks_sum)
            k.append(st.turns)
        if not idx:
            return out
        n, lsum = np.asarray(n, float), np.asarray(lsum, float)
        w = n / (n + sw2 / tau2)
        mu = (1 - w) * mu0 + w * np.where(n > 0, lsum / np.maximum(n, 1), mu0)
        sd = np.sqrt(sw2 + (1 - w) * tau2)
        e = np.maximum(1e-3, now - np.asarray(fin))
        surv = np.maximum(1e-12, 1.0 - _phi_v((np.log(e) - mu) / sd))
        surv_h = 1.0 - _phi_v((np.log(e + horizon_s) - mu) / sd)
        p = self.continue_probs([sids[i] for i in idx], k, pooled)
        q = p * surv / (p * surv + (1.0 - p))
        out[np.asarray(idx)] = q * np.maximum(0.0, 1.0 - surv_h / surv)
        return out
