import kdig_tf  # noqa: F401

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from kdig_tf import stats
from kdig_tf.errors import InvalidArgumentError

A = [91.2, 90.8, 91.9, 92.3, 90.5]
B = [89.9, 90.1, 90.7, 89.5, 90.3, 90.0]


@pytest.mark.parametrize("a, b", [(A, B), (B, A), ([1.0, 2.0, 4.0], [0.5, 0.7, 0.6, 3.0, 0.1, 2.2, 1.9])])
def test_welch_matches_scipy(a, b):
    ours = stats.welch_ttest(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert ours["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert ours["p"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert ours["dof"] == pytest.approx(reference.df, rel=1e-12)
    ci = stats.mean_difference_ci(a, b)
    low, high = reference.confidence_interval(0.95)
    assert ci["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert (ci["low"], ci["high"]) == (pytest.approx(low), pytest.approx(high))


def test_summary_uses_ddof_1():
    summary = stats.summarize([1.0, 2.0, 3.0, 6.0])
    assert summary == {"n": 4, "mean": 3.0, "sd": pytest.approx(np.std([1, 2, 3, 6], ddof=1)),
                       "min": 1.0, "max": 6.0}
    assert math.isnan(stats.summarize([5.0])["sd"])


def test_cohens_d_and_hedges_g_by_hand():
    # Means 2 and 4, both variances 1 -> pooled sd 1 -> d = -2.
    assert stats.cohens_d([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0)
    # Unequal sizes: a = [1, 3] (var 2), b = [2, 4, 6, 8] (var 20/3);
    # pooled var = (1*2 + 3*20/3) / 4 = 5.5; d = (2 - 5) / sqrt(5.5).
    assert stats.cohens_d([1, 3], [2, 4, 6, 8]) == pytest.approx(-3 / math.sqrt(5.5))
    # J(4) = Gamma(2) / (sqrt(2) Gamma(1.5)) = 1 / (sqrt(2) * sqrt(pi) / 2).
    j4 = 2 / (math.sqrt(2) * math.sqrt(math.pi))
    assert stats.hedges_correction(4) == pytest.approx(j4)
    assert stats.hedges_g([1, 2, 3], [3, 4, 5]) == pytest.approx(-2.0 * j4)
    # Close to the usual approximation 1 - 3 / (4 dof - 1) for larger samples.
    assert stats.hedges_correction(18) == pytest.approx(1 - 3 / (4 * 18 - 1), abs=1e-3)


def test_compare_bundles_everything():
    result = stats.compare(A, B)
    assert set(result) == {"mean_diff", "ci_low", "ci_high", "confidence", "t", "dof", "p", "cohens_d", "hedges_g"}
    assert result["ci_low"] < result["mean_diff"] < result["ci_high"]
    assert result["cohens_d"] > 0 and 0 < result["hedges_g"] < result["cohens_d"]


@pytest.mark.parametrize("a, b", [(A, B[:5]), ([91.0, 90.2, 92.4], [90.1, 90.0, 91.3])])
def test_paired_ttest_matches_scipy(a, b):
    ours = stats.paired_ttest(a, b)
    reference = scipy_stats.ttest_rel(a, b)
    assert ours["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert ours["p"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert ours["dof"] == reference.df
    low, high = reference.confidence_interval(0.95)
    assert (ours["ci_low"], ours["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert ours["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b)))


def test_paired_ttest_degenerate_and_bad_inputs():
    assert math.isnan(stats.paired_ttest([1.0], [2.0])["p"])
    constant = stats.paired_ttest([2.0, 3.0], [1.0, 2.0])  # every difference is 1: no spread
    assert constant["mean_diff"] == 1.0 and math.isnan(constant["p"])
    with pytest.raises(InvalidArgumentError):
        stats.paired_ttest([1.0, 2.0], [1.0, 2.0, 3.0])


def test_holm():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = stats.holm([0.2, float("nan"), 0.9])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.9)


def test_degenerate_inputs_give_nan_not_errors():
    assert math.isnan(stats.welch_ttest([1.0], [2.0, 3.0])["t"])
    assert math.isnan(stats.welch_ttest([1.0, 1.0], [2.0, 2.0])["p"])  # zero variance
    assert math.isnan(stats.mean_difference_ci([1.0], [2.0, 3.0])["low"])
    # One run in an arm: no effect size (the pooled sd would come from the other arm alone).
    assert math.isnan(stats.cohens_d([1.0], [2.0, 3.0])) and math.isnan(stats.hedges_g([2.0, 3.0], [1.0]))
    assert stats.finite_or_none({"a": [math.nan, 1.0], "b": math.inf}) == {"a": [None, 1.0], "b": None}


@pytest.mark.parametrize("bad", [[], [1.0, math.nan]])
def test_bad_values_raise(bad):
    with pytest.raises(InvalidArgumentError):
        stats.summarize(bad)
    with pytest.raises(InvalidArgumentError):
        stats.mean_difference_ci([1, 2], [3, 4], confidence=1.5)
