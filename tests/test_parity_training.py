"""Training trajectories: the `torch` and `mlx` backends, each in its own child process
(ftcore.run.preflight.prepare + ftcore.run.backend_process.run_backend), train on the same batches from the same initial adapters
with the same config (parity_utils.TRAJECTORIES): the tiny preset at the default 128 tokens, every
LoRA target, weight decay, cosine schedule with warm-up, clipping at max_grad_norm 1.0 and eval
every 5 steps, 20 steps, fp32 and bf16; and a 512-token fp32 run on long records. Two threads, so
the MLX side runs its compiled step over two row streams, as on 2 cores by default.
fp32: the same per-step and eval losses and the same final adapters; bf16: the same to a measured,
looser tolerance. --fine-tune dora and full: 30 steps in `padded` and `longest`, the same losses.

Why norm-based adapter tolerances: Adam divides by sqrt(v); a weight whose gradient is ~0 in exact
arithmetic gets a full +-lr step from whatever sign the rounding noise has, so an elementwise max
measures noise, not disagreement. Per tensor we bound ||mlx - torch|| relative to the tensor and
relative to the training update ||torch - init|| (the stricter one for lora_A, whose norm is
mostly the shared initial value).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from parity_utils import backend_runs, initial_peft_adapter, read_adapter, rel_norm_err

from ftcore.tolerances import (
    BF16_ADAPTER_RTOL,
    BF16_EVAL_LOSS_ATOL,
    BF16_GLOBAL_RTOL,
    BF16_MIN_COSINE,
    BF16_STEP_LOSS_ATOL,
    BF16_VS_FP32_ATOL,
    FP32_ADAPTER_RTOL,
    FP32_STEP_LOSS_ATOL,
    LR_RTOL,
    REFERENCE_LOSS_ATOL,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # child processes: the real backends

# fp32. Measured (2-core EPYC), 128 tokens: per-step loss diff <= 1.9e-6, eval diff <= 1.3e-6,
# adapter ||a-b||/||b|| <= 2.1e-5, relative to the update <= 3.2e-5; 512 tokens (6 steps, small
# updates): loss diff 1.9e-6, eval diff 3.5e-6, adapter 1.1e-4, relative to the update 4.4e-4.
# Defects in the MLX backend move them far more (128 tokens unless said): batches fed in reverse
# 0.53 per-step loss; AdamW beta2 0.99 for 0.999 6.3e-4; clipping skipped 2.4e-2 (512 tokens:
# 7.7e-5, but adapter 6.7e-3); causal masking stopped at position 64 5.7e-4 (512 tokens: 1.2e-2).
# Measured over the seven fp32 runs below (FP32_RUNS; seeds as in parity_utils.TRAJECTORIES, 2
# threads, 2-core EPYC; test_tolerances_are_at_most_10x_the_measured makes it again): per-step or
# eval loss diff <= 6.2e-6, adapter tensor rel err (or relative to the update) <= 4.3e-4.
# FP32_STEP_LOSS_ATOL: 6.5x the 6.2e-6 measured; FP32_ADAPTER_RTOL: 2x the 1.47e-3 measured on a
# Zen 2 EPYC (no AVX-512; 4.3e-4 on an AVX-512 one); a skipped clipping gives 6.7e-3.
# bf16 (frozen base in bf16, LoRA + AdamW in fp32 in both). The frameworks round bf16 matmuls,
# RMSNorm and RoPE in different orders, so this is agreement, not identity. Each bound is 1.3-3.4x
# its measured value (128 tokens, 2 threads; made again by the test below): per-step loss diff
# 2.1e-3 (losses ~6.5), eval diff 1.3e-3, worst tensor rel err 0.038, global update rel err 0.027,
# worst cosine between the two updates 0.9947 (1 - cos: 5.3e-3), bf16 vs fp32 losses of one
# backend 1.9e-3.
# LoRA matmuls in bf16 in MLX do not show here (loss diff 1.1e-3, global 0.032): the bf16 base's
# rounding hides them; test_parity_lora_layer.py's bf16 property catches them.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    names = ("fp32", "bf16", "long", "fp32-longest", "profile-padded", "profile-longest", "fp32-chat-packed",
             "profile-packed", *FINE_TUNE_RUNS)
    return backend_runs(names, tmp_path_factory.getbasetemp() / "parity-runs")


def _fed_fingerprint(batches, steps: int) -> str:
    """What ftcore.backends.step_clock.StepClock.feed hashes when a loop feeds batches 0..steps-1 in
    order: each step's (B, L) int64 token ids, shape first."""
    h = hashlib.sha256()
    for s in range(steps):
        ids = np.ascontiguousarray(batches.step(s)["input_ids"], dtype=np.int64)
        h.update(str(ids.shape).encode())
        h.update(ids.tobytes())
    return h.hexdigest()[:16]


