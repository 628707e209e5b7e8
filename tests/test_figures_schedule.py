"""The learning rate of every step: RunConfig.lr_at against the formula written out by hand and
against transformers' schedules, as torch's and MLX's optimizers (built by the backends'
make_optimizer) hold it; and the fairness check that compares the LR each backend applied with
the documented schedule rather than with the other backends."""

from __future__ import annotations

import copy
import math

import pytest

from ftcore.config import RunConfig
from ftcore.report import fairness_checks

pytestmark = pytest.mark.unit

CFG = RunConfig(lr=2e-3, steps=20, warmup_steps=3, lr_schedule="cosine")


def by_hand(kind: str, s: int) -> float:
    """CFG's LR at step s: warm-up 2e-3 * (s + 1) / 4 for s < 3, then over t = (s - 3) / 17."""
    if s < 3:
        return 2e-3 * (s + 1) / 4
    t = (s - 3) / 17
    return {"constant": 2e-3, "linear": 2e-3 * (1 - t), "cosine": 1e-3 * (1 + math.cos(math.pi * t))}[kind]


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_at_by_hand_first_warmup_end_middle_last(kind) -> None:
    cfg = CFG.replace(lr_schedule=kind)
    for s in range(cfg.steps):
        assert cfg.lr_at(s) == pytest.approx(by_hand(kind, s), rel=1e-12), s
    assert cfg.lr_at(0) == pytest.approx(5e-4)  # first: never a zero-LR step
    assert cfg.lr_at(3) == pytest.approx(2e-3)  # warm-up end: the peak
    mid = {"cosine": 1e-3 * (1 + math.cos(math.pi * 8 / 17)), "linear": 2e-3 * 9 / 17, "constant": 2e-3}
    assert cfg.lr_at(11) == pytest.approx(mid[kind])
    last = {"cosine": 1e-3 * (1 + math.cos(math.pi * 16 / 17)), "linear": 2e-3 / 17, "constant": 2e-3}
    assert cfg.lr_at(19) == pytest.approx(last[kind]) and cfg.lr_at(19) > 0  # last: not 0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_torch_and_mlx_optimizers_hold_transformers_schedule(kind) -> None:
    """After the warm-up (ftcore's starts at lr / (warmup + 1), transformers' at 0) every step's
    LR equals transformers' get_*_schedule_with_warmup on the torch optimizer; the LR each loop
    sets, read back from torch's and MLX's optimizer, is lr_at's."""
    import torch
    import transformers

    from ftcore.mlx.optim import make_optimizer as mlx_optimizer
    from ftcore.torch.optim import make_optimizer as torch_optimizer

    cfg = CFG.replace(lr_schedule=kind)
    ref = torch_optimizer(cfg, [torch.zeros(1, requires_grad=True)])
    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}.get(kind)
    sched = (make(ref, cfg.warmup_steps, cfg.steps) if make else
             transformers.get_constant_schedule_with_warmup(ref, cfg.warmup_steps))
    mine = torch_optimizer(cfg, [torch.zeros(1, requires_grad=True)])
    mopt = mlx_optimizer(cfg)
    for s in range(cfg.steps):
        hf = ref.param_groups[0]["lr"]
        for group in mine.param_groups:  # as ftcore.backends.torch sets it
            group["lr"] = cfg.lr_at(s)
        mopt.learning_rate = cfg.lr_at(s)  # as ftcore.backends.mlx sets it
        if s >= cfg.warmup_steps:
            assert mine.param_groups[0]["lr"] == pytest.approx(hf, rel=1e-12), s
            assert mopt.learning_rate.item() == pytest.approx(hf, rel=1e-6), s  # a float32
        else:
            assert hf == pytest.approx(cfg.lr * s / cfg.warmup_steps)
        ref.step()
        sched.step()


def _row(name: str, lrs: list[float]) -> dict:
    cfg = {k: getattr(CFG, k) for k in ("lr", "steps", "warmup_steps", "lr_schedule")}
    return {"backend": name, "status": "ok", "config": cfg, "optimizer": {"lr_per_step": lrs}}


def test_fairness_lr_check_holds_each_backend_to_the_schedule() -> None:
    honest = [CFG.lr_at(s) for s in range(CFG.steps)]
    check = {c["check"]: c for c in fairness_checks([_row("torch", honest), _row("mlx", honest)])}
    assert check["lr_schedule"]["ok"], check["lr_schedule"]
    f32 = [float(__import__("numpy").float32(v)) for v in honest]  # MLX holds its LR in float32
    assert {c["check"]: c for c in fairness_checks([_row("torch", honest), _row("mlx", f32)])}["lr_schedule"]["ok"]
    # the same wrong schedule in both (last step at LR 0): equal to each other, yet a mismatch
    wrong = honest[:-1] + [0.0]
    got = {c["check"]: c for c in fairness_checks([_row("torch", wrong), _row("mlx", copy.copy(wrong))])}
    assert not got["lr_schedule"]["ok"] and "torch step 19: 0" in got["lr_schedule"]["detail"]
    shifted = honest[1:] + [honest[-1]]  # one step late
    got = {c["check"]: c for c in fairness_checks([_row("torch", honest), _row("mlx", shifted)])}
    assert got["lr_schedule"]["status"] == "mismatch" and "mlx step 0" in got["lr_schedule"]["detail"]
    got = {c["check"]: c for c in fairness_checks([_row("torch", honest), _row("mlx", [])])}
    assert got["lr_schedule"]["status"] == "missing"
