"""AdamW for the MLX backend, set up as torch's."""

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
