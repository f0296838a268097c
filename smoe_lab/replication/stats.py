"""The verdict rule: per-seed differences -> mean, spread, standard error -> supported / not supported / inconclusive.

A comparison is a set of per-seed differences oriented so that positive means "as the paper claims". With mean m,
sample standard deviation sd, n seeds and SE = sd / sqrt(n): SUPPORTED when m - k SE > -margin, NOT SUPPORTED when
m + k SE < -margin, INCONCLUSIVE otherwise or when n < 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"


@dataclass(frozen=True)
class Estimate:
    """Mean, sample standard deviation, standard error and count of per-seed values."""

    mean: float
    sd: float
    se: float
    n: int

    @classmethod
    def of(cls, values) -> Estimate:
        v = np.asarray(list(values), dtype=float)
        v = v[np.isfinite(v)]
        n = len(v)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        sd = float(v.std(ddof=1)) if n > 1 else math.nan
        return cls(float(v.mean()), sd, sd / math.sqrt(n) if n > 1 else math.nan, n)

    def text(self, decimals: int = 2, k: float | None = None) -> str:
        """ "+1.23 ± 0.45 (SE 0.26, n 3)"; with k also the interval mean ± k SE."""
        if self.n == 0:
            return "no data"
        d = decimals
        if self.n < 2:
            return f"{self.mean:+.{d}f} (n 1)"
        s = f"{self.mean:+.{d}f} ± {self.sd:.{d}f} (SE {self.se:.{d}f}, n {self.n})"
        if k is not None:
            s += f", ±{k:g} SE: [{self.mean - k * self.se:+.{d}f}, {self.mean + k * self.se:+.{d}f}]"
        return s


def verdict(values, se_factor: float = 2.0, margin: float = 0.0) -> tuple[str, Estimate]:
    """(verdict, estimate) of per-seed differences oriented so that positive is the claimed direction.

    supported: mean - k SE > -margin; not supported: mean + k SE < -margin; inconclusive otherwise or n < 2.
    """
    est = Estimate.of(values)
    if est.n < 2 or not math.isfinite(est.se):
        return INCONCLUSIVE, est
    lo, hi = est.mean - se_factor * est.se, est.mean + se_factor * est.se
    if lo > -margin:
        return SUPPORTED, est
    if hi < -margin:
        return NOT_SUPPORTED, est
    return INCONCLUSIVE, est


def combine(verdicts: list[str]) -> str:
    """A claim of several parts: supported if all parts are, not supported if any is, else inconclusive."""
    if not verdicts:
        return INCONCLUSIVE
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE


def seeds_needed(est: Estimate, se_factor: float = 2.0, margin: float = 0.0) -> int | None:
    """Seeds at which this mean and spread would clear k SE (None: no effect to detect, or no spread known)."""
    effect = abs(est.mean + margin) if margin else abs(est.mean)
    if not (est.n >= 2 and math.isfinite(est.sd) and effect > 0):
        return None
    return max(2, math.ceil((se_factor * est.sd / effect) ** 2 - 1e-9))


def mean_sd(values) -> tuple[float, float]:
    """(mean, sd) of per-seed values, sd 0 for a single value (error bars)."""
    e = Estimate.of(values)
    return e.mean, (e.sd if e.n > 1 else 0.0)
