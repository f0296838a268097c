"""Performance-equivalent dense size of a routed model: Clark et al. 2022, "Unified Scaling Laws for Routed Language
Models" (ICML 2022, arXiv:2202.01169), the law behind the paper's Fig 2b.

Clark et al. fit the converged validation log-loss of a routed model with a dense backbone of N parameters and E
experts per routed layer (their Eq. 1, log = log10):

    log L(N, E) = a log N + b log Ê + c log N log Ê + d
    1 / Ê       = 1 / (E - 1 + (1 / E_start - 1 / E_max)^-1) + 1 / E_max        (saturating transform of E)

Ê(1) = E_start and Ê -> E_max as E grows, so E = 1 is the dense model. Writing alpha(E) = a + c log E, the
*effective parameter count* N̄ is the dense size with the same loss, L(N̄, 1) = L(N, E):

    N̄(N, E) = N^(alpha(Ê) / alpha(E_start)) * (Ê / E_start)^(b / alpha(E_start))

Routing helps while -d log L / d log E = -(b + c log N) > 0, i.e. below N_cutoff = 10^(-b / c).

The constants are the paper's Table 3 (fits of Eq. 1 for its three routing techniques, all trained on 130B tokens)
as transcribed in two independent public write-ups of the paper (the PDF itself was not reachable from the machine
this was written on: check against it when you can). The paper also states N_cutoff = 937B (S-BASE), 85B (RL-R),
83B (Hash), and that a 5M backbone with 128 experts is worth about a 55M dense model; tests/test_inference_scaling.py
checks both against these functions (the cut-offs within the rounding of the 3-decimal b and c). S-BASE
(Sinkhorn-balanced top-1) is the routing closest to the top-1 Switch / DeepSpeed-MoE routing used here, hence the
default. The fits cover N from about 15M up: CPU-sized backbones are extrapolations, labelled so in the figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RoutedScalingFit:
    """One row of Clark et al. 2022, Table 3: the fitted constants of Eq. 1 for one routing technique."""

    name: str
    a: float
    b: float
    c: float
    d: float
    e_start: float
    e_max: float

    def __post_init__(self) -> None:
        if not (1.0 < self.e_start < self.e_max):
            raise ValueError(f"RoutedScalingFit {self.name}: need 1 < e_start < e_max, got {self.e_start} {self.e_max}")
        if self.alpha(self.e_start) >= 0:
            raise ValueError(f"RoutedScalingFit {self.name}: the dense exponent a + c log E_start must be negative")

    def alpha(self, e_hat: float) -> float:
        """The log N slope at (saturated) expert count e_hat: a + c log10 e_hat."""
        return self.a + self.c * math.log10(e_hat)


# Clark et al. 2022, Table 3 ("Eq. 1 solutions"): a, b, c, d, E_start, E_max.
CLARK2022 = {
    "s-base": RoutedScalingFit("S-BASE", a=-0.082, b=-0.108, c=0.009, d=1.104, e_start=1.847, e_max=314.478),
    "rl-r": RoutedScalingFit("RL-R", a=-0.083, b=-0.126, c=0.012, d=1.111, e_start=1.880, e_max=469.982),
    "hash": RoutedScalingFit("Hash", a=-0.087, b=-0.136, c=0.012, d=1.157, e_start=4.175, e_max=477.741),
}
S_BASE = CLARK2022["s-base"]


def _fit(fit: RoutedScalingFit | str) -> RoutedScalingFit:
    if isinstance(fit, RoutedScalingFit):
        return fit
    key = str(fit).lower()
    if key not in CLARK2022:
        raise ValueError(f"unknown routing fit {fit!r}; known: {sorted(CLARK2022)}")
    return CLARK2022[key]


def _check(n_params: float, num_experts: float) -> None:
    if not (isinstance(n_params, (int, float)) and math.isfinite(n_params) and n_params > 0):
        raise ValueError(f"dense parameter count N must be a positive number, got {n_params!r}")
    if not (isinstance(num_experts, (int, float)) and math.isfinite(num_experts) and num_experts >= 1):
        raise ValueError(f"expert count E must be a number >= 1, got {num_experts!r}")


def saturated_experts(num_experts: float, fit: RoutedScalingFit | str = S_BASE) -> float:
    """Ê: the saturating transform of E (Clark et al. Eq. 1); Ê(1) = E_start, Ê -> E_max as E -> infinity."""
    f = _fit(fit)
    _check(1.0, num_experts)
    shift = 1.0 / (1.0 / f.e_start - 1.0 / f.e_max)
    return 1.0 / (1.0 / (num_experts - 1.0 + shift) + 1.0 / f.e_max)


def routed_log_loss(n_params: float, num_experts: float, fit: RoutedScalingFit | str = S_BASE) -> float:
    """log10 of the fitted validation loss L(N, E) (Clark et al. Eq. 1; their data, tokenizer and 130B tokens)."""
    f = _fit(fit)
    _check(n_params, num_experts)
    ln, le = math.log10(n_params), math.log10(saturated_experts(num_experts, f))
    return f.a * ln + f.b * le + f.c * ln * le + f.d


def effective_params(n_params: float, num_experts: float, fit: RoutedScalingFit | str = S_BASE) -> float:
    """N̄(N, E): the dense parameter count with the loss of an N-parameter backbone routed over E experts."""
    f = _fit(fit)
    _check(n_params, num_experts)
    e_hat = saturated_experts(num_experts, f)
    a0 = f.alpha(f.e_start)
    log_n = (f.alpha(e_hat) * math.log10(n_params) + f.b * math.log10(e_hat / f.e_start)) / a0
    return 10.0**log_n


def cutoff_params(fit: RoutedScalingFit | str = S_BASE) -> float:
    """N_cutoff = 10^(-b / c): the backbone size beyond which more experts stop lowering the fitted loss."""
    f = _fit(fit)
    return 10.0 ** (-f.b / f.c)


def dense_equivalent_table(
    n_params: float, experts: list[int], fit: RoutedScalingFit | str = S_BASE, label: str = ""
) -> pd.DataFrame:
    """One row per expert count: N̄ for a backbone of n_params, its ratio to N, and the fitted loss ratio."""
    f = _fit(fit)
    base = routed_log_loss(n_params, 1, f)
    rows = []
    for e in experts:
        n_bar = effective_params(n_params, e, f)
        rows.append(
            {
                "backbone": label or f"{n_params / 1e6:.3g}M",
                "n_params": float(n_params),
                "experts": int(e),
                "dense_equivalent_params": n_bar,
                "dense_equivalent_ratio": n_bar / n_params,
                "fitted_loss_ratio": float(np.power(10.0, routed_log_loss(n_params, e, f) - base)),
                "fit": f.name,
                "extrapolated": bool(n_params < 15e6),
            }
        )
    return pd.DataFrame(rows)


__all__ = [
    "CLARK2022",
    "RoutedScalingFit",
    "S_BASE",
    "cutoff_params",
    "dense_equivalent_table",
    "effective_params",
    "routed_log_loss",
    "saturated_experts",
]
