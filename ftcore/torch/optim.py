"""AdamW for the torch backends, and its settings read back from the object."""

from __future__ import annotations

import torch

from ftcore.config import RunConfig
from ftcore.torch.lora import lora_key


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


def settings(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """The settings read back from the optimizer object, for fairness checks: not what was asked
    for, what it holds. Betas and eps from its first param group; the weight decay of every group,
    per tensor it holds (`weight_decay_per_tensor`, keyed as `lora_state`: groups with different
    decays show per tensor). torch's Adam and AdamW always correct bias."""
    group = opt.param_groups[0]
    names = {id(p): lora_key(n) for n, p in model.named_parameters()}
    return {
        "name": type(opt).__name__,
        "betas": [float(b) for b in group["betas"]],
        "eps": float(group["eps"]),
        "weight_decay_per_tensor": {names[id(p)]: float(g["weight_decay"])
                                    for g in opt.param_groups for p in g["params"]},
        "bias_correction": True,
        "amsgrad": bool(group.get("amsgrad", False)),
    }
