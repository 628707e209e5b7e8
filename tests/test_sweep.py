"""`ftcore sweep` end to end: real compares at two depths of the tiny preset (a few steps each).

- An ok sweep: sweep.json's points carry their comparison.json's speed verdict and medians, the
  model's size, the schedule; every point folder holds its full compare; the PNG is written; the
  printed table has a row a point; exit 0.
- A point that fails (tests/slow_child/sitecustomize.py makes the children under one point's
  folder fail) is recorded as failed, the sweep goes on to the next point, and exits 1.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ftcore.inputs.arch import read_arch
from ftcore.measure.memory_model import base_param_count
from ftcore.report.sweep_report import params_text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOOK = Path(__file__).resolve().parent / "slow_child"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sweep(out: Path, *args, fail: str | None = None) -> subprocess.CompletedProcess:
    """`ftcore sweep --preset tiny --layers 1,2 --steps 3 ARGS` in a child process; `fail`: the
    point folder whose backend processes fail."""
    env = dict(os.environ)
    if fail:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK), env.get("PYTHONPATH")]))
        env["FTCORE_TEST_FAIL_STEPS"] = fail
    cmd = [sys.executable, "-m", "ftcore", "sweep", "--preset", "tiny", "--layers", "1,2",
           "--steps", "3", *map(str, args), "--out", str(out)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def ok_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "run"
    return sweep(out), out


def test_sweep_json_holds_each_point_s_verdict_and_size(ok_sweep, tiny_model_dir):
    res, out = ok_sweep
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] and record["planned"] == ["tiny-L1", "tiny-L2"]
    assert record["labels"] == ["torch", "mlx"]
    assert record["schedule"] == {"repeats": 2, "time_budget_s": 0.0, "steps": 3,
                                  "timing_warmup_steps": 1, "eval_samples": 0,
                                  "eval_generate": False}  # fmt: skip
    arch = read_arch(tiny_model_dir)
    for p, layers in zip(record["points"], (1, 2), strict=True):
        c = json.loads((out / p["folder"] / "comparison.json").read_text())
        assert p["status"] == "ok" and p["errors"] == [] and p["layers"] == layers
        assert p["speed"] == c["verdict"]["speed"] and p["speed"]["pair"] == ["torch", "mlx"]
        assert c["schedule"]["repeats"] == 2 and c["config"]["num_layers"] == layers
        assert c["config"]["steps"] == 3 and c["config"]["eval_samples"] == 0
        assert p["width"] == arch["hidden_size"] == 128
        assert p["params"] == base_param_count({**arch, "num_hidden_layers": layers})
        for label, runs in c["verdict"]["repeats"].items():
            used = [r["median_step_s"] for r in runs if not r["busy"]] or [r["median_step_s"] for r in runs]
            assert p["median_step_s"][label] == statistics.median(used)
        for name in ("torch", "mlx"):  # the point's full compare: both runs of each backend
            assert (out / p["folder"] / name / "result.json").is_file()
            assert (out / p["folder"] / name / "repeats" / "2" / "result.json").is_file()
        assert (out / p["folder"] / "report.md").is_file()
    assert record["points"][1]["params"] > record["points"][0]["params"]
    png = (out / "speedup_vs_size.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    assert json.loads((out / "status.json").read_text())["status"] == "complete"


def test_sweep_prints_a_row_a_point_and_the_crossover(ok_sweep):
    res, out = ok_sweep
    record = json.loads((out / "sweep.json").read_text())
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["layers", "width", "params"] and "mlx/torch [95% CI]" in lines[0]
    for row, p in zip(lines[2:4], record["points"], strict=True):
        assert row.split()[:3] == [str(p["layers"]), "128", params_text(p["params"])]
        ratio = p["speed"]["ratio"]  # None when every run of a side was BUSY
        assert (f"{ratio:.2f}" if ratio is not None else "n/a") in row
        assert f"{p['median_step_s']['torch']:.3f}" in row and f"{p['median_step_s']['mlx']:.3f}" in row
    assert f"Across sizes: {record['crossover']}" in lines


def test_a_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    """mlx twice (its processes start in ~1.5 s); every run under tiny-L1 fails at its first step."""
    out = tmp_path / "run"
    res = sweep(out, "--backends", "mlx,mlx", fail="tiny-L1")
    assert res.returncode == 1, res.stderr[-2000:]
    record = json.loads((out / "sweep.json").read_text())
    first, second = record["points"]
    assert first["status"] == "failed" and "FTCORE_TEST_FAIL_STEPS=tiny-L1" in first["errors"][0]
    assert first["speed"] is None and first["rounds"] == 1  # a failed run ends that point's rounds
    assert first["median_step_s"] == {"mlx": None, "mlx#2": None}  # no step ran
    assert second["status"] == "ok" and second["speed"]["pair"] == ["mlx", "mlx#2"]
    assert second["rounds"] == 2 and set(second["median_step_s"]) == {"mlx", "mlx#2"}
    assert (out / "tiny-L2" / "mlx#2" / "repeats" / "2" / "result.json").is_file()
    assert record["complete"] and "failed at 1 layers x 128" in record["crossover"]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: point tiny-L1 failed: mlx failed")
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
