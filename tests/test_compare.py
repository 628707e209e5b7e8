"""`ftcore compare`: the main job, end to end through the CLI and the runner."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from helpers import ftcore, ftcore_in_process, ftcore_together

from ftcore.config import RunConfig
from ftcore.inputs.batches import Batches
from ftcore.run.compare import compare
from ftcore.run.preflight import prepare
from ftcore.tolerances import REFERENCE_LOSS_ATOL

pytestmark = pytest.mark.integration

SHORT_ROWS = ("Training time (s)", "Speedup vs torch", "Peak RSS (MB)", "Memory efficiency vs torch",
              "Loss tokens/s", "Epoch of 256 records", "Eval loss before -> after", "Exact match before -> after (%)",
              "Greedy agreement", "Loss diff vs torch (largest)")  # fmt: skip


@pytest.fixture(scope="module")
def default_compare(tmp_path_factory):
    """The main job as a user runs it: `ftcore compare` on the embedded default (the pretrained
    tiny preset shipped in the package, fine-tuned on the built-in data), torch and mlx."""
    out = tmp_path_factory.mktemp("compare") / "run"
    res = ftcore("compare", "--out", out, timeout=900)
    return res, out


def test_default_fine_tune_teaches_the_held_out_tasks(default_compare):
    """Eval loss falls by >= 20% and exact-match accuracy rises by >= 30 points in both backends,
    and their greedy answers after the fine-tune agree token for token on all 32 records."""
    res, out = default_compare
    assert res.returncode == 0, res.stderr[-2000:]
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["backends"] == ["torch", "mlx"] and comparison["config"]["preset"] == "tiny-pretrained"
    rows = {r["backend"]: r for r in comparison["rows"]}
    for name, r in rows.items():
        assert r["eval_loss_drop"] >= 0.20, (name, r["eval_loss_before"], r["eval_loss"])
        assert r["eval_loss_drop"] == pytest.approx(1 - r["eval_loss"] / r["eval_loss_before"])
        assert r["accuracy_after"] - r["accuracy_before"] >= 0.30, (name, r["accuracy_before"], r["accuracy_after"])
    agree = rows["mlx"]["greedy_agreement"]
    # the README's claim: fp32 torch and mlx give the same greedy answer on all 32 records
    assert agree["vs"] == "torch" and agree["of"] == 32 and agree["same"] == 32, agree
    assert "Greedy agreement" in res.stdout and f"{agree['same']}/{agree['of']} = torch" in res.stdout
    expected = [answer for _, answer in Batches.load(out / "batches.npz").answer_items()]
    for name in rows:  # the accuracies are exact matches of the answers the backend generated
        result = json.loads((out / name / "result.json").read_text())
        assert [s for s, _ in result["eval_losses"]] == [0, 10, 20, 30, 40, 50, 60]
        assert result["eval_losses"][0][1] == result["eval_loss_before"]
        for when in ("before", "after"):
            got = result["generations"][when]
            assert len(got) == len(expected) == 32
            assert result[f"accuracy_{when}"] == sum(g == e for g, e in zip(got, expected, strict=True)) / 32


# The shipped default's base figures: the same on every machine (same weights, data, batches), in
# every backend; the eval loss to float summation order (measured: torch 2.6578004, mlx 2.6577998).
SHIPPED_EVAL_LOSS_BEFORE = 2.6578
SHIPPED_EXACT_MATCH_BEFORE = 0.0


def test_default_compare_repeats_each_backend_and_gives_one_verdict(default_compare):
    """The default is adaptive: at least 3 runs a backend, interleaved, every run a fresh process
    in its own folder, identical losses and evals in each; the verdict's lines open the answer
    and come from comparison.json's `verdict`."""
    from ftcore.report.verdict import line

    res, out = default_compare
    c = json.loads((out / "comparison.json").read_text())
    rounds = c["schedule"]["rounds"]
    assert rounds >= 3 and c["schedule"]["repeats"] is None
    for name in ("torch", "mlx"):
        first = json.loads((out / name / "result.json").read_text())
        for k in range(2, rounds + 1):
            again = json.loads((out / name / "repeats" / str(k) / "result.json").read_text())
            for key in ("losses", "eval_losses", "generations", "batch_fingerprint"):
                assert again[key] == first[key], (name, k, key)
        assert len(c["verdict"]["repeats"][name]) == rounds
    assert c["verdict"]["nondeterministic"] == []
    said = [line(c["verdict"]["speed"]), line(c["verdict"]["memory"])]
    assert " ".join(res.stdout.splitlines()[1:5]).startswith(" ".join(said)[:60]), res.stdout
    order = [ln.split("] ")[1] for ln in res.stderr.splitlines() if ln.startswith("== [round ")]
    assert order[:6] == ["torch", "mlx", "mlx (run 2)", "torch (run 2)", "torch (run 3)", "mlx (run 3)"]


