"""Property: for any tiny Llama config (1-3 layers, GQA, explicit head_dim, rope theta, RMSNorm eps,
tied or untied head), random weights at a large init std, a PEFT adapter with random non-zero B
on random targets, and a batch with left and right padding, ftcore's MLX model (weights through
the real converter, adapter through the real adapter converter) gives transformers + peft's
logits at every non-pad position, fp32. Short batches (<= 20 tokens) for many configs; long ones
(96-512 tokens, and 128 and 512 exactly) at width <= 64 for a few."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import make_hf_model, max_err_real, mlx_logits, torch_logits
from hypothesis import given, note, settings
from hypothesis import strategies as st
from parity_utils import (
    LONG_EXAMPLES,
    LONGEST,
    add_peft,
    long_case,
    long_model_cases,
    measured_on_stated_cases,
    mlx_model_with_adapter,
    model_cases,
    peft_state_np,
    save_and_convert,
    tinyllama_width_config,
)

from ftcore.tolerances import (
    FP32_LOGITS_ERROR_FLOOR,
    FP32_LOGITS_ERROR_RATIO,
    FP32_LONG_LOGITS_ATOL,
    LONG_LOGITS_FLAT_POSITIONS,
)

pytestmark = pytest.mark.parity

# The fp32 logits contract (MLX vs transformers + peft), short batches: MLX's fp32 logits are as
# accurate as transformers + peft's, both measured against the same PEFT model in float64 at every
# real position: |mlx - ref64| <= FP32_LOGITS_ERROR_RATIO * max(|torch - ref64|,
# FP32_LOGITS_ERROR_FLOOR) (ftcore/tolerances.py). An absolute bound fails on ill-conditioned draws
# that are no bug (3 layers at init std 0.22, head_dim 2, LoRA scale 32: torch's own fp32 error
# 1.3e-4, MLX's 3.1e-5, their difference 1.6e-4), while a wrong operation in MLX moves its error by
# orders of magnitude. Measured on the stated cases (parity_utils.TOLERANCE_EXAMPLES;
# test_tolerance_is_at_most_10x_the_measured makes it again): worst ratio 2.77 (median 1.1), so
# 3.6x headroom; |mlx - torch| itself at most 1.4e-5 there. The long-sequence bound
# (long_logits_tol) was measured on its own: 600 long cases, worst err/bound 0.41.


def _logits_pair(cfg, lora, batch, seed, attn="sdpa", fp64=False):
    """(PEFT fp32 logits, MLX logits, base-model logits, PEFT float64 logits or None)."""
    hf = make_hf_model({**cfg}, seed)
    hf.config._attn_implementation = attn  # noqa: SLF001 (eager vs sdpa: both must match)
    with tempfile.TemporaryDirectory() as tmp:
        _, mlx_dir = save_and_convert(hf, Path(tmp))
        pm = add_peft(hf, lora["targets"], lora["rank"], lora["alpha"], lora["b_std"], seed + 1)
        model, _ = mlx_model_with_adapter(
            mlx_dir, lora["targets"], lora["rank"], lora["alpha"], peft_state_np(pm)
        )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = torch_logits(pm, ids, mask)
    with pm.disable_adapter():
        no_lora = torch_logits(pm.get_base_model(), ids, mask)
    got = mlx_logits(model, ids, mask)
    return ref, got, no_lora, (_float64_logits(pm, ids, mask) if fp64 else None)


def _float64_logits(pm, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The same PEFT model's logits in float64 (on a copy: `pm` stays fp32), (B, L, V), NaN at pad.
    Row by row on its real tokens at their batch positions, with no padding: in float64 a padded
    query attends to nothing and turns NaN, and a later layer's 0-weighted NaN value spreads it."""
    import torch

    model = copy.deepcopy(pm).double()
    out = np.full((*ids.shape, model.config.vocab_size), np.nan)
    with torch.no_grad():
        for r in range(ids.shape[0]):
            pos = np.flatnonzero(mask[r])  # (n,) the real tokens: contiguous, left or right padded
            logits = model(input_ids=torch.from_numpy(ids[r, pos][None]), position_ids=torch.from_numpy(pos[None])).logits
            out[r, pos] = logits[0].numpy()
    return out


def _error_ratio(ref, got, ref64, mask) -> tuple[float, str]:
    """(|mlx - ref64| / max(|torch - ref64|, FP32_LOGITS_ERROR_FLOOR), why) over real positions."""
    e_torch, e_mlx = max_err_real(ref, ref64, mask), max_err_real(got, ref64, mask)
    why = (f"max |logit| {np.abs(ref).max():.3g}; vs float64: torch {e_torch:.3g}, mlx {e_mlx:.3g}; "
           f"|mlx - torch| {max_err_real(ref, got, mask):.3g}")  # fmt: skip
    return e_mlx / max(e_torch, FP32_LOGITS_ERROR_FLOOR), why


