"""Small statistics for benchmark tables: the mean and its 95% Student-t confidence interval.

    mean ± t_{0.975, n-1} · s / √n        (s: the sample standard deviation; n >= 2, else no interval)

scipy's t quantile when scipy is installed, else a table for 1-30 degrees of freedom (the normal 1.96 beyond).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Student t 0.975 quantiles for 1..30 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"t975: expected df >= 1, found {df}")
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        return T975[df - 1] if df <= len(T975) else 1.96


def mean_ci(xs: Sequence[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% t-interval); the half-width is None for fewer than 2 values."""
    if not xs:
        raise ValueError("mean_ci: no values")
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, None
    return m, t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))


def fmt_ci(xs: Sequence[float], fmt: str = ".4f") -> str:
    """``mean ± half`` (95% t-interval), or the single value; a sign in ``fmt`` ("+.4f") applies to the mean only."""
    m, h = mean_ci(xs)
    return format(m, fmt) if h is None else f"{format(m, fmt)} ± {format(h, fmt.replace('+', ''))}"


def median_ci(xs: Sequence[float]) -> tuple[float, float, float]:
    """(median, low, high): the distribution-free 95% interval of the median, the order statistics
    (x_(j), x_(n+1-j)) with the largest j such that P(j <= Bin(n, 1/2) <= n - j) >= 0.95 (n >= 6; fewer values:
    their range)."""
    if not xs:
        raise ValueError("median_ci: no values")
    s, n = sorted(xs), len(xs)

    def cover(j: int) -> float:
        return sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2 ** n

    j = max((j for j in range(1, n // 2 + 1) if cover(j) >= 0.95), default=0)
    lo, hi = (s[j - 1], s[n - j]) if j else (s[0], s[-1])
    return statistics.median(s), lo, hi
