"""`ftcore compare`'s verdict end to end: repeated, interleaved runs of real backend processes.

- A backend slowed on purpose by 1.3x a step is named slower, its interval beyond 1.05: the slow
  step comes from tests/slow_child/sitecustomize.py, a hook that exists only under the test suite
  (on the children's PYTHONPATH with FTCORE_TEST_SLOW_STEPS; a user's run never has it).
- The same backend twice (`--backends mlx,mlx`; the study: `torch,torch`, an A/A run) is never
  "decided".
- The repeats of a backend trained on the same batches give identical losses (no warning).

CI runs one compare of each. The studies (10 compares each: how often the verdict is right) run
with `pytest tests/test_compare_repeats.py --study` (~10 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOW_HOOK = Path(__file__).resolve().parent / "slow_child"
# a short fine-tune without evals: ~1.5 s an mlx process, ~6 s a torch one here (most of it imports)
SHORT = ["--steps", "16", "--eval-samples", "0", "--no-eval-generate"]
SLOWDOWN = 1.3
BAND = 1.05


def compare(out: Path, backends: str, *args, slow: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`ftcore compare` in a child process; `slow` = the label whose steps take SLOWDOWN x as long."""
    env = dict(os.environ)
    if slow:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SLOW_HOOK), env.get("PYTHONPATH")]))
        env["FTCORE_TEST_SLOW_STEPS"] = f"{SLOWDOWN}:{slow}"
    res = subprocess.run([sys.executable, "-m", "ftcore", "compare", "--backends", backends, *SHORT, *map(str, args),
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return res, json.loads((out / "comparison.json").read_text())


def slowed_is_named_slower(comparison: dict) -> bool:
    speed = comparison["verdict"]["speed"]
    # pair [mlx, mlx#2]; ratio = mlx#2's speed / mlx's: about 1/1.3
    return speed["outcome"] == "decided" and speed["winner"] == "mlx" and speed["ci_high"] < 1 / BAND


def test_slowed_backend_is_named_slower_and_repeats_agree(tmp_path) -> None:
    res, c = compare(tmp_path / "slow", "mlx,mlx", "--time-budget-s", 60, slow="mlx#2")
    speed = c["verdict"]["speed"]
    assert speed["pair"] == ["mlx", "mlx#2"] and slowed_is_named_slower(c), speed
    assert 1 / speed["ratio"] == pytest.approx(SLOWDOWN, rel=0.15), speed
    lo, hi = 1 / speed["ci_high"], 1 / speed["ci_low"]
    runs = speed["runs"]["mlx"]
    said = f"Faster: mlx, {1 / speed['ratio']:.2f}x mlx#2's speed (95% CI {lo:.2f}-{hi:.2f}, "
    assert said in res.stdout.replace("\n", " "), res.stdout
    # every run a fresh process with its own folder; the first where a single run writes it
    rounds = c["schedule"]["rounds"]
    assert rounds >= 3 and runs <= rounds
    for label in ("mlx", "mlx#2"):
        firsts = json.loads((tmp_path / "slow" / label / "result.json").read_text())
        assert firsts["backend"] == "mlx"
        for k in range(2, rounds + 1):
            again = json.loads((tmp_path / "slow" / label / "repeats" / str(k) / "result.json").read_text())
            assert again["losses"] == firsts["losses"], (label, k)  # same batches, seed, threads
        assert len(c["verdict"]["repeats"][label]) == rounds
    assert c["verdict"]["nondeterministic"] == [] and "non-deterministic" not in res.stdout


def test_same_backend_twice_is_never_decided(tmp_path) -> None:
    """The A/A mechanics with mlx (its processes start in ~1.5 s; torch,torch is the study's)."""
    res, c = compare(tmp_path / "aa", "mlx,mlx", "--time-budget-s", 0)
    speed = c["verdict"]["speed"]
    assert c["backends"] == ["mlx", "mlx#2"] and speed["pair"] == ["mlx", "mlx#2"]
    assert speed["runs"]["mlx"] + speed["busy_left_out"]["mlx"] == 3  # each run quiet or left out
    assert speed["outcome"] in ("no_clear_difference", "undecided"), speed
    assert c["schedule"]["rounds"] == 3
    for label in ("mlx", "mlx#2"):  # the first run where a single run writes it, run k under repeats/k
        assert [json.loads((tmp_path / "aa" / label / f / "result.json").read_text())["backend"]
                for f in ("", "repeats/2", "repeats/3")] == ["mlx"] * 3
    first = res.stdout.splitlines()[1]
    assert first.startswith(("No clear speed difference: mlx#2/mlx ", "Speed undecided after ")), res.stdout
    assert c["verdict"]["nondeterministic"] == []


# ----------------------------------------------------------------------------- studies (--study)

STUDY_COMPARES = 10


@pytest.mark.study
def test_study_slowed_backend_is_named_slower_9_of_10(tmp_path) -> None:
    named = [slowed_is_named_slower(compare(tmp_path / str(i), "mlx,mlx", "--time-budget-s", 60, slow="mlx#2")[1])
             for i in range(STUDY_COMPARES)]
    print(f"study: slowed backend named slower in {sum(named)} of {STUDY_COMPARES} compares")
    assert sum(named) >= STUDY_COMPARES - 1, named


@pytest.mark.study
def test_study_same_backend_twice_is_not_decided_9_of_10(tmp_path) -> None:
    outcomes = [compare(tmp_path / str(i), "torch,torch")[1]["verdict"]["speed"]["outcome"]
                for i in range(STUDY_COMPARES)]
    print(f"study: torch,torch outcomes {outcomes}")
    assert sum(o == "decided" for o in outcomes) <= 1, outcomes
