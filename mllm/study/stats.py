"""Statistics over a cross-validated study: per-fold figures, t-intervals over folds and a bootstrap over reviews
stratified by fold, paired between two models, Holm over a family and an equivalence reading.

    values = [0.61, 0.58, 0.63]                          # one macro-F1 per fold
    t_interval(values)                                   # (mean, low, high), folds - 1 degrees of freedom
    c = compare(labels, preds_a, preds_b, k)             # lists of per-fold arrays (same reviews for a and b)
    c.point, c.boot_ci, c.p_boot, c.mde, reading(c, margin=0.05)

The review bootstrap resamples each fold's test reviews with replacement (the same resample for both models),
recomputes each fold's macro-F1 difference and averages over folds: reviews are the unit and every trained model is
held fixed. The hierarchical bootstrap resamples folds, then the trained models of a reference with several seeds,
then reviews: it counts the variance between fine-tunings (Bouthillier et al. 2021), and the verdicts read it. The
t-interval treats the folds as the unit (3 folds: 2 degrees of freedom, wide by design). None accounts for the
training-set overlap between folds, which makes the fold-to-fold spread optimistic (Nadeau & Bengio 2003), and
resampling 3 folds understates their spread by a factor (J - 1) / J in variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm.evaluation.metrics import bootstrap_p, macro_f1, resampled_scores
from mllm.evaluation.selection import difference_word, margin_words

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


def corrected_t(values: list[float] | np.ndarray, test_train: float, confidence: float = 0.95
                ) -> tuple[float, float, float, float]:
    """(mean, low, high, two-sided p of mean 0) of the corrected resampled t-test (Nadeau & Bengio 2003): the
    variance of the mean over J folds is (1/J + n_test/n_train) s^2 instead of s^2 / J, because the folds' training
    sets overlap; J - 1 degrees of freedom."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    se = float(np.sqrt((1 / len(v) + test_train) * v.var(ddof=1)))
    if se == 0:
        return mean, mean, mean, 1.0 if mean == 0 else 0.0
    half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * se)
    return mean, mean - half, mean + half, float(2 * t.sf(abs(mean) / se, len(v) - 1))


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


def hierarchical_bootstrap(labels: list[np.ndarray], preds_a: list[list[np.ndarray]],
                           preds_b: list[list[np.ndarray]], num_labels: int, samples: int = 10_000, seed: int = 0
                           ) -> np.ndarray:
    """(samples,) resampled mean-over-folds macro-F1 difference A - B that counts training variance: each resample
    draws the folds with replacement, within each drawn fold A's and B's trained models (seeds) with replacement,
    and the fold's test reviews with replacement (the same reviews for A and B). A merge is one model per fold (its
    members change with the fold); a reference trained at several seeds is several."""
    rng = np.random.default_rng(seed)
    folds = len(labels)

    def scores(models: list[list[np.ndarray]]) -> np.ndarray:  # (folds, seeds, samples) on shared review resamples
        return np.stack([np.stack([resampled_scores(y, p, num_labels, index)[1] for p in per]) for y, per, index in
                         zip(labels, models, indexes, strict=True)])

    indexes = [rng.integers(0, len(y), size=(samples, len(y))) for y in labels]
    fa, fb = scores(preds_a), scores(preds_b)
    drawn = rng.integers(0, folds, size=(samples, folds))  # folds drawn per resample
    column = np.broadcast_to(np.arange(samples)[:, None], (samples, folds))  # each fold's own review resample
    seeds_a = rng.integers(0, fa.shape[1], size=(samples, folds, fa.shape[1]))
    seeds_b = rng.integers(0, fb.shape[1], size=(samples, folds, fb.shape[1]))
    a = fa[drawn[..., None], seeds_a, column[..., None]].mean(-1)
    b = fb[drawn[..., None], seeds_b, column[..., None]].mean(-1)
    return (a - b).mean(1)


