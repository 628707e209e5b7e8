"""Each figure a user reads, checked against a value computed another way (issue: every figure is
checked by a test that fails when the figure is wrong): the exact-match scorer, bench-diff's
median / bootstrap interval / U-test p-value, the two peak-RSS sources, the learning-rate schedule
(by formula, against transformers' schedules, as torch's and MLX's optimizers hold it) and the
fairness check on the LR each backend applied, and the busy-machine verdict."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.run_context import BackendRun
from ftcore.config import Batching, RunConfig
from ftcore.inputs.batches import Batches
from ftcore.measure.stats import EXACT_LIMIT, compare_runs
from ftcore.measure.stats import u_test_p as mann_whitney_p
from ftcore.result import RunResult
from ftcore.run.bench_diff import summarise

pytestmark = pytest.mark.unit

EOS = 2

# ----------------------------------------------------------------------------- exact match


def _scored(answers: list[list[int]], outputs: list[list[int]]) -> tuple[float, list[int]]:
    """EvalSchedule's exact-match accuracy of `outputs` (what greedy decoding returned) against
    `answers` (each ending with EOS); and the token budgets the generator was given."""
    n, width = len(answers), max(map(len, answers))
    ids = np.full((n, width), -1)
    for i, a in enumerate(answers):
        ids[i, : len(a)] = a
    batches = Batches(train={}, eval=[], mode=Batching.LONGEST, stats={"eos_id": EOS}, answers={
        "prompt_ids": np.arange(n)[:, None] + 10, "prompt_len": np.ones(n, int),
        "answer_ids": ids, "answer_len": np.array([len(a) for a in answers])})
    asked = []

    def generate(prompt, budget, eos):
        assert eos == EOS
        asked.append(budget)
        return outputs[prompt[0] - 10]

    run = BackendRun("t", "torch", RunConfig(), Path("."), batches, Path("."), result=RunResult(backend="t"))
    q = EvalSchedule(run, lambda: None, generate)
    q.before()
    return q.result.accuracy_before, asked


def test_exact_match_needs_the_answer_then_eos_and_nothing_else() -> None:
    ans = [5, 6, 7, EOS]
    assert _scored([ans], [[5, 6, 7, EOS]]) == (1.0, [4])  # budget: the answer's length, EOS too
    assert _scored([ans], [[5, 6, 7, 9]])[0] == 0.0  # no EOS: trailing text follows
    assert _scored([ans], [[5, 6, 7]])[0] == 0.0  # stopped short of EOS
    assert _scored([ans], [[5, 6, EOS]])[0] == 0.0  # EOS one token early
    assert _scored([[EOS]], [[EOS]])[0] == 1.0  # an empty answer is just EOS
    four = [[5, EOS], [6, EOS], [7, 8, EOS], [9, EOS]]
    assert _scored(four, [[5, EOS], [6, 3], [7, 8, EOS], [9]])[0] == 0.5


# ----------------------------------------------------------------------------- bench-diff


def _u_pvalue_by_pairs(a: list[float], b: list[float]) -> float:
    """Two-sided exact p of U = #(a < b) + #(a == b) / 2 over every split of the pooled values:
    counted pair by pair (not from rank sums, as benchdiff does)."""
    pooled, n = a + b, len(a)

    def u(x, y):
        return sum((p < q) + 0.5 * (p == q) for p in x for q in y)

    centre = n * len(b) / 2
    seen = abs(u(a, b) - centre)
    splits = [(list(c), [pooled[i] for i in range(len(pooled)) if i not in c])
              for c in itertools.combinations(range(len(pooled)), n)]
    return sum(abs(u([pooled[i] for i in x], y) - centre) >= seen - 1e-9 for x, y in splits) / len(splits)


@pytest.mark.parametrize("a, b", [([2.0, 3.0, 4.0, 1.0], [6.0, 5.0, 6.0, 7.0]),
                                  ([1.0, 2.0, 2.0, 3.0, 5.0], [2.0, 3.0, 4.0, 5.0]),  # ties
                                  ([1.0, 4.0, 2.0, 6.0], [3.0, 5.0, 7.0, 8.0, 9.0])])
def test_u_test_exact_p_equals_pairwise_count(a, b) -> None:
    assert mann_whitney_p(a, b) == pytest.approx(_u_pvalue_by_pairs(a, b), abs=1e-12)


def test_u_test_normal_approximation_matches_a_permutation_test() -> None:
    # 10 vs 10 with ties: C(20, 10) = 184756 > EXACT_LIMIT, so the normal approximation answers
    a = [1.0, 2, 2, 3, 4, 5, 5, 6, 7, 9]
    b = [3.0, 4, 5, 6, 6, 7, 8, 8, 9, 10]
    assert math.comb(20, 10) > EXACT_LIMIT
    rng = np.random.default_rng(0)
    pooled = np.array(a + b)
    ranks = np.argsort(np.argsort(pooled, kind="stable"), kind="stable")  # tie-broken ranks
    avg = np.array([ranks[pooled == v].mean() for v in pooled])  # average ranks over ties
    perms = np.argsort(rng.random((20000, 20)), axis=1)[:, :10]
    sums = avg[perms].sum(1)
    centre = 10 * 19 / 2
    exact = np.mean(np.abs(sums - centre) >= abs(avg[:10].sum() - centre) - 1e-9)  # ~0.02
    assert 0.005 < exact < 0.1
    assert mann_whitney_p(a, b) == pytest.approx(exact, abs=0.01)  # +-0.003 Monte Carlo


def test_summary_is_the_median_of_run_medians() -> None:
    # run medians 2, 3, 4, 1 -> 2.5 (run means: 11, 3, 19, 1); 6, 5, 6, 13 -> 6 (their mean: 7.5)
    base = [[1, 2, 30], [2, 3, 4], [3, 4, 50], [1, 1, 1]]
    head = [[5, 6, 7], [4, 5, 60], [6, 6, 6], [5, 13, 100]]
    s = summarise(base, head, 0.10)
    assert s["base_run_medians_s"] == [2, 3, 4, 1] and s["head_run_medians_s"] == [6, 5, 6, 13]
    assert (s["base_step_s"], s["head_step_s"], s["ratio"]) == (2.5, 6.0, 2.4)
    assert s["p_value"] == pytest.approx(2 / 70)  # complete separation, 4 vs 4
    assert s["verdict"] == "slower"


def _interval(runs_a, runs_b) -> tuple[float, float]:
    s = compare_runs(runs_a, runs_b)
    return s.ci_low, s.ci_high


def test_bootstrap_interval_by_hand() -> None:
    """BASE is 1.0 in every step. HEAD's runs are steady at 1..5: the median of 5 runs drawn
    with replacement is <= 1 with P = 0.058 and <= 4 with P = 0.942, so the 95% interval is
    [1, 5]. HEAD's runs [1, 1, 10]: a resampled run's median is 10 with P = 7/27, the median
    of 5 such runs with P = 0.113, so [1, 10]; without resampling the steps it would be [1, 1]."""
    ones = [[1.0] * 3] * 5
    assert _interval(ones, [[float(k)] * 3 for k in range(1, 6)]) == (1.0, 5.0)
    assert _interval(ones, [[1.0, 1.0, 10.0]] * 5) == (1.0, 10.0)


# ----------------------------------------------------------------------------- peak RSS

MB = 2**20


def test_the_two_peak_rss_sources_agree_in_one_run() -> None:
    """The kernel's high-water mark (VmHWM, KiB) and psutil's RSS (bytes), both in MB, over one
    block that holds 200 MB then frees 300 MB the sampler never sees: the block's peak is
    the high-water mark's, within 20% of a sample taken while the 200 MB were held."""
    from ftcore.measure.rss import PeakRSS, current_rss_mb, reset_rss_high_water, rss_high_water_mb

    if not reset_rss_high_water():
        pytest.skip("no /proc/self/clear_refs: the high-water mark cannot be reset here")
    held = np.ones(200 * MB // 8)  # touched: 200 MB resident
    now, hwm = current_rss_mb(), rss_high_water_mb()
    assert now <= hwm * 1.01 and hwm <= now * 1.2, (now, hwm)  # same unit: 1024x shows
    with PeakRSS(interval_s=60.0) as rss:  # samples: at entry, the thread's first, at exit
        time.sleep(0.2)  # the thread's first sample is taken: none until exit
        spike = np.ones(300 * MB // 8)
        spike_mb = current_rss_mb()
        del spike
    del held
    assert rss.samples == 3 and rss.sampled_peak_mb < spike_mb - 250  # the sampler missed it
    assert spike_mb * 0.98 <= rss.peak_mb <= spike_mb * 1.2, (rss.peak_mb, spike_mb)


# ----------------------------------------------------------------------------- busy verdict


def test_busy_verdict_at_its_limits() -> None:
    from ftcore.measure.machine_load import (
        BUSY_OTHER_CORES,
        BUSY_STEAL_FRACTION,
        MIN_WINDOW_S,
        judge,
    )

    def rec(other=0.0, steal=0.0, wall=1.0):
        return judge({"wall_s": wall, "cores": 2, "other_cores": other, "steal_fraction": steal})

    assert rec()["busy"] is False and rec()["reason"] is None
    assert rec(other=BUSY_OTHER_CORES)["busy"] is False
    assert rec(other=BUSY_OTHER_CORES + 0.01)["busy"] is True
    assert "kept 0.26 of 2 cores" in rec(other=0.26)["reason"]
    assert rec(steal=BUSY_STEAL_FRACTION)["busy"] is False
    assert rec(steal=BUSY_STEAL_FRACTION + 0.01)["busy"] is True
    assert "stole 11%" in rec(steal=0.11)["reason"]
    short = rec(other=1.5, wall=MIN_WINDOW_S * 0.9)
    assert short["busy"] is None and "too short" in short["reason"]
