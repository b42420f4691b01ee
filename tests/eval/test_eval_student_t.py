"""The exact Student t quantiles the report's intervals use, against printed table values (and
scipy where it is installed), at integer and fractional degrees of freedom."""

from __future__ import annotations

import pytest
from antidistill.benchmarks.distillation.student_t import regularized_beta, t_cdf, t_critical, t_quantile

# two-sided 95% (the 0.975 quantile) and 99% (0.995) critical values, as printed in t tables
TABLE_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
TABLE_95 |= {10: 2.228, 11: 2.201, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}
TABLE_99 = {1: 63.657, 5: 4.032, 10: 3.169, 30: 2.750}


@pytest.mark.parametrize(("df", "value"), sorted(TABLE_95.items()))
def test_95_percent_critical_values_match_the_table(df, value):
    assert t_critical(df) == pytest.approx(value, abs=5e-4)


@pytest.mark.parametrize(("df", "value"), sorted(TABLE_99.items()))
def test_99_percent_critical_values_match_the_table(df, value):
    assert t_critical(df, level=0.99) == pytest.approx(value, abs=5e-4)


def test_past_ten_degrees_of_freedom_the_quantile_is_not_the_normal_one():
    assert t_critical(11) > t_critical(30) > t_critical(1000) > 1.96
    assert t_critical(1e6) == pytest.approx(1.959964, abs=1e-5)  # the normal limit


def test_fractional_degrees_of_freedom_lie_between_their_neighbours():
    assert t_critical(4) < t_critical(3.2) < t_critical(3)
    assert t_critical(3.2) == pytest.approx(3.0728, abs=1e-4)


def test_quantile_and_cdf_invert_each_other_and_are_symmetric():
    assert t_cdf(0.0, 7) == pytest.approx(0.5)
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7))
    for df in (1, 2.5, 9, 40):
        for p in (0.6, 0.9, 0.99):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)


def test_regularized_beta_closed_forms():
    assert regularized_beta(0.3, 1, 1) == pytest.approx(0.3)  # uniform
    assert regularized_beta(0.3, 4, 1) == pytest.approx(0.3**4)  # I_x(a, 1) = x^a
    assert regularized_beta(0.5, 7.5, 7.5) == pytest.approx(0.5)  # symmetric
    assert regularized_beta(0.0, 2, 3) == 0.0 and regularized_beta(1.0, 2, 3) == 1.0