def test_default_base_figures_are_the_shipped_model_s(default_compare, default_model_dir):
    from ftcore.inputs.checkpoint import weights_sha256
    from ftcore.inputs.presets import SHIPPED_PRESETS

    res, out = default_compare
    assert default_model_dir == SHIPPED_PRESETS["tiny-pretrained"]
    checksum = weights_sha256(default_model_dir)
    for name in ("torch", "mlx"):
        r = json.loads((out / name / "result.json").read_text())
        assert r["model_sha256"] == checksum
        assert r["eval_loss_before"] == pytest.approx(SHIPPED_EVAL_LOSS_BEFORE, abs=1e-6)
        assert r["accuracy_before"] == SHIPPED_EXACT_MATCH_BEFORE
    assert "pretraining" not in res.stderr  # served from the package, not made here


def test_compare_prints_the_short_answer_and_writes_the_full_report(default_compare):
    """At most 30 lines, none wider than 80 columns (but the two that name a file), the compact
    rows in order; the full table, its footnotes and the environment are in report.md."""
    from ftcore.report import FOOTNOTES, TABLE_ROWS

    res, out = default_compare
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) <= 30, res.stdout
    for line in lines:
        if line.startswith(("report: ", "data: ")):  # a file's path, as long as it is
            assert Path(line.split(maxsplit=1)[1]).is_file(), line
        else:
            assert len(line) <= 80, line
    assert lines[0] == "All 2 backends ran ok." and "Fairness: 13/13 checks PASS" in lines
    header = next(i for i, line in enumerate(lines) if line.split() == ["torch", "mlx"])
    busy = any(r["machine_busy"] for r in json.loads((out / "comparison.json").read_text())["rows"])
    rows = [line.split("  ")[0] for line in lines[header + 2 : lines.index("", header)]]
    assert rows == [*SHORT_ROWS, *(["Machine (timed steps)"] if busy else [])]  # BUSY: a shared CI host
    for f in ("report.md", "comparison.json", "loss_curves.png", "throughput.png", "memory.png", "torch/result.json", "mlx/result.json"):
        assert (out / f).is_file(), f
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for label, _ in TABLE_ROWS:
        assert f"| {label} |" in report, label
    assert all(f"- {note}" in report for note in FOOTNOTES) and "## Environment" in report
    for row in json.loads((out / "comparison.json").read_text())["rows"]:  # the projected epoch
        assert (row["epoch_records"], row["epoch_steps"]) == (256, 64)  # the built-in 256 records
        low, high = row["epoch_time_ci_s"]
        assert 0 < low < row["epoch_time_s"] < high


# comparison.json's keys when the result figures the report reads became typed fields (#28): each
# must stay. What was in a result's `extra` for every backend (device, trainable_params_expected,
# machine_load, notes, warnings, traceback) is now a field of the result.
TOP_KEYS = {"created_utc", "reference", "reference_note", "backends", "ok_backends", "failed_backends", "all_ok",
            "rows", "fairness", "all_fair", "loss_diff", "scaling", "environment", "config", "results",
            "verdict", "schedule", "size_note"}
