"""The epoch projection (ftcore.measure.projection): priced per batch width from a short run's
timed steps, with a 95% interval; the widths of a whole epoch as the batches of an --epochs 1 run
have them; the records an epoch holds; the compare's rows; the defaults of a real-size compare."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from ftcore.config import RunConfig, UserError
from ftcore.inputs.batches import build_batches
from ftcore.inputs.records import ALPACA_RECORDS, data_records
from ftcore.inputs.tokenizer import load_tokenizer
from ftcore.measure.projection import project, project_runs
from ftcore.report.verdict import build_verdict
from ftcore.run.size_defaults import (
    AT_SIZE,
    LARGE_PARAMS,
    REPEATS_AT_SIZE,
    model_params,
    size_defaults,
)

pytestmark = pytest.mark.unit


def step_time(w, a: float = 0.4, b: float = 0.002):
    """A step's cost at width w: a fixed overhead plus a part that grows with the width."""
    return a + b * np.asarray(w, dtype=float)


def short_run(seed: int, widths=(65, 129, 193, 97, 161), noise: float = 0.03,
              run_factor: float = 1.0) -> tuple[list[int], list[float], float]:
    rng = np.random.default_rng(seed)
    t = step_time(widths) * run_factor * (1 + noise * rng.standard_normal(len(widths)))
    return list(widths), list(t), 0.0


# one epoch of Alpaca-like lengths: most batches narrow, a long tail of wide ones
EPOCH = {33: 40.0, 65: 120.0, 97: 150.0, 129: 120.0, 161: 90.0, 193: 60.0, 257: 40.0,
         353: 25.0, 449: 15.0, 513: 8.0}  # fmt: skip
TRUTH = float(sum(n * step_time(w) for w, n in EPOCH.items()))


def test_priced_per_width_not_from_one_mean() -> None:
    """Short runs that met mid-size widths project the wide-tailed epoch within 3% of the truth,
    inside its interval; one mean step x steps (the old method) lies outside that interval."""
    runs = [short_run(s) for s in range(3)]
    p = project(runs, EPOCH)
    assert p.seconds == pytest.approx(TRUTH, rel=0.03)
    assert p.ci[0] < TRUTH < p.ci[1] and p.steps == sum(EPOCH.values())
    assert "per-width fit" in p.method and "3 runs" in p.method
    one_mean = np.mean([t for _, ts, _ in runs for t in ts]) * p.steps
    assert not p.ci[0] < one_mean < p.ci[1]
    # time in proportion to width (no overhead) misses too: the fit keeps the intercept
    proportional = sum(n * w for w, n in EPOCH.items()) * np.mean(
        [t / w for ws, ts, _ in runs for w, t in zip(ws, ts, strict=True)])
    assert not p.ci[0] < proportional < p.ci[1]


def test_the_interval_covers_the_epoch_that_then_runs() -> None:
    """Over 200 simulated machines (each run 0-6% off, steps 3% noisy), the 95% interval from 3
    short runs holds the epoch a fresh run then measures in at least 90% of them."""
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(200):
        factors = 1 + 0.03 * rng.standard_normal(4)
        runs = [short_run(100 * k + i, run_factor=factors[i]) for i in range(3)]
        p = project(runs, EPOCH, seed=k, draws=400)
        measured = sum(n * step_time(w) * factors[3] for w, n in EPOCH.items())
        hits += p.ci[0] <= measured <= p.ci[1]
    assert hits >= 180


def test_one_width_measured_scales_with_width_and_says_so() -> None:
    p = project([([65] * 4, [1.0, 1.02, 0.98, 1.0], 0.0)], {65: 10, 129: 10})
    assert p.seconds == pytest.approx(10 * 1.0 + 10 * 129 / 65)
    assert p.method.startswith("one width measured (65)") and p.method.endswith("1 run")


def test_start_up_is_counted_once_and_epochs_multiply_the_steps() -> None:
    """The warm-up step's time beyond the fit (compilation) enters once; --epochs 3 is three
    epochs of steps plus that one start-up."""
    widths = [65, 65, 129, 193, 97, 161]
    times = [5.0] + list(step_time(widths[1:]))  # warm-up: 5 s at width 65, fit says ~0.53 s
    cfg = {"timing_warmup_steps": 1, "epochs": 3}
    r = {"config": cfg, "step_times_s": times, "step_widths": widths,
         "epoch_widths": {str(w): n for w, n in EPOCH.items()}}  # fmt: skip
    out = project_runs([r, r])
    start_up = 5.0 - float(step_time(65))
    assert out["epoch_time_s"] == pytest.approx(TRUTH + start_up, rel=1e-6)
    assert out["finetune_time_s"] == pytest.approx(3 * TRUTH + start_up, rel=1e-6)
    assert out["epoch_steps"] == sum(EPOCH.values())
    assert project_runs([{**r, "step_widths": []}]) is None  # no widths: nothing to price


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.mark.parametrize("batching", ["longest", "packed", "padded"])
def test_epoch_widths_are_the_widths_an_epochs_1_run_trains(tok, batching) -> None:
    """stats["epoch_widths"] counts exactly the widths of the steps --epochs 1 makes (padded: every
    step at --max-seq-len, n / batch of them)."""
    cfg = RunConfig(data="builtin:alpaca-lengths", num_samples=37, eval_samples=0, batch_size=4,
                    max_seq_len=256, batching=batching, epochs=1)  # fmt: skip
    b = build_batches(cfg, tok)
    widths = {int(w): n for w, n in b.stats["epoch_widths"].items()}
    if batching == "padded":
        assert widths == {256: b.stats["train_records"] / 4}  # the records kept (long ones drop)
    else:
        assert widths == dict(Counter(b.train["widths"].tolist()))
        assert len(widths) > 2 or batching == "packed"  # longest: several widths to price apart


