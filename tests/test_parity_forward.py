"""Property: for any tiny Llama config (1-3 layers, GQA, explicit head_dim, rope theta, RMSNorm eps,
tied or untied head), random weights at a large init std, a PEFT adapter with random non-zero B
on random targets, and a batch with left and right padding, ftcore's MLX model (weights through
the real converter, adapter through the real adapter converter) gives transformers + peft's
logits at every non-pad position, fp32. Short batches (<= 20 tokens) for many configs; long ones
(96-512 tokens, and 128 and 512 exactly) at width <= 64 for a few."""

from __future__ import annotations

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

pytestmark = pytest.mark.parity

# The fp32 logits contract (MLX vs transformers + peft) on tiny configs: worst |diff| on the
# stated cases (parity_utils.TOLERANCE_EXAMPLES; test_tolerance_is_at_most_10x_the_measured makes
# it again) 1.29e-5 in a process of its own, 9.5e-6 after the rest of the parity tier (the
# frameworks' thread state moves fp32 rounding): 5.4-7.3x headroom.
LOGITS_ATOL = 7e-5
# The long-sequence bound's base (long_logits_tol), measured on its own: 600 long cases, worst
# err/bound 0.41.
LONG_LOGITS_ATOL = 1e-4


def _logits_pair(cfg, lora, batch, seed, attn="sdpa"):
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
    return ref, got, no_lora


@given(case=model_cases(), attn=st.sampled_from(["sdpa", "eager"]))
def test_model_logits_match_peft(case, attn):
    cfg, lora, batch, seed = case
    ref, got, no_lora = _logits_pair(cfg, lora, batch, seed, attn)
    mask = batch["attention_mask"]
    err = max_err_real(ref, got, mask)
    note(
        f"max |logit| {np.abs(ref).max():.3g}, LoRA moved logits by {max_err_real(ref, no_lora, mask):.3g}, err {err:.3g}"
    )
    assert np.isfinite(got).all()
    assert err < LOGITS_ATOL


def _short_err(case) -> float:
    cfg, lora, batch, seed = case
    ref, got, _ = _logits_pair(cfg, lora, batch, seed)
    return max_err_real(ref, got, batch["attention_mask"])


def test_tolerance_is_at_most_10x_the_measured():
    """The measurement recorded beside LOGITS_ATOL, made again on the stated cases
    (parity_utils.TOLERANCE_EXAMPLES): within it, and LOGITS_ATOL at most 10x it."""
    worst = max(measured_on_stated_cases(model_cases(), _short_err))
    print(f"stated cases: worst |mlx - peft| logit {worst:.3g}")
    assert worst < LOGITS_ATOL <= 10 * worst, worst


def long_logits_tol(length: int) -> np.ndarray:
    """Per-position bound (L,): the 1e-4 contract up to position 32, then growing linearly. fp32
    RoPE angles p * theta^(-2i/d) carry an absolute error ~p * 6e-8 rad, rounded differently in
    each framework (each equally far from float64: 6e-5 at p = 512, theta 60), so the rotated
    q/k and the scores drift apart with p. Measured over 600 long cases: worst err/bound 0.41
    (max err 3.1e-4 at p ~ 430; 4.1e-5 below p = 64)."""
    return LONG_LOGITS_ATOL * np.maximum(1.0, np.arange(length) / 32)


def _check_long(case):
    cfg, lora, batch, seed = case
    ref, got, _ = _logits_pair(cfg, lora, batch, seed)
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
    ref, got, no_lora = _logits_pair(cfg, lora, batch, seed)
    err, effect = max_err_real(ref, got, mask), max_err_real(ref, no_lora, mask)
    why = f"max |logit| {np.abs(ref).max():.3g}, LoRA effect {effect:.3g}, |mlx - peft| {err:.3g}"
    assert effect > 1e-2, why  # the adapter really acts
    assert err < LOGITS_ATOL, why