ROW_KEYS = {"accuracy_after", "accuracy_before", "allreduce_time_s", "backend", "baseline_rss_mb", "blas",
            "cpu_busy_threads", "epoch_time_s", "epoch_time_ci_s", "epoch_records", "epoch_steps", "epoch_method",
            "finetune_time_s", "finetune_time_ci_s", "error", "eval_loss", "eval_loss_before", "eval_loss_drop", "final_loss",
            "flops_per_token", "framework_peak_mb", "greedy_agreement", "load_time_s", "loss_tokens_per_s",
            "machine_busy", "memory_efficiency", "memory_model_mb", "mfu", "mfu_percent", "peak_rss_max_rank_mb",
            "peak_rss_mb", "peak_rss_over_model", "precision", "rank_threads", "real_tokens_per_s", "scaling_efficiency",
            "speedup", "status", "steps", "target", "threads", "tokens_per_s", "tokens_per_s_ratio", "train_time_s",
            "trainable_params", "warmup_time_s", "world_size", "runs", "busy_runs", "spread"}
RESULT_KEYS = {"accuracy_after", "accuracy_before", "allreduce_time_s", "allreduce_times_s", "backend", "baseline_rss_mb",
               "batch_fingerprint", "blas", "config", "cpu_busy_threads", "env", "epoch_time_s", "epoch_time_ci_s",
               "epoch_records", "epoch_steps", "epoch_method", "finetune_time_s", "finetune_time_ci_s", "epoch_widths",
               "step_widths", "error", "eval_loss",
               "eval_loss_before", "eval_losses", "extra", "fed_batches_fingerprint", "final_loss", "flops_per_token",
               "framework_peak_mb", "generations", "initial_adapter_fingerprint", "load_time_s", "loss_tokens_per_s",
               "losses", "memory_model", "mfu", "model_sha256", "optimizer", "peak_rss_max_rank_mb", "peak_rss_mb",
               "precision", "rank_threads", "real_tokens_per_s", "status", "step_times_s", "steps", "target", "threads",
               "tokens_per_s", "train_time_s", "trainable_params", "warmup_time_s", "world_size",
               "device", "trainable_params_expected", "machine_load", "notes", "warnings", "traceback", "records"}
COMMON_EXTRA = {"child_maxrss_mb", "framework_gemm_peak_gflops", "gemm_shapes", "machine_gemm_peak_gflops",
                "mfu_vs_framework_gemm", "precision_mode", "process_wall_s"}
EXTRA_KEYS = {"torch": COMMON_EXTRA | {"grad_checkpoint_active"},
              "mlx": COMMON_EXTRA | {"blas_probe", "compiled_traces", "conversion_cache_hit", "conversion_dir",
                                     "convert_time_s", "cpu_streams", "framework_peak_note", "mlx_jit", "parent_prepare_s"}}
VERDICT_KEYS = {"kind", "pair", "winner", "ratio", "ci_low", "ci_high", "p_value", "runs", "busy_left_out", "outcome",
                "suggested_repeats"}
NESTED_KEYS = {  # (path, keys)
    "loss_diff": {"index", "max_abs_diff", "pair", "pairs", "reference", "step", "vs_reference"},
    "loss_diff.pairs[]": {"index", "length_mismatch", "max_abs_diff", "max_rel_diff", "pair", "step", "steps_compared"},
    "loss_diff.vs_reference.mlx": {"index", "length_mismatch", "max_abs_diff", "max_rel_diff", "step", "steps_compared"},
    "environment.torch": {"blas", "cpu", "device", "git_commit", "logical_cores", "precision", "python", "threads", "versions"},
    "fairness[]": {"check", "detail", "ok", "status"},
    "rows[1].greedy_agreement": {"of", "same", "vs"},
    "verdict": {"speed", "memory", "pairs", "repeats", "nondeterministic"},
    "verdict.speed": VERDICT_KEYS,
    "verdict.memory": VERDICT_KEYS,
    "verdict.repeats.torch[]": {"status", "busy", "median_step_s", "train_time_s", "peak_rss_mb", "loss_tokens_per_s"},
    "schedule": {"repeats", "time_budget_s", "rounds", "repeats_wall_s"},
}  # fmt: skip


