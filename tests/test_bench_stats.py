"""benchmarks/stats.py: the 95% Student-t interval of the benchmark tables, against scipy and by hand."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks import stats


@pytest.mark.parametrize("xs", [[1.0, 2.0], [0.5, 0.7, 0.9], [3.0, 3.0, 3.0, 3.0], [1.0, 4.0, 2.0, 8.0, 5.0]])
def test_mean_ci_is_the_student_t_interval(xs):
    m, h = stats.mean_ci(xs)
    assert m == pytest.approx(statistics.fmean(xs))
    assert h == pytest.approx(stats.t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)))


def test_t_quantiles_match_scipy_and_the_fallback_table():
    scipy_t = pytest.importorskip("scipy.stats").t
    for df in (1, 2, 3, 10, 30):
        assert stats.t975(df) == pytest.approx(float(scipy_t.ppf(0.975, df)), abs=2e-3)
        assert stats.T975[df - 1] == pytest.approx(float(scipy_t.ppf(0.975, df)), abs=2e-3)
    assert stats.mean_ci([1.0, 3.0])[1] == pytest.approx(12.706, abs=1e-2)  # 2 seeds: t = 12.7, s/√2 = 1


def test_one_value_has_no_interval_and_none_is_an_error():
    assert stats.mean_ci([2.5]) == (2.5, None) and stats.fmt_ci([2.5], ".1f") == "2.5"
    assert stats.fmt_ci([1.0, 3.0], ".1f") == "2.0 ± 12.7" and stats.fmt_ci([1.0, 3.0], "+.1f") == "+2.0 ± 12.7"
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="df >= 1"):
        stats.t975(0)
