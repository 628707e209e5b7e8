"""The compare's verdict from repeated runs (ftcore.report.verdict on ftcore.measure.stats), in
process, on run results made up with known step times: its three outcomes and their lines, BUSY
runs left out, non-determinism said, rows as medians with their spread, the adaptive schedule."""

from __future__ import annotations

import numpy as np
import pytest

from ftcore.measure.stats import compare_runs, outcome, smallest_runs_for, u_test_p
from ftcore.report import build_comparison, format_short
from ftcore.report.verdict import build_verdict, line, nondeterminism
from ftcore.run.compare import Schedule, labels_for

pytestmark = pytest.mark.unit


def run(step_s: float, seed: int, rss: float = 500.0, busy: bool = False, losses=(2.0, 1.0, 0.5),
        steps: int = 12, jitter: float = 0.02) -> dict:
    """A result dict as a backend's child writes it: one untimed warm-up step, then `steps`."""
    rng = np.random.default_rng(seed)
    times = [10 * step_s] + list(step_s * (1 + jitter * rng.standard_normal(steps)))
    return {"backend": "x", "status": "ok", "config": {"timing_warmup_steps": 1}, "step_times_s": times,
            "train_time_s": sum(times[1:]), "peak_rss_mb": rss, "losses": list(losses),
            "machine_load": {"busy": busy, "reason": "other processes kept 1.5 of 2 cores busy" if busy else None}}


def runs(step_s: float, n: int, seed: int = 0, spread: float = 0.0, **kw) -> list[dict]:
    """n runs whose medians are step_s x (1 - spread ... 1 + spread), evenly."""
    factors = np.linspace(1 - spread, 1 + spread, n) if n > 1 else [1.0]
    return [run(step_s * f, seed + i, **kw) for i, f in enumerate(factors)]


def test_outcome_reads_the_interval_against_the_5_percent_band() -> None:
    assert outcome(1.06, 1.30) == outcome(0.70, 0.94) == "decided"
    assert outcome(0.96, 1.04) == "no_clear_difference"
    assert outcome(0.90, 1.10) == outcome(1.02, 1.20) == outcome(None, None) == "undecided"


