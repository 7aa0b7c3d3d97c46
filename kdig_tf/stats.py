"""Statistics for comparing training recipes over repeated runs (no TensorFlow).

Every comparison is ``a`` (a method) against ``b`` (the reference): positive
differences, t statistics and effect sizes mean ``a`` scored higher.

* Welch's t-test: no equal-variance assumption, dof by Welch-Satterthwaite.
* Cohen's d with the pooled standard deviation, and Hedges' g (d times the exact
  small-sample correction J, which matters at 10 runs per arm).
* The mean difference with a Welch confidence interval (same dof as the test).
* The paired t-test on per-seed differences, for arms whose runs share seeds (same initial
  weights and batches for the same seed).
* Holm's step-down adjustment, for several methods tested against one reference.

Degenerate inputs (fewer than 2 values, or zero variance in both groups) give NaN
for the affected quantities instead of raising, so that a campaign summary with
one failed arm still renders; ``finite_or_none`` turns NaN into JSON ``null``.
"""
import kdig_tf  # noqa: F401

import math

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

from kdig_tf.errors import InvalidArgumentError


def _as_values(values, name="values"):
    array = np.asarray(list(values), dtype=np.float64).ravel()
    if array.size == 0:
        raise InvalidArgumentError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise InvalidArgumentError(f"{name} contains NaN or infinite values")
    return array


def summarize(values):
    """n, mean, sd (ddof=1; NaN for one value), min and max."""
    array = _as_values(values)
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if array.size > 1 else math.nan,
        "min": float(array.min()),
        "max": float(array.max()),
    }


def _welch_parts(a, b):
    """Mean difference, its standard error and the Welch-Satterthwaite dof."""
    a, b = _as_values(a, "a"), _as_values(b, "b")
    if a.size < 2 or b.size < 2:
        return float(a.mean() - b.mean()), math.nan, math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se2 = va + vb
    if se2 == 0.0:
        return float(a.mean() - b.mean()), 0.0, math.nan
    dof = se2 ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(a.mean() - b.mean()), float(math.sqrt(se2)), float(dof)


def welch_ttest(a, b):
    """Welch's two-sided t-test of mean(a) == mean(b): dict with t, dof, p."""
    diff, se, dof = _welch_parts(a, b)
    if not se or math.isnan(dof):
        return {"t": math.nan, "dof": dof, "p": math.nan}
    t = diff / se
    p = 2.0 * scipy_stats.t.sf(abs(t), dof)
    return {"t": float(t), "dof": float(dof), "p": float(p)}


def _check_confidence(confidence):
    if not 0.0 < confidence < 1.0:
        raise InvalidArgumentError(f"confidence must be in (0, 1), got {confidence}")


def _t_interval(diff, se, dof, confidence):
    """(low, high) of diff +- t_{dof} * se; NaN when dof is undefined."""
    if math.isnan(dof):
        return math.nan, math.nan
    half = scipy_stats.t.ppf(0.5 + confidence / 2.0, dof) * se
    return float(diff - half), float(diff + half)


def mean_difference_ci(a, b, confidence=0.95):
    """mean(a) - mean(b) with its Welch confidence interval: dict diff, low, high, confidence."""
    _check_confidence(confidence)
    diff, se, dof = _welch_parts(a, b)
    low, high = _t_interval(diff, se, dof, confidence)
    return {"diff": diff, "low": low, "high": high, "confidence": confidence}


def pooled_sd(a, b):
    a, b = _as_values(a, "a"), _as_values(b, "b")
    dof = a.size + b.size - 2
    if dof < 1:
        return math.nan
    ss = (a.size - 1) * (a.var(ddof=1) if a.size > 1 else 0.0) + (b.size - 1) * (b.var(ddof=1) if b.size > 1 else 0.0)
    return float(math.sqrt(ss / dof))


def cohens_d(a, b):
    """(mean(a) - mean(b)) / pooled sd; NaN unless both groups have 2 or more values.

    With a single value in one group the pooled sd would be the other group's spread alone,
    and a d from it reads as more certain than it is.
    """
    a, b = _as_values(a, "a"), _as_values(b, "b")
    if a.size < 2 or b.size < 2:
        return math.nan
    sd = pooled_sd(a, b)
    if math.isnan(sd) or sd == 0.0:
        return math.nan
    return float((a.mean() - b.mean()) / sd)


def hedges_correction(dof):
    """Exact small-sample bias correction J(dof) = Gamma(dof/2) / (sqrt(dof/2) Gamma((dof-1)/2))."""
    if dof < 2:
        return math.nan
    return float(math.exp(special.gammaln(dof / 2.0) - special.gammaln((dof - 1) / 2.0)) / math.sqrt(dof / 2.0))


def hedges_g(a, b):
    """Cohen's d times J(n_a + n_b - 2)."""
    a, b = _as_values(a, "a"), _as_values(b, "b")
    return float(cohens_d(a, b) * hedges_correction(a.size + b.size - 2))


def compare(a, b, confidence=0.95):
    """Everything a results table needs for ``a`` against the reference ``b``."""
    test = welch_ttest(a, b)
    ci = mean_difference_ci(a, b, confidence)
    return {
        "mean_diff": ci["diff"],
        "ci_low": ci["low"],
        "ci_high": ci["high"],
        "confidence": confidence,
        "t": test["t"],
        "dof": test["dof"],
        "p": test["p"],
        "cohens_d": cohens_d(a, b),
        "hedges_g": hedges_g(a, b),
    }


def paired_ttest(a, b, confidence=0.95):
    """Two-sided t-test of mean(a - b) == 0 for paired values (a[i] and b[i] share a seed).

    dict with n, mean_diff, its confidence interval, t, dof and p. Pairing removes the
    seed-to-seed variation both arms share, so it can detect differences Welch's test cannot.
    """
    a, b = _as_values(a, "a"), _as_values(b, "b")
    if a.size != b.size:
        raise InvalidArgumentError(f"paired values need equal lengths, got {a.size} and {b.size}")
    _check_confidence(confidence)
    diffs = a - b
    mean = float(diffs.mean())
    result = {"n": int(diffs.size), "mean_diff": mean, "ci_low": math.nan, "ci_high": math.nan,
              "confidence": confidence, "t": math.nan, "dof": math.nan, "p": math.nan}
    if diffs.size < 2:
        return result
    dof = diffs.size - 1
    se = float(diffs.std(ddof=1) / math.sqrt(diffs.size))
    result["dof"] = float(dof)
    if se == 0.0:
        return result
    low, high = _t_interval(mean, se, dof, confidence)
    t = mean / se
    result.update(ci_low=low, ci_high=high, t=t, p=float(2.0 * scipy_stats.t.sf(abs(t), dof)))
    return result


def holm(pvalues):
    """Holm-Bonferroni adjusted p-values (same order as given; NaN entries are left out of the count)."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(p.shape, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[index]))
        adjusted[index] = running
    return [float(value) for value in adjusted]


def finite_or_none(value):
    """NaN / inf -> None (JSON null); everything else unchanged. Recurses into dicts and lists."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