@given(case=model_cases(), attn=st.sampled_from(["sdpa", "eager"]))
def test_model_logits_match_peft(case, attn):
    cfg, lora, batch, seed = case
    ref, got, no_lora, ref64 = _logits_pair(cfg, lora, batch, seed, attn, fp64=True)
    mask = batch["attention_mask"]
    ratio, why = _error_ratio(ref, got, ref64, mask)
    note(f"{why}; LoRA moved logits by {max_err_real(ref, no_lora, mask):.3g}")
    assert np.isfinite(got).all()
    assert ratio <= FP32_LOGITS_ERROR_RATIO, why


def _short_ratio(case) -> float:
    cfg, lora, batch, seed = case
    ref, got, _, ref64 = _logits_pair(cfg, lora, batch, seed, fp64=True)
    return _error_ratio(ref, got, ref64, batch["attention_mask"])[0]


def test_tolerance_is_at_most_10x_the_measured():
    """The measurement recorded beside FP32_LOGITS_ERROR_RATIO, made again on the stated cases
    (parity_utils.TOLERANCE_EXAMPLES): within it, and FP32_LOGITS_ERROR_RATIO at most 10x it."""
    worst = max(measured_on_stated_cases(model_cases(), _short_ratio))
    print(f"stated cases: worst MLX / torch error against float64 {worst:.3g}")
    assert worst < FP32_LOGITS_ERROR_RATIO <= 10 * worst, worst


def long_logits_tol(length: int) -> np.ndarray:
    """Per-position bound (L,): FP32_LONG_LOGITS_ATOL up to position LONG_LOGITS_FLAT_POSITIONS,
    then growing linearly. fp32
    RoPE angles p * theta^(-2i/d) carry an absolute error ~p * 6e-8 rad, rounded differently in
    each framework (each equally far from float64: 6e-5 at p = 512, theta 60), so the rotated
    q/k and the scores drift apart with p. Measured over 600 long cases: worst err/bound 0.41
    (max err 3.1e-4 at p ~ 430; 4.1e-5 below p = 64)."""
    return FP32_LONG_LOGITS_ATOL * np.maximum(1.0, np.arange(length) / LONG_LOGITS_FLAT_POSITIONS)


def _check_long(case):
    cfg, lora, batch, seed = case
    ref, got, _, _ = _logits_pair(cfg, lora, batch, seed)
    mask = batch["attention_mask"].astype(bool)
    err = np.where(mask[..., None], np.abs(ref - got), 0.0).max(axis=(0, 2))  # (L,)
    ratio = err / long_logits_tol(mask.shape[1])
    p = int(ratio.argmax())
    why = (
        f"L {mask.shape[1]}, real {mask.sum(1).tolist()}, max |logit| {np.abs(ref).max():.3g}; "
        f"worst at position {p}: |mlx - peft| {err[p]:.3g}, bound {long_logits_tol(p + 1)[p]:.3g}"
    )
    assert np.isfinite(got).all(), why
    assert ratio.max() <= 1.0, why


@settings(max_examples=LONG_EXAMPLES)
@given(case=long_model_cases())
def test_long_sequence_logits_match_peft(case):
    _check_long(case)


@pytest.mark.parametrize("length", [128, LONGEST])  # the default max_seq_len; the longest
def test_logits_match_peft_at_length(length):
    _check_long(long_case(length))


def test_tinyllama_width_one_layer():
    """TinyLlama-1.1B's real width (hidden 2048, intermediate 5632, 32 heads / 4 kv heads,
    head_dim 64, theta 1e4, eps 1e-5), one layer, a small vocab; LoRA r8 on every target."""
    cfg = tinyllama_width_config()
    lora = dict(
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        rank=8,
        alpha=16.0,
        b_std=0.02,
    )
    seed = 0
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 512, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padded
    mask[1, 9:] = 0  # right padded
    batch = {"input_ids": ids, "attention_mask": mask}
    ref, got, no_lora, ref64 = _logits_pair(cfg, lora, batch, seed, fp64=True)
    ratio, why = _error_ratio(ref, got, ref64, mask)
    effect = max_err_real(ref, no_lora, mask)
    assert effect > 1e-2, f"{why}; LoRA effect {effect:.3g}"  # the adapter really acts
    assert ratio <= FP32_LOGITS_ERROR_RATIO, why
