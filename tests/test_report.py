"""Tests for ftcore.report: derived figures, fairness, loss diff, table and written files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ftcore import report

pytestmark = pytest.mark.unit

CONFIG = {
    "preset": "tiny", "model": None, "data": None, "num_samples": 64, "max_seq_len": 128,
    "batch_size": 4, "steps": 5, "precision": "fp32", "device": "cpu", "seed": 0, "lr": 1e-3,
    "lr_schedule": "cosine", "warmup_steps": 2, "weight_decay": 0.0, "adam_beta1": 0.9,
    "adam_beta2": 0.999, "adam_eps": 1e-8, "lora_rank": 8, "lora_alpha": 16.0,
    "lora_dropout": 0.0, "lora_targets": ["q_proj", "v_proj"],
}  # fmt: skip
# CONFIG's cosine schedule, steps 0..4: warm-up lr/3, 2lr/3, then lr * (1 + cos(pi * k / 3)) / 2
LRS = [1e-3 / 3, 2e-3 / 3, 1e-3, 0.75e-3, 0.25e-3]


def _ok(backend: str, losses: list[float], train: float, rss: float, tps: float, **kw) -> dict:
    r = {
        "backend": backend, "status": "ok", "error": None, "config": dict(CONFIG),
        "env": {"cpu": "AMD EPYC 9R14", "logical_cores": 2, "python": "3.11.2",
                "versions": {"torch": "2.13.0", "mlx": "0.32.4"}, "git_commit": "abc1234"},
        "load_time_s": 1.5, "train_time_s": train, "warmup_time_s": 0.4,
        "step_times_s": [train / 4] * 4, "steps": len(losses), "tokens_per_s": tps,
        "loss_tokens_per_s": tps / 3, "losses": losses, "final_loss": losses[-1],
        "eval_loss": losses[-1] + 0.05, "peak_rss_mb": rss, "baseline_rss_mb": rss * 0.7,
        "framework_peak_mb": None, "trainable_params": 1_126_400, "flops_per_token": 6.6e9,
        "fine_tune": "lora", "grad_accum": 1,
        "mfu": 0.123, "batch_fingerprint": "a" * 64, "fed_batches_fingerprint": "d" * 16,
        "initial_adapter_fingerprint": "b" * 64,
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8,
                      "weight_decay_per_tensor": {"model.layers.0.self_attn.q_proj.lora_A": 0.0,
                                                  "model.layers.0.self_attn.q_proj.lora_B": 0.0},
                      "bias_correction": True, "max_grad_norm": None, "lr_per_step": LRS},
        "precision": "fp32", "blas": "mkl", "threads": 2, "extra": {},
    }  # fmt: skip
    r.update(kw)
    return r


FAILED = {
    "backend": "mlx-lm", "status": "failed",
    "error": "Traceback (most recent call last):\n  File x\nRuntimeError: mlx-lm exploded at step 3",
    "config": dict(CONFIG), "env": {}, "load_time_s": None, "train_time_s": None,
    "warmup_time_s": None, "step_times_s": [], "steps": 0, "tokens_per_s": None,
    "loss_tokens_per_s": None, "losses": [], "final_loss": None, "eval_loss": None,
    "peak_rss_mb": None, "baseline_rss_mb": None, "framework_peak_mb": None,
    "trainable_params": None, "flops_per_token": None, "mfu": None, "batch_fingerprint": None,
    "fed_batches_fingerprint": None, "initial_adapter_fingerprint": None, "optimizer": None, "precision": None, "blas": None,
    "threads": None, "extra": {},
}  # fmt: skip

TORCH_LOSSES = [2.5, 2.3, 2.1, 1.95, 1.8]
MLX_LOSSES = [2.5, 2.30001, 2.10004, 1.95002, 1.80001]  # largest diff 4e-5 at step 3


@pytest.fixture
def results() -> list[dict]:
    return [
        _ok("torch", TORCH_LOSSES, train=10.0, rss=2000.0, tps=400.0),
        _ok("mlx", MLX_LOSSES, train=8.0, rss=1600.0, tps=500.0, framework_peak_mb=900.0,
            blas="openblas (/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3)"),
        copy.deepcopy(FAILED),
    ]  # fmt: skip


def _row(comp: dict, name: str) -> dict:
    return next(r for r in comp["rows"] if r["backend"] == name)


def test_derived_ratios(results):
    comp = report.build_comparison(results)
    assert comp["reference"] == "torch"
    assert _row(comp, "torch")["speedup"] == pytest.approx(1.0)
    assert _row(comp, "mlx")["speedup"] == pytest.approx(10.0 / 8.0)
    assert _row(comp, "mlx")["memory_efficiency"] == pytest.approx(2000.0 / 1600.0)
    assert _row(comp, "mlx")["tokens_per_s_ratio"] == pytest.approx(500.0 / 400.0)
    assert _row(comp, "mlx-lm")["speedup"] is None
    assert comp["failed_backends"] == ["mlx-lm"]
    # another reference flips the ratios; a failed reference falls back to the first ok one
    comp = report.build_comparison(results, reference="mlx")
    assert _row(comp, "torch")["speedup"] == pytest.approx(0.8)
    comp = report.build_comparison(results, reference="mlx-lm")
    assert comp["reference"] == "torch" and comp["reference_note"]


def test_max_loss_diff(results):
    d = report.max_loss_diff(results)
    assert d["max_abs_diff"] == pytest.approx(4e-5, rel=1e-6)
    assert d["pair"] == ["torch", "mlx"]
    assert d["step"] == 3 and d["index"] == 2
    assert d["vs_reference"]["mlx"]["max_rel_diff"] == pytest.approx(4e-5 / 2.1, rel=1e-5)
    assert report.max_loss_diff(results[:1]) is None
    assert report.max_loss_diff([results[0], results[2]]) is None  # only one ok row


def test_max_loss_diff_three_backends(results):
    third = _ok("hf-trainer", [2.5, 2.3, 2.1, 1.95, 1.9], train=12.0, rss=2100.0, tps=330.0)
    d = report.max_loss_diff(results + [third])
    assert d["max_abs_diff"] == pytest.approx(0.1)
    assert d["pair"] == ["torch", "hf-trainer"] and d["step"] == 5
    assert len(d["pairs"]) == 3


def test_fairness_pass_and_mismatch(results):
    checks = report.fairness_checks(results)
    assert {c["check"] for c in checks} >= {
        "batch_fingerprint", "fed_batches", "initial_adapter_fingerprint", "trainable_params",
        "optimizer", "precision", "threads", "config",
    }  # fmt: skip
    assert all(c["ok"] for c in checks), checks  # the failed row is not compared

    bad = copy.deepcopy(results)
    bad[1]["batch_fingerprint"] = "c" * 64
    bad[1]["optimizer"]["bias_correction"] = False
    bad[1]["config"]["lr"] = 2e-3
    by = {c["check"]: c for c in report.fairness_checks(bad)}
    assert not by["batch_fingerprint"]["ok"]
    assert (
        "torch=" in by["batch_fingerprint"]["detail"]
        and "mlx=" in by["batch_fingerprint"]["detail"]
    )
    assert not by["optimizer"]["ok"] and "bias_correction" in by["optimizer"]["detail"]
    assert not by["config"]["ok"] and "lr" in by["config"]["detail"]
    assert by["precision"]["ok"]
    comp = report.build_comparison(bad)
    assert comp["all_fair"] is False
    assert "MISMATCH" in report.format_table(comp)


def test_fairness_tolerates_float32_rounding_and_flags_missing(results):
    r = copy.deepcopy(results)
    r[1]["optimizer"]["lr_per_step"][2] = 0.0010000000474974513  # 1e-3 read from a float32
    r[1]["optimizer"]["name"] = "mlx.optimizers.AdamW"
    by = {c["check"]: c for c in report.fairness_checks(r)}
    assert by["optimizer"]["ok"] and by["lr_schedule"]["ok"], (by["optimizer"], by["lr_schedule"])
    r[1]["threads"] = None
    by = {c["check"]: c for c in report.fairness_checks(r)}
    assert not by["threads"]["ok"] and by["threads"]["status"] == "missing"


def test_grad_accum_is_compared_and_as_asked(results):
    """RunResult.grad_accum (the micro-batches a backend's loop ran per step): alike across the
    backends and equal to the config's --grad-accum; one edited result is a mismatch naming it."""
    r = copy.deepcopy(results)
    for row in r[:2]:
        row["config"]["grad_accum"] = row["grad_accum"] = 2
    assert {c["check"]: c for c in report.fairness_checks(r)}["grad_accum"]["ok"]
    r[1]["grad_accum"] = 1  # mlx ran one batch a step
    check = {c["check"]: c for c in report.fairness_checks(r)}["grad_accum"]
    assert not check["ok"] and check["status"] == "mismatch" and "mlx=1" in check["detail"], check
    r[0]["grad_accum"] = 1  # both ran 1, asked 2: alike, and still not as asked
    check = {c["check"]: c for c in report.fairness_checks(r)}["grad_accum"]
    assert not check["ok"] and check["detail"] == "torch ran 1, asked 2; mlx ran 1, asked 2", check
    r[0]["grad_accum"] = r[1]["grad_accum"] = 0  # RunResult's default: not recorded
    assert {c["check"]: c for c in report.fairness_checks(r)}["grad_accum"]["status"] == "missing"


def test_weight_decay_is_compared_per_tensor(results):
    """Both asked for 0.05, one decays lora_B only: a mismatch naming the tensor; the optimizer's
    other settings still agree. A backend that recorded no per-tensor decay is not a pass."""
    r = copy.deepcopy(results)
    keys = list(r[0]["optimizer"]["weight_decay_per_tensor"])  # q_proj's lora_A, lora_B
    r[0]["optimizer"]["weight_decay_per_tensor"] = dict.fromkeys(keys, 0.05)
    r[1]["optimizer"]["weight_decay_per_tensor"] = {keys[0]: 0.0, keys[1]: 0.05}
    by = {c["check"]: c for c in report.fairness_checks(r)}
    assert by["optimizer"]["ok"]
    assert not by["weight_decay"]["ok"] and by["weight_decay"]["status"] == "mismatch"
    assert by["weight_decay"]["detail"] == (
        "mlx: 1 of 2 tensors differ from torch, e.g. model.layers.0.self_attn.q_proj.lora_A torch=0.05 mlx=0.0"
    )
    r[1]["optimizer"]["weight_decay_per_tensor"] = dict.fromkeys(keys, 0.05)
    assert {c["check"]: c for c in report.fairness_checks(r)}["weight_decay"]["ok"]
    del r[1]["optimizer"]["weight_decay_per_tensor"]
    assert {c["check"]: c for c in report.fairness_checks(r)}["weight_decay"]["status"] == "missing"


def test_table_has_rows_columns_and_error(results):
    comp = report.build_comparison(results)
    text = report.format_table(comp)
    for label, _ in report.TABLE_ROWS:
        assert label in text
    for name in ("torch", "mlx", "mlx-lm"):
        assert name in text.splitlines()[3]  # header row, under the headline and the grid's top
    assert "mlx-lm exploded at step 3" in text
    assert "1.25x" in text and "1.00x" in text  # speedup
    assert "4.000e-05 (torch vs mlx, step 3)" in text
    assert "PASS" in text and "FAILED" in text
    # the headline says which backend did not run ok, with its error's last line
    assert text.splitlines()[0] == "NOT OK - mlx-lm failed: RuntimeError: mlx-lm exploded at step 3"
    assert "padding included" in text and "real tokens/s the non-pad tokens" in text
    # grid: every table line has the same width
    grid = [ln for ln in text.splitlines() if ln.startswith(("+", "|"))]
    assert len({len(ln) for ln in grid}) == 1
    assert grid[2].startswith("+=")


def test_none_fields_render_na(results):
    comp = report.build_comparison(results)
    text = report.format_table(comp)
    framework_line = next(ln for ln in text.splitlines() if ln.startswith("| Framework peak"))
    cells = [c.strip() for c in framework_line.strip("|").split("|")]
    assert cells == ["Framework peak (MB)", "n/a", "900.0", "n/a"]
    speed_line = next(ln for ln in text.splitlines() if ln.startswith("| Speedup factor"))
    assert speed_line.rstrip(" |").endswith("n/a")
    # an ok row with every optional figure None must not crash either
    sparse = _ok("torch", [float("nan"), 2.0], 1.0, 1.0, 1.0)
    for key in (
        "train_time_s",
        "peak_rss_mb",
        "baseline_rss_mb",
        "tokens_per_s",
        "loss_tokens_per_s",
        "mfu",
        "eval_loss",
        "trainable_params",
        "threads",
        "blas",
        "load_time_s",
        "warmup_time_s",
        "final_loss",
        "env",
    ):
        sparse[key] = None
    comp = report.build_comparison([sparse, _ok("mlx", [2.1, 2.0], 1.0, 1.0, 1.0)])
    assert "n/a" in report.format_table(comp)
    assert comp["loss_diff"]["max_abs_diff"] == pytest.approx(0.0)  # the NaN step is skipped
    json.dumps(comp, allow_nan=False)  # strict JSON: NaN became null


def test_write_report_files(results, tmp_path: Path):
    comp = report.build_comparison(results)
    paths = report.write_report(comp, tmp_path / "out")
    assert set(paths) == {"report", "comparison", "loss_curves", "throughput", "memory"}
    md = paths["report"].read_text()
    assert "| Training time (s) |" in md and "| Backend | torch | mlx | mlx-lm |" in md
    assert "mlx-lm exploded at step 3" in md and "AMD EPYC 9R14" in md and "abc1234" in md
    data = json.loads(paths["comparison"].read_text())
    for key in ("rows", "fairness", "loss_diff", "environment", "config", "results", "reference"):
        assert key in data
    assert data["rows"][1]["speedup"] == pytest.approx(1.25)
    for key in ("loss_curves", "throughput", "memory"):
        blob = paths[key].read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(blob) > 10_000
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_write_report_with_no_ok_backend(tmp_path: Path):
    comp = report.build_comparison([copy.deepcopy(FAILED)])
    assert comp["reference"] is None and comp["loss_diff"] is None
    text = report.format_table(comp)
    assert "n/a (fewer than 2 successful backends)" in text
    paths = report.write_report(comp, tmp_path)
    assert all(p.exists() for p in paths.values())


def test_runresult_defaults_are_not_figures(results, tmp_path: Path):
    # RunResult.failed() leaves 0.0 / "" / 0 defaults, not None: they must not show as measurements
    failed = {k: (0.0 if isinstance(v, float) or v is None else v) for k, v in FAILED.items()}
    failed.update(batch_fingerprint="", initial_adapter_fingerprint="", blas="", threads=0,
                  trainable_params=0, optimizer={}, precision="", error="error: boom")  # fmt: skip
    rows = [results[0], results[1], failed]
    comp = report.build_comparison(rows)
    assert _row(comp, "mlx-lm")["train_time_s"] is None
    text = report.format_table(comp)
    time_line = next(ln for ln in text.splitlines() if ln.startswith("| Training time"))
    assert time_line.rstrip(" |").endswith("n/a")
    assert "error: boom" in text
    # an ok row whose fingerprint was left empty cannot be verified
    rows[1] = {**results[1], "batch_fingerprint": ""}
    by = {c["check"]: c for c in report.fairness_checks(rows)}
    assert by["batch_fingerprint"]["status"] == "missing" and not by["batch_fingerprint"]["ok"]
    # a zero reference time gives no ratio rather than 0x or a ZeroDivisionError
    rows[0] = {**results[0], "train_time_s": 0.0}
    assert _row(report.build_comparison(rows), "mlx")["speedup"] is None
    report.write_report(comp, tmp_path)


def test_backend_notes_and_warnings_are_reported(results, tmp_path: Path):
    """Every line of a result's notes and warnings is printed as
    "<backend>: <line>", in the table and in report.md; a backend that says nothing gets no line."""
    notes = [
        "numerics differ: Adam: no bias correction",
        "threads: rows split over 2 streams; 1.95 threads busy over the timed steps",
    ]
    warnings = ["WARNING: MLX is using the reference BLAS"]
    results[1].update(notes=notes, warnings=warnings, cpu_busy_threads=1.954)
    results[1]["extra"] = {"cpu_streams": 2}  # extra's keys are figures, not notes
    comp = report.build_comparison(results)
    table = report.format_table(comp)
    name = results[1]["backend"]
    expected = [f"{name}: {line}" for line in notes + warnings]
    said = [
        ln for ln in table.splitlines() if ln.startswith(tuple(f"{r['backend']}: " for r in results))
    ]
    assert said == expected  # each line once, notes then warnings, none for the other backends
    paths = report.write_report(comp, tmp_path)
    md = paths["report"].read_text()
    for line in expected:
        assert line in md


def test_quality_rows_drop_accuracy_and_greedy_agreement(results):
    """Eval loss drop = 1 - after/before; exact match before -> after; greedy agreement counts the
    records whose answer token lists are identical to the reference's (not just equal length)."""
    t, m = results[0], results[1]
    t.update(eval_loss_before=4.0, eval_loss=1.0, accuracy_before=0.0, accuracy_after=0.75,
             generations={"after": [[5, 2], [6, 7, 2], [8, 2], [9, 2]]})  # fmt: skip
    m.update(eval_loss_before=4.0, eval_loss=1.2, accuracy_before=0.25, accuracy_after=0.5,
             generations={"after": [[5, 2], [6, 8, 2], [8, 2], [9]]})  # fmt: skip
    comp = report.build_comparison(results)
    assert _row(comp, "torch")["eval_loss_drop"] == pytest.approx(0.75)
    assert _row(comp, "mlx")["eval_loss_drop"] == pytest.approx(0.7)
    assert _row(comp, "mlx")["greedy_agreement"] == {"same": 2, "of": 4, "vs": "torch"}
    assert _row(comp, "torch")["greedy_agreement"] is None  # the reference itself
    table = report.format_table(comp)
    assert "| Exact match before -> after (%) | 0.0 -> 75.0" in table
    assert "2/4 = torch" in table and "| Eval loss drop (%)              | 75.0" in table
    assert "Steps to target" not in table  # only with --target-eval-loss


def test_time_to_target_rows(results):
    results[0]["target"] = {"eval_loss": 0.5, "reached": True, "step": 30, "seconds": 3.25, "train_seconds": 2.0}
    results[1]["target"] = {"eval_loss": 0.5, "reached": False, "step": None, "seconds": None, "train_seconds": None}
    table = report.format_table(report.build_comparison(results))
    steps = next(line for line in table.splitlines() if line.startswith("| Steps to target eval loss 0.5"))
    assert "| 30 " in steps and "not reached in 5" in steps
    seconds = next(line for line in table.splitlines() if line.startswith("| Time to target (s)"))
    assert "| 3.25 " in seconds


def test_peak_rss_over_model_uses_the_largest_rank(results):
    results[0]["memory_model"] = {"total": 1000.0}
    results[1].update(memory_model={"total": 800.0}, peak_rss_max_rank_mb=1200.0)  # mlx's peak_rss_mb is 1600
    comp = report.build_comparison(results)
    assert _row(comp, "torch")["peak_rss_over_model"] == pytest.approx(2.0)
    assert _row(comp, "mlx")["peak_rss_over_model"] == pytest.approx(1.5)  # per process: 1200 / 800
    assert _row(comp, "mlx-lm")["peak_rss_over_model"] is None
    assert "| Peak RSS / model" in report.format_table(comp)


def test_fine_tune_must_be_what_ran_and_what_was_asked(results):
    """Each backend's trained type (read from its trainable tensors) is compared across backends
    and with the config: two backends that both ran LoRA when DoRA was asked are a mismatch."""
    def check(rows):
        return {c["check"]: c for c in report.fairness_checks(rows)}["fine_tune"]

    assert check(results)["ok"]
    asked_dora = copy.deepcopy(results)
    for r in asked_dora[:2]:
        r["config"]["fine_tune"] = "dora"
    bad = check(asked_dora)
    assert not bad["ok"] and bad["status"] == "mismatch" and "ran 'lora', asked 'dora'" in bad["detail"]
    one_off = copy.deepcopy(results)
    one_off[1]["fine_tune"] = "full"
    assert check(one_off)["status"] == "mismatch"