def _ok(r):
    for b in ("torch", "mlx"):
        assert r[b].status == "ok", f"{b}: {r[b].error}\n{r[b].traceback or ''}"
    # Same inputs, fed in order, same starting point, same optimiser settings in both.
    assert r["torch"].batch_fingerprint == r["mlx"].batch_fingerprint
    expected = _fed_fingerprint(r["prep"].batches, r["cfg"].steps)
    assert r["torch"].fed_batches_fingerprint == expected, "torch fed other batches"
    assert r["mlx"].fed_batches_fingerprint == expected, "mlx fed other batches"
    assert r["torch"].initial_adapter_fingerprint == r["mlx"].initial_adapter_fingerprint
    torch_opt, mlx_opt = dict(r["torch"].optimizer), dict(r["mlx"].optimizer)
    # the LR each step used, read back from each optimizer (MLX holds it as a float32)
    np.testing.assert_allclose(torch_opt.pop("lr_per_step"), mlx_opt.pop("lr_per_step"), rtol=LR_RTOL)
    # the decay each optimizer applies to each adapter tensor (one param group decaying lora_B only
    # moves the losses barely past FP32_STEP_LOSS_ATOL)
    decay = {b: opt.pop("weight_decay_per_tensor") for b, opt in (("torch", torch_opt), ("mlx", mlx_opt))}
    off = sorted((k, decay["torch"].get(k), decay["mlx"].get(k)) for k in decay["torch"].keys() | decay["mlx"].keys()
                 if decay["torch"].get(k) != decay["mlx"].get(k))  # fmt: skip
    assert not off and decay["torch"], f"weight decay (tensor, torch, mlx) differs on {len(off)} tensors: {off[:2]}"
    assert set(decay["torch"].values()) == {r["cfg"].weight_decay}
    assert torch_opt == mlx_opt
    assert torch_opt["max_grad_norm"] == r["cfg"].max_grad_norm == 1.0
    assert len(r["torch"].losses) == len(r["mlx"].losses) == r["cfg"].steps
    # the step the MLX backend runs by default on 2 cores: compiled, rows over two streams
    assert r["mlx"].extra["cpu_streams"] == 2 and r["mlx"].compiled_step is True
    # eval before training (step 0), periodic evals at the same steps in both, and the final one
    every, steps = r["cfg"].eval_every, r["cfg"].steps
    want = [0, *range(every, steps, every), steps]
    assert [s for s, _ in r["torch"].eval_losses] == [s for s, _ in r["mlx"].eval_losses] == want


def _losses(r):
    lt, lm = np.array(r["torch"].losses), np.array(r["mlx"].losses)
    et = np.array([v for _, v in r["torch"].eval_losses])
    em = np.array([v for _, v in r["mlx"].eval_losses])
    assert np.isfinite(lt).all() and np.isfinite(lm).all() and np.isfinite(em).all()
    return lt, lm, np.abs(lt - lm), np.abs(et - em)


def _adapter_errors(r):
    at, am = read_adapter(r["dirs"]["torch"]), read_adapter(r["dirs"]["mlx"])
    assert at.keys() == am.keys()
    init = initial_peft_adapter(r["cfg"], r["prep"].model_dir)
    assert init.keys() == at.keys()
    tensor = {k: rel_norm_err(am[k], at[k]) for k in at}
    update = {k: rel_norm_err(am[k] - init[k], at[k] - init[k]) for k in at}
    d = np.sqrt(sum(float(np.sum((am[k] - at[k]).astype(np.float64) ** 2)) for k in at))
    u = np.sqrt(sum(float(np.sum((at[k] - init[k]).astype(np.float64) ** 2)) for k in at))
    cos = {
        k: float(np.sum((am[k] - init[k]) * (at[k] - init[k])))
        / float(np.linalg.norm(am[k] - init[k]) * np.linalg.norm(at[k] - init[k]))
        for k in at
    }
    return tensor, update, d / u, cos


FP32_RUNS = ["fp32", "long", "fp32-longest", "profile-padded", "profile-longest", "fp32-chat-packed", "profile-packed"]


