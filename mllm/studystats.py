"""Statistics over a cross-validated study: per-fold figures, t-intervals over folds and a bootstrap over reviews
stratified by fold, paired between two models, Holm over a family and an equivalence reading.

    values = [0.61, 0.58, 0.63]                          # one macro-F1 per fold
    t_interval(values)                                   # (mean, low, high), folds - 1 degrees of freedom
    c = compare(labels, preds_a, preds_b, k)             # lists of per-fold arrays (same reviews for a and b)
    c.point, c.boot_ci, c.p_boot, c.mde, reading(c, margin=0.05)

The bootstrap resamples each fold's test reviews with replacement (the same resample for both models), recomputes
each fold's macro-F1 difference and averages over folds: the study's estimate, with reviews as the unit. The
t-interval treats the folds as the unit (3 folds: 2 degrees of freedom, wide by design). Neither accounts for the
training-set overlap between folds, which makes the fold-to-fold spread optimistic (Nadeau & Bengio 2003).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm.metrics import bootstrap_p, macro_f1, resampled_scores

Z_POWER = 2.8016  # z(0.975) + z(0.80): a two-sided 5% test detects a true difference of 2.8 SE with 80% power


def t_interval(values: list[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of Student's t-interval over the values (NaN bounds for fewer than two)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def t_test_p(values: list[float] | np.ndarray) -> float:
    """Two-sided one-sample t-test p-value of mean zero (1.0 when every value is 0, NaN for one value)."""
    from scipy.stats import ttest_1samp

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    if np.allclose(v, v[0]):
        return 1.0 if v[0] == 0 else 0.0
    return float(ttest_1samp(v, 0.0).pvalue)


def fold_bootstrap(labels: list[np.ndarray], preds: list[np.ndarray], num_labels: int, samples: int = 10_000,
                   seed: int = 0, against: list[np.ndarray] | None = None) -> np.ndarray:
    """(samples,) resampled mean-over-folds macro-F1 of `preds` (minus that of `against`, on the same resampled
    reviews, when given); each fold's reviews are resampled within the fold."""
    rng = np.random.default_rng(seed)
    total = np.zeros(samples)
    for f, (y, p) in enumerate(zip(labels, preds, strict=True)):
        for start in range(0, samples, 500):
            index = rng.integers(0, len(y), size=(min(500, samples - start), len(y)))
            value = resampled_scores(y, p, num_labels, index)[1]
            if against is not None:
                value = value - resampled_scores(y, against[f], num_labels, index)[1]
            total[start:start + len(index)] += value
    return total / len(labels)


@dataclass(frozen=True)
class Comparison:
    """Model A minus model B, macro-F1 on test."""

    per_fold: list[float]
    point: float  # mean of the per-fold differences
    t_ci: tuple[float, float]  # 95%, folds - 1 degrees of freedom
    p_t: float
    boot_ci: tuple[float, float]  # 95% percentile, reviews resampled within folds
    boot_ci90: tuple[float, float]  # 90%: two one-sided 5% tests of equivalence
    p_boot: float  # two-sided
    se: float  # bootstrap standard error of the point
    mde: float  # smallest true difference detected with 80% power at 5% (two-sided): 2.8 SE


def compare(labels: list[np.ndarray], preds_a: list[np.ndarray], preds_b: list[np.ndarray], num_labels: int,
            samples: int = 10_000, seed: int = 0) -> Comparison:
    per_fold = [macro_f1(y, a, num_labels) - macro_f1(y, b, num_labels)
                for y, a, b in zip(labels, preds_a, preds_b, strict=True)]
    mean, lo, hi = t_interval(per_fold)
    d = fold_bootstrap(labels, preds_a, num_labels, samples, seed, against=preds_b)
    b_lo, b_hi = np.percentile(d, [2.5, 97.5])
    b5, b95 = np.percentile(d, [5, 95])
    p = min(1.0, 2 * bootstrap_p(int(min((d <= 0).sum(), (d >= 0).sum())), len(d)))
    se = float(d.std(ddof=1))
    return Comparison([float(x) for x in per_fold], mean, (lo, hi), t_test_p(per_fold), (float(b_lo), float(b_hi)),
                      (float(b5), float(b95)), p, se, Z_POWER * se)


def reading(c: Comparison, margin: float, p_adjusted: float, alpha: float = 0.05) -> str:
    """Plain words for a comparison: the difference test (Holm-adjusted bootstrap p), then equivalence within
    +-margin by two one-sided tests (the 90% bootstrap interval inside the margin)."""
    lo, hi = c.boot_ci90
    if p_adjusted < alpha:
        first = "better" if c.point > 0 else "worse"
    else:
        first = "no significant difference"
    if lo > margin:
        second = f"better by more than {margin:g}"
    elif hi < -margin:
        second = f"worse by more than {margin:g}"
    elif -margin < lo and hi < margin:
        second = f"equivalent within +-{margin:g}"
    elif lo > -margin:
        second = f"not worse by {margin:g} (non-inferior)"
    elif hi < margin:
        second = f"not better by {margin:g}, possibly worse by up to {-lo:.3f}"
    else:
        second = f"inconclusive: the interval reaches past both -{margin:g} and +{margin:g}"
    return f"{first}; {second}"
