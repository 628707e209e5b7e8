"""Is B faster (or leaner) than A? The statistics of repeated runs, shared by `ftcore compare` (its
verdict) and `ftcore bench-diff` (two revisions).

The unit of replication is one run: a fresh process. Each run gives one figure per side: the median
of its timed step times (speed), or its peak RSS (memory: one value per run). For two sides A and B:

- ratio    = median of B's run figures / median of A's;
- interval = 95% percentile interval of that ratio from a two-level bootstrap (resample the runs,
             then the values within each resampled run: steps vary within a run, runs vary more);
- p-value  = two-sided Mann-Whitney U test on the run figures: scipy.stats.mannwhitneyu, exact
             when no two figures tie; with ties, scipy.stats.permutation_test of |U - nm/2| over
             every arrangement while there are at most EXACT_LIMIT, else the tie-corrected normal
             approximation.

The outcome of a ratio is read from its interval alone, against a band of +-BAND around 1:
"decided" when the interval lies wholly outside 1 +- BAND, "no_clear_difference" when it lies
wholly inside, else "undecided" (more runs may decide it). The anchors: asv `continuous` (U test
and a factor), Google benchmark's compare.py (U test), pyperf `compare_to` ("not significant").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05  # significance level of the U test (bench-diff's "slower" needs p < ALPHA)
BAND = 0.05  # ratios inside 1 +- BAND are "no clear difference"
BOOTSTRAP = 2000  # bootstrap draws
EXACT_LIMIT = 20000  # most arrangements of tied ranks the permutation test enumerates exactly

OUTCOMES = ("decided", "no_clear_difference", "undecided")


@dataclass(frozen=True)
class RatioStats:
    """B over A from per-run samples: ratio, its 95% interval (None with fewer than two runs on a
    side: no spread between runs to resample), the U test's p-value, the runs behind each side."""

    ratio: float
    ci_low: float | None
    ci_high: float | None
    p_value: float
    runs_a: int
    runs_b: int

    def inverted(self) -> RatioStats:
        """A over B: the same comparison read the other way round."""
        flip = lambda x: None if x is None else 1 / x  # noqa: E731
        return RatioStats(1 / self.ratio, flip(self.ci_high), flip(self.ci_low), self.p_value,
                          self.runs_b, self.runs_a)

    @property
    def outcome(self) -> str:
        return outcome(self.ci_low, self.ci_high)


def outcome(ci_low: float | None, ci_high: float | None, band: float = BAND) -> str:
    """"decided" (interval wholly outside 1 +- band), "no_clear_difference" (wholly inside) or
    "undecided" (it straddles an edge, or there is no interval)."""
    if ci_low is None or ci_high is None:
        return "undecided"
    if ci_low > 1 + band or ci_high < 1 - band:
        return "decided"
    if ci_low >= 1 - band and ci_high <= 1 + band:
        return "no_clear_difference"
    return "undecided"


def u_test_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test of two samples (1.0 when either is empty or
    every value is the same)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0:
        return 1.0
    pooled = np.concatenate([a, b])
    if np.all(pooled == pooled[0]):
        return 1.0
    if len(np.unique(pooled)) == len(pooled):
        return float(stats.mannwhitneyu(a, b, alternative="two-sided", method="exact").pvalue)
    if math.comb(len(pooled), len(a)) <= EXACT_LIMIT:  # ties, few arrangements: all of them
        return float(stats.permutation_test((a, b), _u_distance, permutation_type="independent",
                                            alternative="greater", n_resamples=EXACT_LIMIT,
                                            vectorized=True).pvalue)
    return float(stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue)


def _u_distance(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """|U - n m / 2| of x against y along `axis` (ties: average ranks): how far from "no
    difference" an arrangement is, whichever side is larger."""
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    n, m = x.shape[-1], y.shape[-1]
    ranks = stats.rankdata(np.concatenate([x, y], axis=-1), axis=-1)
    u = ranks[..., :n].sum(axis=-1) - n * (n + 1) / 2
    return np.abs(u - n * m / 2)


def _bootstrap_medians(runs: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """(draws,) medians of run medians: runs (R, S) resampled with replacement, then the S values
    of each resampled run."""
    r, s = runs.shape
    picked = rng.integers(0, r, (draws, r))  # which runs
    within = rng.integers(0, s, (draws, r, s))  # which values of each picked run
    resampled = runs[picked[:, :, None], within]  # (draws, R, S)
    return np.median(np.median(resampled, axis=2), axis=1)


def _as_matrix(runs: Sequence[Sequence[float]]) -> np.ndarray:
    """Runs of equal length as an (R, S) array; unequal ones are cut to the shortest (a run that
    stopped early still counts, with its first values)."""
    s = min(len(r) for r in runs)
    if s == 0:
        raise ValueError("a run without values")
    return np.array([list(r)[:s] for r in runs], dtype=float)


def compare_runs(runs_a: Sequence[Sequence[float]], runs_b: Sequence[Sequence[float]],
                 seed: int = 0, draws: int = BOOTSTRAP) -> RatioStats:
    """B over A, each side a list of runs, each run its values (step times, or one peak RSS)."""
    if not runs_a or not runs_b:
        raise ValueError("each side needs at least one run")
    a, b = _as_matrix(runs_a), _as_matrix(runs_b)
    med_a, med_b = np.median(a, axis=1), np.median(b, axis=1)
    ratio = float(np.median(med_b) / np.median(med_a))
    lo = hi = None
    if len(a) >= 2 and len(b) >= 2:
        rng = np.random.default_rng(seed)
        ratios = _bootstrap_medians(b, rng, draws) / _bootstrap_medians(a, rng, draws)
        lo, hi = (float(x) for x in np.percentile(ratios, [2.5, 97.5]))
    return RatioStats(ratio, lo, hi, u_test_p(med_a, med_b), len(a), len(b))


def smallest_runs_for(alpha: float = ALPHA) -> int:
    """The fewest runs per side (equal sides) at which the exact two-sided U test can reach
    p < alpha at all: complete separation gives p = 2 / C(2n, n)."""
    n = 1
    while 2 / math.comb(2 * n, n) >= alpha:
        n += 1
    return n
