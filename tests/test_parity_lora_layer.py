"""Property: ftcore's MLX LoRALinear computes exactly what PEFT's LoRA Linear computes, for any
shape, rank, alpha, leading batch dims, base weights and (non-zero) adapter weights, in fp32; and
its DoRALinear what PEFT's use_dora Linear computes, output and gradients (A, B, magnitude, input)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from parity_utils import FP32_EPS
from peft import LoraConfig, get_peft_model

from ftcore.mlx.lora import DoRALinear, LoRALinear
from ftcore.tolerances import (
    BF16_LORA_GRAD_ATOL,
    BF16_LORA_OUTPUT_DOT_RTOL,
    FP32_DORA_GRAD_ATOL,
    FP32_DOT_ULPS,
    FP32_LORA_LAYER_ATOL,
    FP32_LORA_LAYER_RTOL,
)

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
    # Tolerance: absolute + relative, plus a term that grows with the reduction length. An fp32 dot
    # product of length n has rounding error <= ~sqrt(n)*u*sum|a_i b_i| (probabilistic form of
    # Higham's gamma_n bound), so the per-output budget scales with sqrt(d_in) and with the
    # absolute-value product |x||W|^T + s|x||A|^T|B|^T, not with |y| (which can cancel to ~0).
    s = alpha / rank
    absdot = np.abs(x) @ np.abs(w).T + s * (np.abs(x) @ np.abs(a).T) @ np.abs(b).T
    tol = (FP32_LORA_LAYER_ATOL + FP32_LORA_LAYER_RTOL * np.abs(ref)
           + FP32_DOT_ULPS * FP32_EPS * np.sqrt(max(d_in, rank)) * absdot)
    err = np.abs(got - ref)
    note(
        f"max err {err.max():.3g}, max |y| {np.abs(ref).max():.3g}, worst err/tol {(err / tol).max():.3g}"
    )
    assert (err <= tol).all()
    # The adapter really contributes (so a wrong scale or layout cannot hide below the tolerance).
    # Bound: wherever the float64 LoRA term s*B(A(x)) is > 4x the largest tolerance (most draws;
    # tiny b_std * x_scale / rank ones are below it), PEFT's output moves by > 2x the tolerance,
    # so a layer that dropped or halved the adapter fails the match above.
    delta = np.abs(ref - x @ w.T).max()
    term = np.abs(s * (x.astype(np.float64) @ a.T) @ b.T).max() if x.size else 0.0
    note(f"max |LoRA term| {delta:.3g} (float64 {term:.3g})")
    if term > 4 * tol.max():
        assert delta > 2 * tol.max(), f"LoRA term {delta:.3g} within the tolerance {tol.max():.3g}"


# ----------------------------------------------------------------------------- bf16 base

BF16_ULP = 2.0**-7  # spacing of bf16 numbers in [1, 2)


@given(
    d_in=st.integers(8, 96),
    d_out=st.integers(8, 96),
    rank=st.integers(1, 16),
    alpha=st.sampled_from([8.0, 16.0]) | st.floats(0.25, 64.0),
    rows=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_lora_linear_on_bf16_base_keeps_the_adapter_math_fp32(d_in, d_out, rank, alpha, rows, seed):
    """The bf16 contract at one layer: a bf16 base weight and bf16 input, fp32 lora_A / lora_B.
    PEFT upcasts x to the adapter's fp32, adds the fp32 update to the bf16 base output and rounds
    once. Given the same bf16 cotangent, the adapter gradients come out of fp32 arithmetic on
    bf16-exact inputs, so they agree to fp32 rounding; LoRA matmuls done in bf16 miss by ~2^-9
    relative. The bf16 trajectory test cannot see that: the two frameworks' bf16 base rounding
    moves its losses by ~2e-3, more than LoRA in bf16 does (test_parity_training.py)."""
    rng = np.random.default_rng(seed)
    to_bf16 = lambda a: torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)  # noqa: E731
    w = to_bf16(rng.standard_normal((d_out, d_in)) / np.sqrt(d_in))
    x = to_bf16(rng.standard_normal((rows, d_in)))
    g = to_bf16(rng.standard_normal((rows, d_out)))  # the cotangent a bf16 network sends back
    a = (rng.uniform(-1, 1, (rank, d_in)) / np.sqrt(d_in)).astype(np.float32)
    b = (0.2 * rng.standard_normal((d_out, rank))).astype(np.float32)

    net = _One(d_in, d_out).to(torch.bfloat16)
    with torch.no_grad():
        net.proj.weight.copy_(w)
    pm = get_peft_model(
        net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    )
    layer = pm.base_model.model.proj
    la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert la.dtype == lb.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    with torch.no_grad():
        la.copy_(torch.from_numpy(a))
        lb.copy_(torch.from_numpy(b))
    ref = pm(x)
    ref.backward(g)
    ref_y, ref_ga, ref_gb = ref.float().detach().numpy(), la.grad.numpy(), lb.grad.numpy()

    bf = lambda t: mx.array(t.float().numpy()).astype(mx.bfloat16)  # noqa: E731 (exact: bf16 values)
    lora = LoRALinear(bf(w), rank=rank, alpha=alpha)

    def run(lora_a, lora_b):
        lora.lora_A, lora.lora_B = lora_a, lora_b
        return lora(bf(x))

    (y,), (ga, gb) = mx.vjp(run, [mx.array(a), mx.array(b)], [bf(g)])
    assert y.dtype == mx.bfloat16 and ga.dtype == gb.dtype == mx.float32
    got_y, got_ga, got_gb = np.array(y.astype(mx.float32)), np.array(ga), np.array(gb)

    # Output: PEFT rounds the bf16 base output W x, adds the fp32 update and rounds the sum; the
    # bf16 base GEMMs may round differently (fp32 accumulation order). So one bf16 ulp of the
    # output's magnitude plus one of W x's: where the update cancels most of W x (seed 111, d_in
    # 50, d_out 86, rank 5: |W x| ~ 1, output 0.029), W x's rounding is what shows.
    s = alpha / rank
    xf, wf = x.float().numpy(), w.float().numpy()
    absdot = np.abs(xf) @ np.abs(wf).T + s * (np.abs(xf) @ np.abs(a).T) @ np.abs(b).T
    base = np.abs(xf @ wf.T)
    assert (np.abs(got_y - ref_y) <= BF16_ULP * (np.abs(ref_y) + base) + BF16_LORA_OUTPUT_DOT_RTOL * absdot).all()
    # Gradients: fp32 dot products over bf16-exact inputs (rows, then rank / d_out terms):
    # the fp32 budget of test_lora_linear_matches_peft, with |g|, |x|, |A|, |B| in the sums.
    # Measured over 200 cases: worst err/tol 0.14 (median 0.02); with the LoRA matmuls in bf16,
    # err/tol >= 253 in every one of 400 cases.
    gf = np.abs(g.float().numpy())
    n = max(rows, rank, d_out)
    tol_b = BF16_LORA_GRAD_ATOL + FP32_DOT_ULPS * FP32_EPS * np.sqrt(n) * s * (gf.T @ (np.abs(xf) @ np.abs(a).T))
    tol_a = BF16_LORA_GRAD_ATOL + FP32_DOT_ULPS * FP32_EPS * np.sqrt(n) * s * ((gf @ np.abs(b)).T @ np.abs(xf))
    err_a, err_b = np.abs(got_ga - ref_ga), np.abs(got_gb - ref_gb)
    note(f"grad A err/tol {(err_a / tol_a).max():.3g}, grad B err/tol {(err_b / tol_b).max():.3g}")
    assert (err_b <= tol_b).all(), "lora_B gradient is not fp32 math under a bf16 base"
    assert (err_a <= tol_a).all(), "lora_A gradient is not fp32 math under a bf16 base"


# ----------------------------------------------------------------------------- DoRA


class _Mask(torch.nn.Module):
    """Dropout with a given keep mask (the frameworks draw different masks): x * keep / (1 - p)."""

    def __init__(self, scaled_keep: np.ndarray):
        super().__init__()
        self.scaled_keep = torch.from_numpy(scaled_keep)

    def forward(self, x):
        return x * self.scaled_keep


def _dora_case(d_in, d_out, rank, alpha, lead, x_scale, b_std, seed, dropout=0.0, mode="train"):
    """PEFT's DoRA Linear and ftcore's DoRALinear on the same W, A, B (non-zero), magnitude m (the
    row norms of W + s B A times U(0.5, 1.5), so g = m / ||W + s B A|| is not 1) and input, in
    `mode`: "train" (dropout 0), "eval" (dropout > 0, which eval turns off) or "mask" (train with
    dropout > 0, both sides given one keep mask). Each side's output and the gradients of
    <output, c> for one random cotangent c w.r.t. lora_A, lora_B, the magnitude and x, and the
    budget of each (the comment below), as numpy."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(np.float32)
    a = rng.uniform(-1, 1, (rank, d_in)).astype(np.float32) / np.float32(np.sqrt(d_in))
    b = (b_std * rng.standard_normal((d_out, rank))).astype(np.float32)
    x = (x_scale * rng.standard_normal((*lead, d_in))).astype(np.float32)
    c = rng.standard_normal((*lead, d_out)).astype(np.float32)
    s = alpha / rank
    w64, ba64 = w.astype(np.float64), b.astype(np.float64) @ a
    norm = np.linalg.norm(w64 + s * ba64, axis=1)  # (out,)
    m = (norm * rng.uniform(0.5, 1.5, d_out)).astype(np.float32)
    amp = 1.0 / (1.0 - dropout) if mode == "mask" else 1.0
    keep = (rng.random(x.shape) >= dropout).astype(np.float32) * np.float32(amp)

    # torch: a real PeftModel (use_dora) around a one-linear module, the weights copied in.
    net = _One(d_in, d_out)
    with torch.no_grad():
        net.proj.weight.copy_(torch.from_numpy(w))
    pm = get_peft_model(net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"],
                                        lora_dropout=dropout, use_dora=True))  # fmt: skip
    layer = pm.base_model.model.proj
    la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    mag = layer.lora_magnitude_vector["default"].weight
    assert mag.shape == (d_out,) and layer.scaling["default"] == pytest.approx(s)
    with torch.no_grad():
        la.copy_(torch.from_numpy(a))
        lb.copy_(torch.from_numpy(b))
        mag.copy_(torch.from_numpy(m))
    if mode == "mask":
        layer.lora_dropout["default"] = _Mask(keep)
    pm.train(mode != "eval")
    xt = torch.from_numpy(x).requires_grad_(True)
    y = pm(xt)
    y.backward(torch.from_numpy(c))
    ref = [t.detach().numpy() for t in (y, la.grad, lb.grad, mag.grad, xt.grad)]

    dora = DoRALinear(mx.array(w), rank=rank, alpha=alpha, dropout=dropout)
    if mode == "mask":
        dora.dropout = lambda v: v * mx.array(keep)
    dora.train(mode != "eval")

    def run(lora_a, lora_b, magnitude, inp):
        dora.lora_A, dora.lora_B, dora.lora_magnitude_vector = lora_a, lora_b, magnitude
        return dora(inp)

    (got_y,), grads = mx.vjp(run, [mx.array(v) for v in (a, b, m, x)], [mx.array(c)])
    got = [np.array(got_y), *map(np.array, grads)]

    # Budgets: the fp32 dot-product bound of test_lora_linear_matches_peft on the absolute-value
    # products, with g's own rounding in: ||W + s B A|| per row has relative error ~ u sqrt(d_in)
    # kappa, kappa = || |W| + s |B||A| || / ||W + s B A|| (1 unless the row cancels), so every
    # term that g multiplies gets the factor g (1 + kappa), and the base term |g - 1| more
    # (y = W x + (g - 1) W x + g s B A x, summed in that order). With dropout, |x| is taken at
    # its largest (x / (1 - p)). Rows R = the flattened lead dims; n = the longest reduction.
    g = m / norm
    kappa = np.linalg.norm(np.abs(w64) + s * np.abs(b) @ np.abs(a), axis=1) / norm
    gk = g * (1 + kappa)  # (out,)
    xa = amp * np.abs(x).reshape(-1, d_in)  # (R, in)
    ca = np.abs(c).reshape(-1, d_out)  # (R, out)
    wx, az = xa @ np.abs(w).T, xa @ np.abs(a).T  # (R, out), (R, rank)
    absdot = wx + s * az @ np.abs(b).T  # (R, out)
    n = max(d_in, d_out, rank, xa.shape[0])
    dot = FP32_DOT_ULPS * FP32_EPS * np.sqrt(n)
    tol = [
        (FP32_LORA_LAYER_ATOL + FP32_LORA_LAYER_RTOL * np.abs(ref[0])
         + dot * (absdot * (gk + np.abs(g - 1))).reshape(ref[0].shape)),
        FP32_DORA_GRAD_ATOL + dot * s * ((ca * gk) @ np.abs(b)).T @ xa,  # lora_A (rank, in)
        FP32_DORA_GRAD_ATOL + dot * s * (ca * gk).T @ az,  # lora_B (out, rank)
        FP32_DORA_GRAD_ATOL + dot * (1 + kappa) * (ca * absdot).sum(0) / norm,  # magnitude (out,)
        FP32_DORA_GRAD_ATOL + dot * amp * ((ca * (gk + np.abs(g - 1))) @ np.abs(w)  # x
                                           + s * (ca * gk) @ np.abs(b) @ np.abs(a)).reshape(x.shape),
    ]  # fmt: skip
    return dict(got=got, ref=ref, tol=tol, x=x, w=w, a=a, b=b, g=g, s=s, keep=keep, mode=mode)


