"""The short answer `ftcore compare` prints (ftcore.report.console), `--verbose`'s full table, and
the typed result fields the report reads (RunResult: what was once in `extra`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import ftcore_in_process

import ftcore
from ftcore import cli, report
from ftcore.config import RunConfig
from ftcore.result import FORMERLY_EXTRA, RunResult

pytestmark = pytest.mark.unit

CONFIG = {"preset": "tiny", "steps": 4, "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine",
          "lora_targets": ["q_proj", "v_proj"]}
# the LR each step applied, as the backends read it from their optimizers (the schedule's)
OPTIMIZER = {"name": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8,
             "weight_decay_per_tensor": {"model.layers.0.self_attn.q_proj.lora_B": 0.0},
             "lr_per_step": [RunConfig(**CONFIG).lr_at(s) for s in range(4)]}


def _result(backend: str, train: float, rss: float, losses=(2.5, 2.0, 1.5, 1.2), **kw) -> dict:
    r = RunResult(
        backend=backend, config=dict(CONFIG), train_time_s=train, peak_rss_mb=rss, steps=len(losses),
        tokens_per_s=400 / train, real_tokens_per_s=300 / train, loss_tokens_per_s=100 / train,
        losses=list(losses), final_loss=losses[-1], eval_loss_before=2.6578, eval_loss=0.20539,
        accuracy_before=0.0, accuracy_after=0.84375, generations={"after": [[5, 6], [7]]},
        trainable_params=74752, fine_tune="lora", grad_accum=1, batch_fingerprint="a" * 16, fed_batches_fingerprint="b" * 16,
        initial_adapter_fingerprint="c" * 16, optimizer=dict(OPTIMIZER), precision="fp32", threads=2,
        machine_load={"busy": False}, step_times_s=[train / len(losses)] * len(losses),
    ).to_dict()  # fmt: skip
    r.update(kw)
    return r


def _short(*results: dict) -> list[str]:
    return report.format_short(report.build_comparison(list(results))).splitlines()


def _labels(lines: list[str]) -> list[str]:
    """The compact table's row labels (text before the first run of two spaces)."""
    start = next(i for i, ln in enumerate(lines) if set(ln) == {"-"}) + 1
    end = lines.index("", start)
    return [re.split(r"\s{2,}", ln)[0] for ln in lines[start:end]]


DEFAULT_ROWS = ["Training time (s)", "Speedup vs torch", "Peak RSS (MB)", "Memory efficiency vs torch",
                "Loss tokens/s", "Eval loss before -> after", "Exact match before -> after (%)",
                "Greedy agreement", "Loss diff vs torch (largest)"]  # fmt: skip


def test_two_backends_give_the_verdict_ten_rows_and_one_fairness_line():
    lines = _short(_result("torch", 3.2, 411.5), _result("mlx", 1.6, 99.9, losses=(2.5, 2.0, 1.5, 1.20002)))
    assert lines[0] == "All 2 backends ran ok."
    # one run each: no interval, so no decision (tests/test_verdict.py: the decided lines)
    assert lines[1:3] == ["Speed undecided after 1 run each: mlx/torch 2.00x (no interval from one run);",
                          "--repeats 3 to decide"]
    assert lines[3] == "Peak RSS undecided after 1 run each: torch/mlx 4.12x (no interval from one run);"
    assert _labels(lines) == DEFAULT_ROWS  # world size, machine and status rows hidden
    assert "Fairness: 13/13 checks PASS" in lines and not any("PASS " in ln for ln in lines)
    table = "\n".join(lines)
    assert "2.658 -> 0.205" in table and "0.0 -> 84.4" in table and "2/2 = torch" in table
    assert "2.000e-05" in table and "4.12x" in table
    assert len(lines) <= 20 and max(map(len, lines)) <= 80


def test_rows_that_matter_only_sometimes_show_when_they_do():
    one = _result("torch", 3.0, 400.0)
    two = _result("torch", 2.0, 600.0, world_size=2, rank_threads=1, allreduce_time_s=0.002,
                  peak_rss_max_rank_mb=300.0, machine_load={"busy": True})  # fmt: skip
    failed = RunResult.failed("mlx", CONFIG, "RuntimeError: boom").to_dict()
    lines = _short(one, two, failed)
    assert lines[0].startswith("NOT OK - mlx failed: RuntimeError: boom")
    labels = _labels(lines)
    for label in ("World size (processes)", "Threads per rank", "All-reduce (ms/step)",
                  "Peak RSS, largest rank (MB)", "Scaling efficiency", "Machine (timed steps)", "Status"):  # fmt: skip
        assert label in labels, label
    machine = next(ln for ln in lines if ln.startswith("Machine"))
    assert machine.split()[-3:] == ["quiet", "BUSY", "n/a"]
    # no greedy answers (e.g. --no-eval-generate): the exact-match and agreement rows go
    quiet = [_result(b, t, 400.0, accuracy_before=None, accuracy_after=None, generations={})
             for b, t in (("torch", 3.0), ("mlx", 2.0))]  # fmt: skip
    labels = _labels(_short(*quiet))
    assert "Exact match before -> after (%)" not in labels and "Greedy agreement" not in labels
    assert "Training time (s)" in labels