def _at(d, path):
    for part in path.replace("]", "").replace("[", ".").split("."):
        d = d[int(part)] if part.isdigit() else d if part == "" else d[part]
    return d if isinstance(d, list) else [d]


def test_comparison_json_keeps_every_figure(default_compare):
    import dataclasses

    res, out = default_compare
    c = json.loads((out / "comparison.json").read_text())
    assert set(c) >= TOP_KEYS, TOP_KEYS - set(c)
    assert all(set(row) >= ROW_KEYS for row in c["rows"]), ROW_KEYS - set(c["rows"][0])
    for path, keys in NESTED_KEYS.items():
        for d in _at(c, path):
            assert set(d) >= keys, (path, keys - set(d))
    assert [f["check"] for f in c["fairness"]] == ["batch_fingerprint", "fed_batches", "initial_adapter_fingerprint",
                                                   "trainable_params", "fine_tune", "grad_accum", "optimizer", "weight_decay", "lr_schedule", "precision", "threads",
                                                   "config", "steps"]
    assert set(c["config"]) >= {f.name for f in dataclasses.fields(RunConfig)}
    for r in c["results"]:
        assert set(r) >= RESULT_KEYS, (r["backend"], RESULT_KEYS - set(r))
        assert set(r["extra"]) >= EXTRA_KEYS[r["backend"]], (r["backend"], EXTRA_KEYS[r["backend"]] - set(r["extra"]))
        assert r["device"] and r["machine_load"] and r["trainable_params_expected"] == r["trainable_params"]
    assert any(n.startswith("threads: ") for n in c["results"][1]["notes"])  # mlx's note on its streams


def test_compare_loss_difference_below_1e4(default_compare):
    res, out = default_compare
    comparison = json.loads((out / "comparison.json").read_text())
    diff = comparison["loss_diff"]["max_abs_diff"]
    assert 0 <= diff < REFERENCE_LOSS_ATOL, diff
    assert f"{diff:.3e}" in res.stdout  # the printed table says it too
    assert comparison["all_fair"] is True
    rows = {r["backend"]: r for r in comparison["rows"]}
    assert rows["torch"]["speedup"] == pytest.approx(1.0)
    t, m = rows["torch"], rows["mlx"]
    assert m["speedup"] == pytest.approx(t["train_time_s"] / m["train_time_s"], rel=1e-6)
    assert m["memory_efficiency"] == pytest.approx(t["peak_rss_mb"] / m["peak_rss_mb"], rel=1e-6)