def test_records_an_epoch_holds(tok, tmp_path) -> None:
    lengths = RunConfig(data="builtin:alpaca-lengths", num_samples=16, eval_samples=4)
    assert data_records(lengths, None) == ALPACA_RECORDS == 52002
    assert data_records(RunConfig(num_samples=20), None) == 20  # the built-in set: as drawn
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n"
                            for i in range(50)))  # fmt: skip
    cfg = RunConfig(data=str(path), num_samples=10, eval_samples=5, batch_size=2, steps=2)
    assert build_batches(cfg, tok).stats["data_records"] == 45  # the file less the eval ones
    with pytest.raises(UserError, match="--project-records: must be >= 1"):
        RunConfig(project_records=0)


def test_size_defaults_at_tinyllama_size_and_only_for_flags_not_given() -> None:
    big = RunConfig(preset="tinyllama-1.1b", data="builtin:alpaca-lengths", max_seq_len=512)
    assert model_params(big) == 1_100_048_384
    cfg, repeats, note = size_defaults(big, {"preset", "data", "max_seq_len"})
    assert (cfg.steps, cfg.eval_samples, cfg.generates, repeats) == (3, 0, False, REPEATS_AT_SIZE)
    assert note.startswith("a 1.10B-parameter model: defaults at this size are --steps 3, "
                           "--eval-samples 0, --repeats 2 (1 warm-up step, 2 timed a run)")
    kept, repeats, note = size_defaults(big.replace(steps=6), {"preset", "steps", "repeats"})
    assert (kept.steps, kept.eval_samples, repeats) == (6, AT_SIZE["eval_samples"], None)
    assert size_defaults(big, {*AT_SIZE, "repeats"}) == (big, None, None)  # all given: no change
    small = RunConfig(preset="tinyllama-1.1b", num_layers=1)  # 175M parameters
    assert model_params(small) < LARGE_PARAMS and size_defaults(small, set()) == (small, None, None)
    assert size_defaults(RunConfig(), set()) == (RunConfig(), None, None)  # the embedded default


def test_the_speed_verdict_reads_steps_of_different_widths_as_pairs() -> None:
    """Runs whose steps differ 3x in width (the same batches in every run): B is 1.2x faster with
    2% noise. Each step taken relative to its own median, 3 runs of 3 steps decide it; raw step
    times resampled within a run would mix 10 s and 30 s steps into a useless interval."""
    rng = np.random.default_rng(0)
    base = [10.0, 20.0, 30.0, 15.0]  # warm-up, then three timed steps of other widths

    def side(factor: float, n: int = 3) -> list[dict]:
        return [{"status": "ok", "config": {"timing_warmup_steps": 1}, "peak_rss_mb": 1.0,
                 "step_times_s": list(np.array(base) * factor * (1 + 0.02 * rng.standard_normal(4)))}
                for _ in range(n)]  # fmt: skip

    s = build_verdict({"torch": side(1.2), "mlx": side(1.0)}, "torch")["speed"]
    assert s["outcome"] == "decided" and s["winner"] == "mlx"
    assert 1.05 < s["ci_low"] < 1.2 < s["ci_high"] < 1.35


def test_compare_at_tinyllama_size_takes_the_size_defaults_and_says_so(tmp_path, monkeypatch):
    """`ftcore compare --preset tinyllama-1.1b ...` hands the checks a config with the size's
    defaults (the flags given stay) and says so in a note line, before anything runs."""
    from ftcore import cli
    from tests.helpers import ftcore_in_process

    seen = {}

    def stop(cfg, backends):  # the checks before any run: look at the config, then stop there
        seen["cfg"] = cfg
        raise UserError("stopped by the test")

    monkeypatch.setattr(cli, "check_run", stop)
    monkeypatch.setattr(cli, "Schedule", type("Seen", (), {"checked": lambda n, s: seen.update(
        repeats=n)}))  # fmt: skip
    out = ftcore_in_process("compare", "--preset", "tinyllama-1.1b", "--data",
                            "builtin:alpaca-lengths", "--max-seq-len", "512", "--eval-samples", "2",
                            "--out", tmp_path / "c")  # fmt: skip
    assert out.returncode == 2 and "stopped by the test" in out.stderr
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.eval_samples, cfg.generates, cfg.max_seq_len) == (3, 2, False, 512)
    assert seen["repeats"] == REPEATS_AT_SIZE
    assert "note: a 1.10B-parameter model: defaults at this size are --steps 3, --repeats 2 (1" in out.stderr