@pytest.mark.parametrize("name", FP32_RUNS)
def test_fp32_losses_and_adapters_match(runs, name):
    r = runs[name]
    _ok(r)
    lt, _, diff, eval_diff = _losses(r)
    assert lt[-1] < lt[0]  # it trained
    # The weights first: a defect in the update (e.g. weight decay on lora_B only in one backend)
    # moves them 3.6x past FP32_ADAPTER_RTOL (0.011) while it moves the losses barely past
    # FP32_STEP_LOSS_ATOL (4.6e-5).
    tensor, update, glob, _ = _adapter_errors(r)
    worst_t, worst_u = max(tensor, key=tensor.get), max(update, key=update.get)
    assert tensor[worst_t] < FP32_ADAPTER_RTOL, (
        f"{worst_t}: ||mlx - torch|| / ||torch|| = {tensor[worst_t]:.3g}"
    )
    assert update[worst_u] < FP32_ADAPTER_RTOL, (
        f"{worst_u}: relative to its update {update[worst_u]:.3g}"
    )
    assert glob < FP32_ADAPTER_RTOL, f"global update rel err {glob:.3g}"
    assert diff.max() < FP32_STEP_LOSS_ATOL, f"per-step |torch - mlx| = {diff.tolist()}"
    assert eval_diff.max() < FP32_STEP_LOSS_ATOL, f"eval |torch - mlx| = {eval_diff.tolist()}"


ACCUM_RUNS = ["accum-padded", "accum-longest"]


@pytest.fixture(scope="module")
def accum_runs(tmp_path_factory):
    return backend_runs(tuple(ACCUM_RUNS), tmp_path_factory.getbasetemp() / "parity-runs")


@pytest.mark.parametrize("name", ACCUM_RUNS)
def test_grad_accum_losses_match(accum_runs, name):
    """--grad-accum 4, 30 steps: torch's loop (backward per micro-batch into .grad) and MLX's
    (compiled gradients per micro-batch, summed, then compiled clip + AdamW) train alike."""
    r = accum_runs[name]
    _ok(r)
    assert r["torch"].grad_accum == r["mlx"].grad_accum == r["cfg"].grad_accum == 4
    widths = set(r["prep"].batches.train["widths"].tolist())
    assert widths == ({65} if name == "accum-longest" else {r["cfg"].max_seq_len}), widths
    lt, _, diff, eval_diff = _losses(r)
    assert lt[-1] < lt[0]
    assert diff.max() < REFERENCE_LOSS_ATOL, f"per-step |torch - mlx| = {diff.tolist()}"
    assert eval_diff.max() < REFERENCE_LOSS_ATOL, f"eval |torch - mlx| = {eval_diff.tolist()}"
    tensor, update, _, _ = _adapter_errors(r)
    worst = max(max(tensor.values()), max(update.values()))
    assert worst < FP32_ADAPTER_RTOL, f"adapter rel err {worst:.3g}"


# --fine-tune dora / full (parity_utils.FINE_TUNE_CFG: 30 steps at 64 tokens, the default lr)
FINE_TUNE_RUNS = [f"{ft}-{batching}" for ft in ("dora", "full") for batching in ("padded", "longest")]


@pytest.mark.parametrize("name", FINE_TUNE_RUNS)
def test_fine_tune_losses_match(runs, name):
    """DoRA (PEFT's use_dora vs ftcore's DoRALinear) and full fine-tuning (every decoder layer's
    weights) train alike in torch and MLX: the same trained set (the fingerprint of its initial
    values and its size, which _ok and the closed-form count check) and per-step and eval losses
    within REFERENCE_LOSS_ATOL over 30 steps. Measured (2-core EPYC): <= 1.5e-5 (full-padded)."""
    r = runs[name]
    _ok(r)
    for b in ("torch", "mlx"):
        assert r[b].fine_tune == r["cfg"].fine_tune, b
        assert r[b].trainable_params == r[b].trainable_params_expected, b
    lt, _, diff, eval_diff = _losses(r)
    evals = [v for _, v in r["torch"].eval_losses]
    assert evals[-1] < evals[0] - 0.5, f"eval losses {evals}"  # it trained, and stayed stable
    assert diff.max() < REFERENCE_LOSS_ATOL, f"per-step |torch - mlx| = {diff.tolist()}"
    assert eval_diff.max() < REFERENCE_LOSS_ATOL, f"eval |torch - mlx| = {eval_diff.tolist()}"


def test_longest_runs_fed_narrower_batches(runs):
    """The built-in records (~42 tokens) all fit one width, 65 of 128; the Alpaca-length records
    take several widths up to 512."""
    assert set(runs["fp32-longest"]["prep"].batches.train["widths"].tolist()) == {65}
    widths = set(runs["profile-longest"]["prep"].batches.train["widths"].tolist())
    assert len(widths) >= 2 and max(widths) <= 512, widths


