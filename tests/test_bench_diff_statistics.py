"""bench-diff's statistics and the step gate's protocol, in process."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ftcore.measure.stats import compare_runs
from ftcore.measure.stats import u_test_p as mann_whitney_p
from ftcore.process.step_gate import GATE_ENV, StepGate
from ftcore.run.bench_diff import summarise

pytestmark = pytest.mark.unit


def test_exact_u_test_p_values() -> None:
    # complete separation of 5 vs 5: 2 of the C(10, 5) = 252 arrangements are as extreme
    assert mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    # one swap: U = 1, 4 arrangements on each side as extreme or more
    assert mann_whitney_p([1, 2, 3, 4, 6], [5, 7, 8, 9, 10]) == pytest.approx(4 / 252)
    assert mann_whitney_p([1, 2, 3], [1, 2, 3]) == 1.0
    # 3 vs 3 can never reach p < 0.05 (2 / 20): bench-diff needs at least 4 runs a side
    assert mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)


def test_normal_approximation_for_large_samples() -> None:
    rng = np.random.default_rng(0)
    a = list(rng.normal(0, 1, 40))
    assert mann_whitney_p(a, [x + 2 for x in a]) < 1e-6
    assert mann_whitney_p(a, list(rng.normal(0, 1, 40))) > 0.05


def runs(step_s: float, n: int = 5, steps: int = 10, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return [list(step_s * (1 + 0.02 * rng.standard_normal(steps))) for _ in range(n)]


def test_verdicts_need_size_and_significance() -> None:
    base = runs(0.020)
    assert summarise(base, runs(0.030, seed=1), 0.10)["verdict"] == "slower"
    assert summarise(base, runs(0.013, seed=1), 0.10)["verdict"] == "faster"
    assert summarise(base, runs(0.0205, seed=1), 0.10)["verdict"] == "same"  # significant, small
    noisy = [[0.02], [0.04], [0.021], [0.05], [0.019]]
    assert summarise(noisy, [[0.03], [0.02], [0.05], [0.022], [0.045]], 0.10)["verdict"] == "same"
    three = summarise(runs(0.02, n=3), runs(0.04, n=3, seed=1), 0.10)
    assert three["ratio"] > 1.9 and three["verdict"] == "same"  # 3 runs a side cannot be significant


def test_ratio_interval_covers_the_ratio() -> None:
    s = compare_runs(runs(0.020), runs(0.030, seed=1))
    lo, hi = s.ci_low, s.ci_high
    assert 1.4 < lo < 1.5 < hi < 1.6


def test_step_gate_protocol() -> None:
    go_read, go_write = os.pipe()
    done_read, done_write = os.pipe()
    gate = StepGate({GATE_ENV: f"{go_read},{done_write}"})
    assert gate.active and not StepGate({}).active
    os.write(go_write, b"go\n")
    gate.before(0)
    gate.after(0, 1.5)
    assert os.read(done_read, 100) == b"0 1.5\n"
    os.close(go_write)  # the parent is gone: the child stops instead of training on
    with pytest.raises(RuntimeError, match="expected 'go' before step 1"):
        gate.before(1)
    StepGate({}).before(0)  # no gate: nothing to wait for