def test_compare_local_sentencepiece_checkpoint_and_alpaca_hf(tmp_path, sentencepiece_model_dir, write_alpaca, alpaca_records):
    """Also with gradient accumulation (--grad-accum 2): each backend records the micro-batches it
    ran a step, and the `grad_accum` fairness check passes."""
    data = write_alpaca(tmp_path / "alpaca_hf", alpaca_records, "hf")
    out = tmp_path / "run"
    res = ftcore(
        "compare", "--backends", "torch,mlx", "--model", sentencepiece_model_dir, "--data", data,
        "--num-samples", 16, "--eval-samples", 4, "--batch-size", 2, "--grad-accum", 2, "--max-seq-len", 96,
        "--steps", 4, "--out", out, "--repeats", 1,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["ok_backends"] == ["torch", "mlx"]
    assert comparison["loss_diff"]["max_abs_diff"] < REFERENCE_LOSS_ATOL
    assert json.loads((out / "torch" / "result.json").read_text())["config"]["model"] == str(sentencepiece_model_dir)
    assert [json.loads((out / b / "result.json").read_text())["grad_accum"] for b in ("torch", "mlx")] == [2, 2]
    check = next(c for c in comparison["fairness"] if c["check"] == "grad_accum")
    assert check["ok"] and check["status"] == "pass", check


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
    from ftcore.run.backend_process import run_backend

    results = [run_backend("torch", a, tmp_path / "a" / "torch").to_dict(), run_backend("torch", b, tmp_path / "b" / "torch").to_dict()]
    results[1]["backend"] = "torch-seed1"
    checks = {c["check"]: c for c in build_comparison(results)["fairness"]}
    assert checks["batch_fingerprint"]["ok"] is False
    assert checks["initial_adapter_fingerprint"]["ok"] is False


ASKS = ("What is the last letter of the word candle?", "Spell forest in reverse.",
        "What is the last letter of the word tiger?", "Spell magnet in reverse.")  # fmt: skip


def test_generate_gives_the_same_tokens_in_torch_and_mlx(default_compare):
    """`ftcore generate` on the pretrained default with the adapter the mlx row trained: the same
    greedy tokens in both frameworks, prompt by prompt; without the adapter the answers differ."""
    res, out = default_compare
    assert res.returncode == 0, res.stderr[-2000:]
    prompts = [a for ask in ASKS for a in ("--prompt", ask)]
    answers = {}
    runs = (("torch", out / "mlx" / "adapter"), ("mlx", out / "mlx" / "adapter"), ("mlx", None))
    gens = ftcore_together(*(["generate", "--backend", backend, "--json", *(["--adapter", adapter] if adapter else []), *prompts]
                             for backend, adapter in runs))  # fmt: skip
    for (backend, adapter), gen in zip(runs, gens, strict=True):
        assert gen.returncode == 0, gen.stderr[-2000:]
        lines = [json.loads(line) for line in gen.stdout.splitlines()]
        assert [g["prompt"] for g in lines] == list(ASKS)
        answers[backend, bool(adapter)] = [g["tokens"] for g in lines]
    assert answers["torch", True] == answers["mlx", True]
    assert answers["mlx", True] != answers["mlx", False]


def test_time_to_target_stops_at_the_first_eval_that_reaches_it(tmp_path):
    """--target-eval-loss: each backend stops after the first periodic eval at or below the target,
    and reports that step and the seconds to it."""
    target = 1.0
    out = tmp_path / "run"
    res = ftcore("compare", "--backends", "torch,mlx", "--target-eval-loss", target, "--eval-every", 5,
                 "--no-eval-generate", "--repeats", 1, "--out", out, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"Steps to target eval loss {target:g}" in res.stdout and "Time to target (s)" in res.stdout
    for name in ("torch", "mlx"):
        r = json.loads((out / name / "result.json").read_text())
        t = r["target"]
        first = next(step for step, loss in r["eval_losses"] if step > 0 and loss <= target)
        assert t["reached"] and t["step"] == first < r["config"]["steps"]
        assert len(r["losses"]) == r["steps"] == first  # training stopped there
        assert all(loss > target for step, loss in r["eval_losses"] if 0 < step < first)
        assert 0 < t["train_seconds"] <= t["seconds"]
        assert r["accuracy_after"] is None  # --no-eval-generate


def test_target_refused_for_a_backend_whose_trainer_owns_the_steps(tmp_path):
    res = ftcore_in_process("compare", "--backends", "torch,hf-trainer", "--target-eval-loss", 1.0, "--out", tmp_path / "x")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "hf-trainer" in res.stderr and "cannot stop at a target" in res.stderr
    assert not (tmp_path / "x").exists()
