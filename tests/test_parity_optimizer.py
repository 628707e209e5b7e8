"""Property: AdamW steps from the same parameters and gradients give the same adapter weights in
both backends, with each backend's optimizer built by the backend's own `make_optimizer`.

- `test_backends_build_adamw_as_documented`: read back through the real classes: MLX's AdamW
  defaults are weight_decay=0.01 and bias_correction=False, so a backend that relies on them
  fails here with a message naming the trap (weight decay 0 and > 0).
- `test_adamw_steps_match`: hypothesis over shapes, lr / schedule, betas, eps, weight decay 0 and
  > 0, 1-4 steps with fresh gradients (incl. tiny and exact-zero ones), LR set per step the way
  each backend's loop sets it: torch vs MLX vs a float64 numpy AdamW (torch's documented
  algorithm), so a differing formula shows which side is off.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st
from parity_utils import FP32_EPS

from ftcore.config import RunConfig
from ftcore.mlx import optim as mlx_optim
from ftcore.tolerances import FP32_ADAMW_DECAY_ULPS, FP32_ADAMW_UPDATE_RTOL
from ftcore.torch import optim as torch_optim

pytestmark = pytest.mark.parity

# Every field a backend may pass to AdamW has a distinct value here (and lr_at(0) = lr / 2 != lr).
PROBE = dict(lr=1.25e-3, adam_beta1=0.85, adam_beta2=0.975, adam_eps=3e-7, weight_decay=0.037,
             warmup_steps=1, steps=3, num_samples=8, eval_samples=0, batch_size=2, max_seq_len=64)  # fmt: skip


@pytest.fixture(scope="module")
def builders():
    """{"torch": f(params, cfg) -> torch AdamW, "mlx": f(cfg) -> MLX AdamW}, as the backends build them."""
    return {
        "torch": lambda params, cfg: torch_optim.make_optimizer(cfg, params),
        "mlx": mlx_optim.make_optimizer,
    }


@pytest.mark.parametrize("weight_decay", [0.0, 0.037])
def test_backends_build_adamw_as_documented(builders, weight_decay):
    cfg = RunConfig(**{**PROBE, "weight_decay": weight_decay, "lr": 2e-3})
    note_calls = f"config: {cfg}"
    g = builders["torch"]([torch.zeros(1, requires_grad=True)], cfg).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (
        cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, weight_decay,
    ), note_calls  # fmt: skip
    assert not g["amsgrad"] and not g["maximize"], note_calls

    opt = builders["mlx"](cfg)
    assert opt.bias_correction is True, (
        f"MLX AdamW without bias correction (MLX default False); {note_calls}"
    )
    assert opt.weight_decay == weight_decay, (
        f"MLX AdamW weight_decay {opt.weight_decay} (MLX default 0.01); {note_calls}"
    )
    assert [float(b) for b in opt.betas] == [cfg.adam_beta1, cfg.adam_beta2], note_calls
    assert opt.eps == cfg.adam_eps, note_calls
    assert opt.learning_rate.item() == pytest.approx(cfg.lr_at(0), rel=1e-6), note_calls


# ----------------------------------------------------------------------------- the step property


def adamw_reference(params, grads_per_step, lrs, b1, b2, eps, wd):
    """torch.optim.AdamW's documented algorithm in float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs, strict=True), start=1):
        for k in p:
            g = grads[k].astype(np.float64)
            p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@st.composite