def test_packed_runs_fed_several_records_per_row(runs):
    for name in ("fp32-chat-packed", "profile-packed"):
        stats = runs[name]["prep"].batches.stats
        assert stats["packed_rows"] < stats["train_records"], stats
        assert "position_ids" in runs[name]["prep"].batches.train
    assert runs["fp32-chat-packed"]["prep"].cfg.prompt_format == "chat"


def test_long_run_trains_past_position_64(runs):
    """The 512-token run's loss is taken where a mask or RoPE bug past the short tests' 64
    positions would act: every target sits beyond position 64, in rows longer than 128."""
    train = runs["long"]["prep"].batches.train
    real, targets = train["attention_mask"].sum(-1), train["labels"][..., 1:] != -100
    assert real.min() > 128 and train["input_ids"].shape[-1] == 512
    assert not targets[..., :64].any() and targets.any()


def test_bf16_losses_and_adapters_agree(runs):
    r = runs["bf16"]
    _ok(r)
    _, lm, diff, eval_diff = _losses(r)
    tensor, _, glob, cos = _adapter_errors(r)  # the weights first, as in fp32
    worst = max(tensor, key=tensor.get)
    assert tensor[worst] < BF16_ADAPTER_RTOL, (
        f"{worst}: ||mlx - torch|| / ||torch|| = {tensor[worst]:.3g}"
    )
    assert glob < BF16_GLOBAL_RTOL, f"global update rel err {glob:.3g}"
    assert min(cos.values()) > BF16_MIN_COSINE, f"worst cosine {min(cos.values()):.5f}"
    assert diff.max() < BF16_STEP_LOSS_ATOL, f"per-step |torch - mlx| = {diff.tolist()}"
    assert eval_diff.max() < BF16_EVAL_LOSS_ATOL, f"eval |torch - mlx| = {eval_diff.tolist()}"
    # bf16 stays close to the fp32 run of the same backend (a bf16-only drift would show).
    for b in ("torch", "mlx"):
        drift = np.abs(np.array(r[b].losses) - np.array(runs["fp32"][b].losses)).max()
        assert drift < BF16_VS_FP32_ATOL, f"{b}: bf16 vs fp32 losses differ by {drift:.3g}"


def test_tolerances_are_at_most_10x_the_measured(runs):
    """The measurements recorded beside the FP32_* and BF16_* constants (and REFERENCE_LOSS_ATOL's
    on the dora / full runs), made again on these runs:
    each tolerance holds them and is at most 10x the worst of them. (Here, not in the parity tier:
    a trajectory needs each backend's own child process.)"""
    fp32 = [runs[n] for n in FP32_RUNS]
    loss = max(max(step.max(), evals.max()) for _, _, step, evals in map(_losses, fp32))
    adapter = max(max(max(t.values()), max(u.values())) for t, u, *_ in map(_adapter_errors, fp32))
    _, _, b_diff, b_eval = _losses(runs["bf16"])
    b_tensor, _, b_glob, b_cos = _adapter_errors(runs["bf16"])
    b_drift = max(np.abs(np.array(runs["bf16"][b].losses) - np.array(runs["fp32"][b].losses)).max()
                  for b in ("torch", "mlx"))  # fmt: skip
    measured = {  # name: (worst measured, tolerance)
        "FP32_STEP_LOSS_ATOL": (loss, FP32_STEP_LOSS_ATOL),
        "FP32_ADAPTER_RTOL": (adapter, FP32_ADAPTER_RTOL),
        "BF16_STEP_LOSS_ATOL": (b_diff.max(), BF16_STEP_LOSS_ATOL),
        "BF16_EVAL_LOSS_ATOL": (b_eval.max(), BF16_EVAL_LOSS_ATOL),
        "BF16_ADAPTER_RTOL": (max(b_tensor.values()), BF16_ADAPTER_RTOL),
        "BF16_GLOBAL_RTOL": (b_glob, BF16_GLOBAL_RTOL),
        "1 - BF16_MIN_COSINE": (1 - min(b_cos.values()), 1 - BF16_MIN_COSINE),
        "BF16_VS_FP32_ATOL": (b_drift, BF16_VS_FP32_ATOL),
        "REFERENCE_LOSS_ATOL (dora, full)": (
            max(max(step.max(), evals.max()) for _, _, step, evals in (_losses(runs[n]) for n in FINE_TUNE_RUNS)),
            REFERENCE_LOSS_ATOL),
    }
    print({k: f"{m:.3g} (tolerance {t:.3g})" for k, (m, t) in measured.items()})
    for name, (worst, tol) in measured.items():
        assert worst < tol <= 10 * worst, f"{name}: measured {worst:.3g}, tolerance {tol:.3g}"