def test_a_failing_fairness_check_is_listed_and_the_passing_ones_are_not():
    other = _result("mlx", 2.0, 300.0, batch_fingerprint="f" * 16)
    lines = _short(_result("torch", 3.0, 400.0), other)
    at = lines.index("Fairness: 12/13 checks PASS; not passed:")
    assert lines[at + 1].split()[:2] == ["MISMATCH", "batch_fingerprint:"]
    # only the failing check follows, then the informational compiled/eager line
    assert lines[at + 2 :] == ["Training step: not recorded torch, mlx"]


def test_many_backends_are_split_into_tables_that_fit_80_columns():
    names = ["torch", "torch x2", "mlx", "mlx x2", "hf-trainer", "mlx-lm"]
    results = [_result(n, 1.0 + i, 400.0 + i) for i, n in enumerate(names)]
    lines = _short(*results)
    said = [ln for ln in lines if "undecided after 1 run each" in ln]  # speed and memory, each against torch
    assert len(said) == 2 * (len(names) - 1) and said[0].startswith("Speed undecided after 1 run each: torch x2/torch 0.50x")
    assert max(map(len, lines)) <= 80
    headers = [ln for i, ln in enumerate(lines[1:], 1) if lines[i - 1] == "" and i + 1 < len(lines) and set(lines[i + 1]) == {"-"}]
    assert len(headers) >= 2 and [n for h in headers for n in re.split(r"\s{2,}", h.strip())] == names


def test_warnings_are_one_line_each():
    noisy = _result("mlx", 2.0, 300.0, warnings=["BUSY MACHINE: " + "other processes used 0.8 cores " * 5])
    lines = _short(_result("torch", 3.0, 400.0), noisy)
    said = [ln for ln in lines if ln.startswith("warning: mlx: BUSY MACHINE")]
    assert len(said) == 1 and len(said[0]) <= 80


@pytest.mark.parametrize("verbose", [False, True])
def test_compare_prints_the_short_answer_or_with_verbose_the_full_table(verbose, tmp_path, monkeypatch):
    comparison = report.build_comparison([_result("torch", 3.2, 411.5), _result("mlx", 1.6, 99.9)])

    class Prep:
        def save(self, out):
            return self

    monkeypatch.setattr(cli, "check_run", lambda cfg, backends: Prep())
    monkeypatch.setattr(cli, "compare", lambda backends, prep, out, schedule, note: comparison)
    out = ftcore_in_process("compare", "--out", tmp_path / "c", *(["--verbose"] if verbose else []))
    assert out.returncode == 0, out.stderr
    full = report.format_table(comparison)
    assert (full in out.stdout) is verbose
    assert ("Fairness: 13/13 checks PASS" in out.stdout) is not verbose
    assert f"report: {tmp_path / 'c' / 'report.md'}" in out.stdout


def test_old_result_files_read_their_extra_keys_into_the_fields():
    old = RunResult(backend="mlx").to_dict()
    for k in FORMERLY_EXTRA:
        old.pop(k)
    figures = {"device": "cpu", "trainable_params_expected": 5, "machine_load": {"busy": True},
               "notes": ["n"], "warnings": ["w"], "traceback": "Traceback ..."}  # fmt: skip
    old["extra"] = {**figures, "cpu_streams": 2}
    r = RunResult.from_dict(old)
    assert {k: getattr(r, k) for k in FORMERLY_EXTRA} == figures and r.extra == {"cpu_streams": 2}


def test_no_module_writes_a_typed_figure_into_extra():
    """`extra` holds backend-specific figures; the fields above are written as fields."""
    keys = "|".join(FORMERLY_EXTRA)
    pattern = re.compile(rf"""extra(\[|\.setdefault\(|\.get\(|\.update\()\s*["']?({keys})\b""")
    for path in Path(ftcore.__file__).parent.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{n}: {line.strip()}"


def test_a_fine_tune_other_than_one_lora_batch_is_said_under_the_verdict():
    """--fine-tune dora --grad-accum 2 is said in one line; the default (LoRA, one batch a step)
    adds none."""
    cfg = {**CONFIG, "fine_tune": "dora", "grad_accum": 2, "batch_size": 2}
    dora = _short(*(_result(b, 2.0, 300.0, config=cfg, fine_tune="dora", grad_accum=2)
                    for b in ("torch", "mlx")))  # fmt: skip
    assert "Trained: dora, 2 micro-batches of 2 rows a step" in dora
    assert "Fairness: 13/13 checks PASS" in dora
    plain = _short(_result("torch", 2.0, 300.0), _result("mlx", 2.0, 300.0))
    assert not any(ln.startswith("Trained:") for ln in plain)