def test_u_test_and_the_fewest_runs_that_can_be_significant() -> None:
    assert u_test_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)  # 2 / C(6, 3)
    assert u_test_p([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(2 / 70)
    assert smallest_runs_for(0.05) == 4 and smallest_runs_for(0.002) == 7  # 2/C(14,7) = 5.8e-4


def test_a_clearly_slower_backend_is_named_with_its_interval() -> None:
    torch, mlx = runs(0.040, 3, spread=0.03), runs(0.030, 3, seed=10, spread=0.03)
    v = build_verdict({"torch": torch, "mlx": mlx}, "torch")
    s = v["speed"]
    assert s["outcome"] == "decided" and s["winner"] == "mlx" and s["pair"] == ["torch", "mlx"]
    assert s["ratio"] == pytest.approx(0.040 / 0.030, rel=0.03)  # B's speed over A's
    assert 1.05 < s["ci_low"] < s["ratio"] < s["ci_high"] and s["runs"] == {"torch": 3, "mlx": 3}
    assert line(s) == (f"Faster: mlx, {s['ratio']:.2f}x torch's speed (95% CI {s['ci_low']:.2f}-"
                       f"{s['ci_high']:.2f}, 3 runs each, p=0.1)")
    # the same runs the other way round: the winner is the reference, the line says it the same way
    w = build_verdict({"mlx": mlx, "torch": torch}, "mlx")["speed"]
    assert w["winner"] == "mlx" and w["ratio"] == pytest.approx(1 / s["ratio"])
    assert line(w).startswith(f"Faster: mlx, {s['ratio']:.2f}x torch's speed (95% CI ")  # drawn afresh


def test_equal_backends_are_no_clear_difference_and_noisy_ones_undecided() -> None:
    same = build_verdict({"torch": runs(0.040, 6, jitter=0.002), "torch#2": runs(0.0401, 6, seed=20, jitter=0.002)},
                         "torch")["speed"]
    assert same["outcome"] == "no_clear_difference" and same["winner"] is None
    assert 0.95 <= same["ci_low"] <= same["ci_high"] <= 1.05
    assert line(same).startswith("No clear speed difference: torch#2/torch 1.00x (95% CI ")
    assert line(same).endswith(", 6 runs each)")
    noisy = build_verdict({"torch": runs(0.040, 3, spread=0.2), "mlx": runs(0.036, 3, seed=5, spread=0.2)},
                          "torch")["speed"]
    assert noisy["outcome"] == "undecided" and noisy["winner"] is None
    assert noisy["ci_low"] < 1.05 < noisy["ci_high"]
    assert noisy["suggested_repeats"] > 3
    assert line(noisy) == (f"Speed undecided after 3 runs each: mlx/torch {noisy['ratio']:.2f}x (95% CI "
                           f"{noisy['ci_low']:.2f}-{noisy['ci_high']:.2f}); --repeats "
                           f"{noisy['suggested_repeats']} to decide")


def test_memory_verdict_reads_peak_rss_per_run() -> None:
    v = build_verdict({"torch": runs(0.04, 3, rss=500.0), "mlx": runs(0.04, 3, seed=9, rss=100.0)}, "torch")
    m = v["memory"]
    assert m["outcome"] == "decided" and m["winner"] == "mlx" and m["ratio"] == pytest.approx(5.0)
    assert line(m).startswith("Less peak RSS: mlx, 5.00x below torch (95% CI 5.00-5.00, 3 runs each, p=")


def test_busy_runs_are_left_out_and_counted() -> None:
    """A BUSY run 3x slower would make the verdict undecided; left out, the quiet runs decide."""
    torch = [*runs(0.040, 3, spread=0.02), run(0.120, 99, busy=True)]
    mlx = runs(0.030, 3, seed=10, spread=0.02)
    s = build_verdict({"torch": torch, "mlx": mlx}, "torch")["speed"]
    assert s["runs"] == {"torch": 3, "mlx": 3} and s["busy_left_out"] == {"torch": 1, "mlx": 0}
    assert s["outcome"] == "decided" and line(s).endswith("p=0.1; 1 BUSY run left out)")
    counted = build_verdict({"torch": [*torch[:3], {**torch[3], "machine_load": {"busy": False}}], "mlx": mlx},
                            "torch")["speed"]
    assert counted["ci_high"] > s["ci_high"]  # the same run, counted, widens the interval


def test_repeats_that_differ_are_said_never_averaged() -> None:
    a = runs(0.04, 3)
    assert nondeterminism({"torch": a}) == []
    a[2] = {**a[2], "losses": [2.0, 1.0, 0.5000003]}
    said = nondeterminism({"torch": a})
    assert len(said) == 1 and said[0].startswith("non-deterministic: torch's repeats differ")
    assert "run 3 vs run 1: losses (largest loss gap 3.00e-07 at step 3)" in said[0]


def test_rows_show_the_median_and_spread_of_the_quiet_runs() -> None:
    torch = [run(0.040, 0, rss=500), run(0.050, 1, rss=520), run(0.045, 2, rss=510), run(0.4, 3, busy=True)]
    mlx = runs(0.030, 3, seed=10, rss=100)
    c = build_comparison([torch[0], {**mlx[0], "backend": "mlx"}], repeats=[torch, mlx])
    row = c["rows"][0]
    times = sorted(r["train_time_s"] for r in torch[:3])
    assert row["train_time_s"] == times[1] and row["spread"]["train_time_s"] == [times[0], times[2]]
    assert row["peak_rss_mb"] == 510 and row["runs"] == 3 and row["busy_runs"] == 1
    assert row["machine_busy"] is False  # the figures are the quiet runs'
    assert c["verdict"]["repeats"]["x"][3]["busy"] is True and len(c["verdict"]["repeats"]["mlx"]) == 3
    assert c["results"][0]["train_time_s"] == torch[0]["train_time_s"]  # results stay as each run wrote them
    text = format_short(c)
    assert f"{times[1]:.2f} ({times[0]:.2f}-{times[2]:.2f})" in text
    assert text.splitlines()[1].startswith("Faster: mlx, ")


def test_compare_runs_interval_is_seeded_and_two_level() -> None:
    a, b = [[1.0, 1.0, 1.0]] * 4, [[1.0, 1.0, 2.0]] * 4
    assert compare_runs(a, b) == compare_runs(a, b)  # the same answer for the same runs
    s = compare_runs(a, b)
    assert s.ratio == 1.0 and s.ci_high == 2.0  # only resampling the steps within a run sees 2.0


def test_schedule_minimum_budget_and_early_stop() -> None:
    quiet = {"torch": runs(0.04, 3, spread=0.2), "mlx": runs(0.036, 3, seed=5, spread=0.2)}  # undecided
    adaptive = Schedule(None, time_budget_s=45)
    assert adaptive.another_round({k: v[:2] for k, v in quiet.items()}, 2, 100.0, 20.0)  # minimum first
    assert adaptive.another_round(quiet, 3, 20.0, 10.0)  # undecided, a round fits
    assert not adaptive.another_round(quiet, 3, 40.0, 10.0)  # undecided, no round fits
    decided = {"torch": runs(0.04, 3, spread=0.02), "mlx": runs(0.03, 3, seed=5, spread=0.02)}
    assert not adaptive.another_round(decided, 3, 1.0, 1.0)
    busy = {**decided, "torch": [*decided["torch"][:2], run(0.04, 7, busy=True)]}
    assert adaptive.another_round(busy, 3, 1.0, 1.0)  # a BUSY run is made up for
    fixed, five = Schedule(5, time_budget_s=45), {"torch": runs(0.04, 5), "mlx": runs(0.03, 5, seed=5)}
    assert fixed.another_round({k: v[:4] for k, v in five.items()}, 4, 100.0, 10.0)  # as asked, budget or not
    assert not fixed.another_round(five, 5, 1.0, 1.0)
    assert fixed.another_round({**five, "mlx": [*five["mlx"][:4], run(0.03, 8, busy=True)]}, 5, 1.0, 1.0)
    failed = {**decided, "mlx": [*decided["mlx"][:2], {**decided["mlx"][2], "status": "failed"}]}
    assert not adaptive.another_round(failed, 1, 0.0, 0.0)
    assert not adaptive.another_round({"torch": runs(0.04, 1)}, 1, 0.0, 0.0)  # one backend: one run
    assert labels_for(["torch", "mlx", "torch"]) == ["torch", "mlx", "torch#2"]


def test_a_run_s_speed_is_its_timed_steps_only() -> None:
    """Compilation steps (`--timing-warmup-steps`) are left out: 5 slow first steps, 4 timed."""
    from ftcore.report.verdict import run_figures

    r = {**run(0.01, 0), "config": {"timing_warmup_steps": 5}, "step_times_s": [1.0] * 5 + [0.01] * 4}
    assert run_figures(r)["median_step_s"] == 0.01
    s = build_verdict({"torch": [r] * 3, "mlx": [{**r, "step_times_s": [1.0] * 5 + [0.02] * 4}] * 3}, "torch")["speed"]
    assert s["ratio"] == pytest.approx(0.5) and s["winner"] == "torch"