def _assert_dora_matches(case):
    names = ("output", "lora_A grad", "lora_B grad", "magnitude grad", "x grad")
    ratios = {}
    for name, got, ref, tol in zip(names, case["got"], case["ref"], case["tol"], strict=True):
        assert got.shape == ref.shape, name
        ratios[name] = float((np.abs(got - ref) / tol).max())
    note(f"worst err/tol {ratios}")
    bad = {k: v for k, v in ratios.items() if not v <= 1}
    assert not bad, f"DoRALinear differs from PEFT's DoRA: err/tol {bad}"
    # DoRA really acts: wherever float64 DoRA's output is > 4x the largest tolerance away from
    # LoRA's (g - 1 times W x + s B A x; most draws, g is 0.5-1.5), PEFT's is > 2x it away, so
    # DoRA run as plain LoRA (or its magnitude dropped) fails the match above.
    x, w, a, b, g, s = (case[k] for k in "xwabgs")
    xd = x * case["keep"] if case["mode"] == "mask" else x
    lora64 = x.astype(np.float64) @ w.T + s * (xd.astype(np.float64) @ a.T) @ b.T
    dora64 = x.astype(np.float64) @ w.T + (g - 1) * (xd @ w.T) + g * (s * (xd @ a.T) @ b.T)
    tol = case["tol"][0].max()
    if np.abs(dora64 - lora64).max() > 4 * tol:
        assert np.abs(case["ref"][0] - lora64).max() > 2 * tol


