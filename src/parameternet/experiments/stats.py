"""Statistics for seeds-as-replicates experiments: means, standard errors, t intervals, Welch tests, power.

Thin wrappers over ``scipy.stats`` so that every experiment reports the same quantities the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Summary", "Welch", "seeds_for_power", "summary", "welch"]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation, standard error and a two-sided t interval of ``n`` values (nan if n < 2)."""

    n: int
    mean: float
    sd: float
    se: float
    low: float
    high: float
    level: float


def summary(values: Sequence[float], level: float = 0.95) -> Summary:
    """:class:`Summary` of ``values`` with a two-sided Student-t interval at ``level``."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan, level)
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, math.nan, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    return Summary(n, mean, sd, se, mean - half, mean + half, level)


@dataclass(frozen=True)
class Welch:
    """``mean(x) - mean(y)``, its Welch standard error, two-sided intervals at 90% and 95%, and p values."""

    diff: float
    se: float
    df: float
    ci90: tuple[float, float]
    ci95: tuple[float, float]
    p_greater: float  # one-sided: H1 mean(x) > mean(y)
    p_two_sided: float


def welch(x: Sequence[float], y: Sequence[float]) -> Welch | None:
    """Welch's unequal-variance t test of ``x`` against ``y``; None unless both have 2 or more values."""
    from scipy import stats

    if len(x) < 2 or len(y) < 2:
        return None
    res = stats.ttest_ind(x, y, equal_var=False)
    greater = stats.ttest_ind(x, y, equal_var=False, alternative="greater")
    sx, sy = summary(x), summary(y)
    ci90, ci95 = res.confidence_interval(0.90), res.confidence_interval(0.95)
    return Welch(
        sx.mean - sy.mean,
        math.sqrt(sx.se**2 + sy.se**2),
        float(res.df),
        (float(ci90.low), float(ci90.high)),
        (float(ci95.low), float(ci95.high)),
        float(greater.pvalue),
        float(res.pvalue),
    )


def seeds_for_power(sds: Sequence[float], delta: float, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Seeds per group for a one-sided two-sample test at ``alpha`` to detect ``delta`` with ``power``.

    The normal approximation ``n = (z_{1-alpha} + z_power)^2 (sd_1^2 + sd_2^2) / delta^2`` with the observed
    standard deviations ``sds`` (one per group); None if any is unknown.
    """
    from scipy import stats

    if not sds or any(not math.isfinite(s) for s in sds):
        return None
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    return max(2, math.ceil(z * z * sum(s * s for s in sds) / (delta * delta)))
