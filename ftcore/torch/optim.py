"""AdamW for the torch backends."""

from __future__ import annotations

import torch

from ftcore.config import RunConfig


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW as every torch-based backend uses it (bias correction is built in); the LR is set
    per step from cfg.lr_at by the loop or scheduler."""
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