DORA_SHAPES = dict(
    d_in=st.integers(1, 96),
    d_out=st.integers(1, 96),
    rank=st.integers(1, 16),
    alpha=st.sampled_from([1.0, 8.0, 16.0]) | st.floats(0.25, 64.0),
    # (seq,) / (batch, seq): PEFT's DoRA turns an unbatched x (in,) into (1, out)
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=2),
    x_scale=st.floats(0.1, 4.0),
    b_std=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)


@given(**DORA_SHAPES)
def test_dora_linear_matches_peft(d_in, d_out, rank, alpha, lead, x_scale, b_std, seed):
    """ftcore's DoRALinear vs PEFT's use_dora Linear, dropout 0, train mode: the output and the
    gradients w.r.t. lora_A, lora_B, the magnitude and the input (PEFT detaches the norm)."""
    _assert_dora_matches(_dora_case(d_in, d_out, rank, alpha, lead, x_scale, b_std, seed))


@given(**DORA_SHAPES, dropout=st.floats(0.05, 0.5), mode=st.sampled_from(["eval", "mask"]))
def test_dora_linear_with_dropout_matches_peft(d_in, d_out, rank, alpha, lead, x_scale, b_std, seed,
                                               dropout, mode):
    """With dropout: in eval mode it is off (y = W x + (g - 1) W x + g s B A x); in train mode,
    given one keep mask on both sides, the base term is W d(x), not W x, as PEFT computes it."""
    _assert_dora_matches(_dora_case(d_in, d_out, rank, alpha, lead, x_scale, b_std, seed, dropout, mode))
