"""`ftcore compare`: the main job, end to end through the CLI and the runner."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import ftcore

from ftcore.config import RunConfig
from ftcore.runner import compare, prepare

pytestmark = pytest.mark.integration

TABLE_ROWS = ("Training time (s)", "Peak RSS (MB)", "Final loss", "Eval loss", "Speedup factor", "Memory efficiency", "Tokens/s", "MFU")


@pytest.fixture(scope="module")
def default_compare(tmp_path_factory):
    """The issue's check: torch vs mlx on the tiny preset, 20 fp32 steps, built-in data."""
    out = tmp_path_factory.mktemp("compare") / "run"
    res = ftcore("compare", "--backends", "torch,mlx", "--preset", "tiny", "--steps", "20", "--precision", "fp32", "--out", out, timeout=600)
    return res, out


def test_compare_prints_table_and_writes_files(default_compare):
    res, out = default_compare
    assert res.returncode == 0, res.stderr[-2000:]
    header = next(line for line in res.stdout.splitlines() if line.startswith("| Backend"))
    assert "torch" in header and "mlx" in header
    for row in TABLE_ROWS:
        assert f"| {row}" in res.stdout, row
    for f in ("report.md", "comparison.json", "loss_curves.png", "throughput.png", "memory.png", "torch/result.json", "mlx/result.json"):
        assert (out / f).is_file(), f
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "Speedup" in report and "torch" in report and "mlx" in report


def test_compare_loss_difference_below_1e4(default_compare):
    res, out = default_compare
    comparison = json.loads((out / "comparison.json").read_text())
    diff = comparison["loss_diff"]["max_abs_diff"]
    assert 0 <= diff < 1e-4, diff
    assert f"{diff:.3e}" in res.stdout  # the printed table says it too
    assert comparison["all_fair"] is True
    rows = {r["backend"]: r for r in comparison["rows"]}
    assert rows["torch"]["speedup"] == pytest.approx(1.0)
    t, m = rows["torch"], rows["mlx"]
    assert m["speedup"] == pytest.approx(t["train_time_s"] / m["train_time_s"], rel=1e-6)
    assert m["memory_efficiency"] == pytest.approx(t["peak_rss_mb"] / m["peak_rss_mb"], rel=1e-6)


def test_compare_local_sentencepiece_checkpoint_and_alpaca_hf(tmp_path, sentencepiece_model_dir, write_alpaca, alpaca_records):
    data = write_alpaca(tmp_path / "alpaca_hf", alpaca_records, "hf")
    out = tmp_path / "run"
    res = ftcore(
        "compare", "--backends", "torch,mlx", "--model", sentencepiece_model_dir, "--data", data,
        "--num-samples", 16, "--eval-samples", 4, "--batch-size", 2, "--max-seq-len", 96, "--steps", 4, "--out", out,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["ok_backends"] == ["torch", "mlx"]
    assert comparison["loss_diff"]["max_abs_diff"] < 1e-4
    assert json.loads((out / "torch" / "result.json").read_text())["config"]["model"] == str(sentencepiece_model_dir)


def test_a_failed_backend_is_a_row_and_the_others_still_report(tmp_path, small_cfg):
    prep = prepare(small_cfg, tmp_path)

    def kill_mlx(name, proc):
        if name == "mlx":
            proc.send_signal(signal.SIGKILL)

    comparison = compare(["torch", "mlx"], prep, tmp_path, on_start=kill_mlx)
    assert comparison["ok_backends"] == ["torch"] and comparison["failed_backends"] == ["mlx"]
    rows = {r["backend"]: r for r in comparison["rows"]}
    assert rows["mlx"]["status"] == "failed" and "killed by SIGKILL" in rows["mlx"]["error"]
    assert rows["torch"]["status"] == "ok" and rows["torch"]["final_loss"] is not None
    assert (tmp_path / "report.md").is_file() and (tmp_path / "loss_curves.png").is_file()


def test_fairness_mismatch_is_shown(tmp_path, small_cfg):
    """Two runs on different batches: the report must say so instead of comparing silently."""
    from ftcore.report import build_comparison

    a = prepare(small_cfg, tmp_path / "a")
    b = prepare(RunConfig.from_dict({**small_cfg.to_dict(), "seed": 1}), tmp_path / "b")
    from ftcore.runner import run_backend

    results = [run_backend("torch", a, tmp_path / "a" / "torch").to_dict(), run_backend("torch", b, tmp_path / "b" / "torch").to_dict()]
    results[1]["backend"] = "torch-seed1"
    checks = {c["check"]: c for c in build_comparison(results)["fairness"]}
    assert checks["batch_fingerprint"]["ok"] is False
    assert checks["initial_adapter_fingerprint"]["ok"] is False