@dataclass(frozen=True)
class Comparison:
    """Model A minus model B, macro-F1 on test. The verdict reads the training-variance interval (`hier_*`: folds,
    seeds and reviews resampled); the review-only bootstrap (`boot_*`: each trained model fixed) is shown beside it."""

    per_fold: list[float]
    point: float  # mean of the per-fold differences (a reference at several seeds: its mean)
    t_ci: tuple[float, float]  # 95%, folds - 1 degrees of freedom
    p_t: float
    boot_ci: tuple[float, float]  # 95% percentile, reviews resampled within folds, models fixed
    boot_ci90: tuple[float, float]
    p_boot: float  # two-sided, reviews only
    se: float  # review-only bootstrap standard error of the point
    mde: float  # smallest true difference detected with 80% power at 5% (two-sided): 2.8 SE, training variance counted
    hier_ci: tuple[float, float] = (float("nan"), float("nan"))  # 95%, folds -> seeds -> reviews
    hier_ci90: tuple[float, float] = (float("nan"), float("nan"))
    p_hier: float = float("nan")  # two-sided
    se_hier: float = float("nan")
    nb_ci: tuple[float, float] = (float("nan"), float("nan"))  # 95% corrected resampled t (Nadeau & Bengio)
    nb_ci90: tuple[float, float] = (float("nan"), float("nan"))
    p_nb: float = float("nan")

    @property
    def train_ci(self) -> tuple[float, float]:
        """The 95% interval with training variance the verdicts read: the hull of the hierarchical bootstrap and
        the corrected fold t-interval (3 folds are too few for either alone to be trusted)."""
        return _hull(self.hier_ci, self.nb_ci)

    @property
    def train_ci90(self) -> tuple[float, float]:
        """Its 90% counterpart: two one-sided 5% tests of equivalence."""
        return _hull(self.hier_ci90, self.nb_ci90)

    @property
    def p_train(self) -> float:
        """Two-sided p of no difference: the larger of the two tests'."""
        found = [x for x in (self.p_hier, self.p_nb) if np.isfinite(x)]
        return max(found) if found else float("nan")


def _hull(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    lows = [x for x in (a[0], b[0]) if np.isfinite(x)]
    highs = [x for x in (a[1], b[1]) if np.isfinite(x)]
    return (min(lows) if lows else float("nan"), max(highs) if highs else float("nan"))


def _two_sided_p(d: np.ndarray) -> float:
    return min(1.0, 2 * bootstrap_p(int(min((d <= 0).sum(), (d >= 0).sum())), len(d)))


def compare(labels: list[np.ndarray], preds_a: list[np.ndarray] | list[list[np.ndarray]],
            preds_b: list[np.ndarray] | list[list[np.ndarray]], num_labels: int, samples: int = 10_000,
            seed: int = 0, test_train: float = 0.0) -> Comparison:
    """A against B over the folds; per fold one prediction array, or a list of them (a model trained at several
    seeds: the fold's value is their mean, and the review-only bootstrap uses the first). `test_train`: test rows
    over training rows of a fold, for the corrected t (0: the plain fold t)."""
    many_a = [p if isinstance(p, list) else [p] for p in preds_a]
    many_b = [p if isinstance(p, list) else [p] for p in preds_b]
    per_fold = [float(np.mean([macro_f1(y, a, num_labels) for a in pa]) - np.mean([macro_f1(y, b, num_labels)
                                                                                   for b in pb]))
                for y, pa, pb in zip(labels, many_a, many_b, strict=True)]
    mean, lo, hi = t_interval(per_fold)
    d = fold_bootstrap(labels, [p[0] for p in many_a], num_labels, samples, seed, against=[p[0] for p in many_b])
    h = hierarchical_bootstrap(labels, many_a, many_b, num_labels, samples, seed + 1)
    se_h = float(h.std(ddof=1))
    _, n_lo, n_hi, p_nb = corrected_t(per_fold, test_train)
    _, n5, n95, _ = corrected_t(per_fold, test_train, 0.90)
    se_nb = (n_hi - n_lo) / 2 / 1.96 if np.isfinite(n_hi) else float("nan")  # on the normal scale, for the MDE
    return Comparison([float(x) for x in per_fold], mean, (lo, hi), t_test_p(per_fold),
                      _pct(d, 2.5, 97.5), _pct(d, 5, 95), _two_sided_p(d), float(d.std(ddof=1)),
                      Z_POWER * float(np.nanmax([se_h, se_nb])), _pct(h, 2.5, 97.5), _pct(h, 5, 95),
                      _two_sided_p(h), se_h, (n_lo, n_hi), (n5, n95), p_nb)


def _pct(d: np.ndarray, low: float, high: float) -> tuple[float, float]:
    lo, hi = np.percentile(d, [low, high])
    return float(lo), float(hi)


def reading(c: Comparison, margin: float, p_adjusted: float, alpha: float = 0.05) -> str:
    """Plain words for a comparison, in the report's vocabulary (`mllm.evaluation.selection`): the difference test
    (Holm-adjusted training-variance p), then the margin reading of the 90% training-variance interval (equivalence
    by two one-sided tests)."""
    return f"{difference_word(c.point, p_adjusted, alpha)}; {margin_words(*c.train_ci90, margin)}"
