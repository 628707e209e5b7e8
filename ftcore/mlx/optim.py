"""AdamW for the MLX backend, set up as torch's, and its settings read back from the object."""

from __future__ import annotations

import mlx.optimizers as optim

from ftcore.config import RunConfig


def make_optimizer(cfg: RunConfig) -> optim.AdamW:
    """AdamW equal to torch's: MLX's defaults (weight_decay=0.01, bias_correction=False) are
    overridden explicitly. The LR is set per step from cfg.lr_at by the loop."""
    return optim.AdamW(
        learning_rate=cfg.lr_at(0),
        betas=[cfg.adam_beta1, cfg.adam_beta2],
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,  # decoupled p *= 1 - lr*wd before the update, as torch
        bias_correction=True,
    )


def settings(opt: optim.Optimizer, names: list[str]) -> dict:
    """The settings read back from an MLX Adam/AdamW object, for fairness checks. `names`: the
    trainable tensors it updates, as `lora_state` keys; MLX applies its one weight_decay (Adam:
    none) to each of them (`weight_decay_per_tensor`)."""
    decay = float(getattr(opt, "weight_decay", 0.0))
    return {
        "name": type(opt).__name__,
        "betas": [float(b) for b in opt.betas],
        "eps": float(opt.eps),
        "weight_decay_per_tensor": {n: decay for n in names},
        "bias_correction": bool(opt.bias_correction),
        "amsgrad": False,
    }
