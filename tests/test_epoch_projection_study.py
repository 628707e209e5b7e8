"""The epoch projection checked against an epoch that really runs (a study: ~6 minutes on 2 cores,
`pytest tests/test_epoch_projection_study.py --study`).

At TinyLlama's width with 2 layers (218M parameters) on 64 records of Alpaca's lengths, batch 4,
--max-seq-len 512: a short compare (3 runs a backend of 4 steps, 3 timed) projects one epoch of
the 64 records (16 steps, widths 33 to 513); a second compare trains that epoch (--epochs 1) and
measures it. Each backend's measured epoch (the sum of its step times, warm-up included) must lie
inside the interval the short compare projected. Run it on a quiet machine: another process taking
a core between the two compares moves the measured epoch, not the projection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.study]

SIZE = ["--preset", "tinyllama-1.1b", "--num-layers", "2", "--data", "builtin:alpaca-lengths",
        "--num-samples", "64", "--max-seq-len", "512", "--eval-samples", "0",
        "--no-eval-generate", "--backends", "torch,mlx"]  # fmt: skip


def compare(out: Path, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "ftcore", "compare", *SIZE, *args, "--out", str(out)],
                         capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads((out / "comparison.json").read_text())


def test_a_measured_epoch_lies_inside_the_interval_projected_from_a_short_run(tmp_path) -> None:
    short = compare(tmp_path / "short", "--steps", "4", "--repeats", "3", "--project-records", "64")
    epoch = compare(tmp_path / "epoch", "--epochs", "1", "--repeats", "1")
    report = {}
    for projected, measured in zip(short["rows"], epoch["results"], strict=True):
        assert projected["epoch_records"] == 64 and projected["epoch_steps"] == 16
        assert measured["steps"] == 16  # the whole epoch ran
        seconds = sum(measured["step_times_s"])
        low, high = projected["epoch_time_ci_s"]
        report[projected["backend"]] = (round(seconds, 1), round(low, 1),
                                        round(projected["epoch_time_s"], 1), round(high, 1))
        print(f"{projected['backend']}: measured {seconds:.1f} s, projected "
              f"{projected['epoch_time_s']:.1f} s (95% CI {low:.1f}-{high:.1f}), "
              f"{projected['epoch_method']}")
    for backend, (seconds, low, _point, high) in report.items():
        assert low <= seconds <= high, (backend, report)
