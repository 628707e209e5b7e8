"""Property: ftcore's MLX LoRALinear computes exactly what PEFT's LoRA Linear computes, for any
shape, rank, alpha, leading batch dims, base weights and (non-zero) adapter weights, in fp32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from parity_utils import FP32_EPS
from peft import LoraConfig, get_peft_model

from ftcore.mlx.lora import LoRALinear

pytestmark = pytest.mark.parity


class _One(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


@given(
    d_in=st.integers(1, 96),
    d_out=st.integers(1, 96),
    rank=st.integers(1, 16),
    alpha=st.sampled_from([1.0, 8.0, 16.0]) | st.floats(0.25, 64.0),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),  # () / (seq,) / (batch, seq)
    x_scale=st.floats(0.1, 4.0),
    b_std=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_lora_linear_matches_peft(d_in, d_out, rank, alpha, lead, x_scale, b_std, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    a = rng.uniform(-1, 1, (rank, d_in)).astype(np.float32) / np.float32(np.sqrt(d_in))
    b = (b_std * rng.standard_normal((d_out, rank))).astype(np.float32)
    x = (x_scale * rng.standard_normal((*lead, d_in))).astype(np.float32)

    # torch: a real PeftModel around a one-linear module, the adapter weights copied in.
    net = _One(d_in, d_out)
    with torch.no_grad():
        net.proj.weight.copy_(torch.from_numpy(w))
    pm = get_peft_model(
        net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    )
    layer = pm.base_model.model.proj
    assert layer.scaling["default"] == pytest.approx(alpha / rank)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
        ref = pm(torch.from_numpy(x)).numpy()

    lora = LoRALinear(mx.array(w), rank=rank, alpha=alpha)
    lora.lora_A, lora.lora_B = mx.array(a), mx.array(b)
    got = np.array(lora(mx.array(x)))

    assert got.shape == ref.shape == (*lead, d_out)
    # Tolerance: 1e-5 abs + 1e-4 rel, plus a term that grows with the reduction length. An fp32 dot
    # product of length n has rounding error <= ~sqrt(n)*u*sum|a_i b_i| (probabilistic form of
    # Higham's gamma_n bound), so the per-output budget scales with sqrt(d_in) and with the
    # absolute-value product |x||W|^T + s|x||A|^T|B|^T, not with |y| (which can cancel to ~0).
    s = alpha / rank
    absdot = np.abs(x) @ np.abs(w).T + s * (np.abs(x) @ np.abs(a).T) @ np.abs(b).T
    tol = 1e-5 + 1e-4 * np.abs(ref) + 4 * FP32_EPS * np.sqrt(max(d_in, rank)) * absdot
    err = np.abs(got - ref)
    note(
        f"max err {err.max():.3g}, max |y| {np.abs(ref).max():.3g}, worst err/tol {(err / tol).max():.3g}"
    )
    assert (err <= tol).all()
    # The adapter really contributes (so a wrong scale or layout cannot hide below the tolerance).
    delta = np.abs(ref - x @ w.T).max()
    note(f"max |LoRA term| {delta:.3g}")