def optimizer_cases(draw):
    steps = draw(st.integers(1, 4))
    cfg = RunConfig(
        steps=max(steps, 2),
        lr=draw(st.sampled_from([3e-3, 1e-4]) | st.floats(1e-5, 3e-2)),
        warmup_steps=draw(st.integers(0, 1)),
        lr_schedule=draw(st.sampled_from(["constant", "linear", "cosine"])),
        adam_beta1=draw(st.sampled_from([0.9, 0.0]) | st.floats(0.5, 0.99)),
        adam_beta2=draw(st.sampled_from([0.999, 0.95]) | st.floats(0.9, 0.9999)),
        adam_eps=draw(st.sampled_from([1e-8, 1e-6])),
        weight_decay=draw(st.just(0.0) | st.floats(1e-3, 0.5)),
        num_samples=8,
    )
    shapes = draw(
        st.lists(st.tuples(st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=4)
    )
    g_scale = draw(st.sampled_from([1.0, 1e-3]) | st.floats(1e-7, 10.0))
    return cfg, steps, shapes, g_scale, draw(st.integers(0, 2**32 - 1))


@given(case=optimizer_cases())
def test_adamw_steps_match(builders, case):
    cfg, steps, shapes, g_scale, seed = case
    rng = np.random.default_rng(seed)
    names = [f"model.layers.{i}.self_attn.q_proj.lora_{'AB'[i % 2]}" for i in range(len(shapes))]
    params = {
        n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes, strict=True)
    }
    grads = []
    for _ in range(steps):
        g = {
            n: (g_scale * rng.standard_normal(s)).astype(np.float32)
            for n, s in zip(names, shapes, strict=True)
        }
        for a in g.values():
            a[rng.random(a.shape) < 0.1] = 0.0  # some exact zeros, as for never-touched rows
        grads.append(g)
    lrs = [cfg.lr_at(s) for s in range(steps)]
    b1, b2 = cfg.adam_beta1, cfg.adam_beta2
    note(f"lrs {lrs}")

    # torch, as the torch backend steps it
    tp = {n: torch.nn.Parameter(torch.from_numpy(v.copy())) for n, v in params.items()}
    opt = builders["torch"](list(tp.values()), cfg)
    for g, lr in zip(grads, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        for n, p in tp.items():
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
        opt.zero_grad(set_to_none=True)
    out_t = {n: p.detach().numpy() for n, p in tp.items()}

    # MLX, as the MLX backend steps it
    mp = {n: mx.array(v) for n, v in params.items()}
    mopt = builders["mlx"](cfg)
    mopt.init(mp)
    for g, lr in zip(grads, lrs, strict=True):
        mopt.learning_rate = lr
        mp = mopt.apply_gradients({n: mx.array(v) for n, v in g.items()}, mp)
        mx.eval(mp)
    out_m = {n: np.array(v) for n, v in mp.items()}

    ref = adamw_reference(params, grads, lrs, b1, b2, cfg.adam_eps, cfg.weight_decay)
    # Elementwise is right here (same gradients on both sides). Per step, fp32 rounds p three
    # times (1 - lr*wd, the decay product, the update subtraction: <= 1.5u|p|), and the update
    # itself, at most ~lr/sqrt(1-b2) in size (bias-corrected Adam), carries relative error ~1e-6.
    # tol = FP32_ADAMW_DECAY_ULPS*steps*u*|p| + FP32_ADAMW_UPDATE_RTOL * sum(lr) / sqrt(1-b2)
    # (3u: margin over the 1.5u worst case).
    # Measured over 300 cases: worst err/tol 0.36 on either side, torch vs MLX 0.24.
    for n in names:
        tol = (FP32_ADAMW_DECAY_ULPS * steps * FP32_EPS * np.abs(ref[n])
               + FP32_ADAMW_UPDATE_RTOL * sum(lrs) / np.sqrt(1 - b2))
        err_t, err_m = np.abs(out_t[n] - ref[n]), np.abs(out_m[n] - ref[n])
        moved = np.abs(ref[n] - params[n]).max()
        note(
            f"{n}: moved {moved:.3g}, torch-ref {err_t.max():.3g}, mlx-ref {err_m.max():.3g}, tol {tol.max():.3g}"
        )
        assert (err_t <= tol).all(), f"torch AdamW differs from the reference formula on {n}"
        assert (err_m <= tol).all(), (
            f"MLX AdamW (as the backend builds it) differs from torch's formula on {n}"
        )
        assert (np.abs(out_m[n] - out_t[n]) <= tol).all()
