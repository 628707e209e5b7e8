"""`torch` backend: transformers LlamaForCausalLM + PEFT LoRA (ftcore.torch), trained by a plain loop."""

from __future__ import annotations

from pathlib import Path

import torch

from ftcore.backends.common import StepClock, optimizer_record
from ftcore.backends.torch_common import quality, start, wrap_up
from ftcore.config import RunConfig
from ftcore.data import Batches
from ftcore.result import RunResult
from ftcore.torch.loss import loss_sum_count, to_torch
from ftcore.torch.optim import make_optimizer, settings


def train(cfg: RunConfig, model_dir: Path, batches: Batches, out_dir: Path) -> RunResult:
    model, device, result = start("torch", cfg, model_dir, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    result.optimizer = optimizer_record(settings(opt), cfg.max_grad_norm)
    measured = quality(model, device, cfg, batches, result)
    measured.before()
    model.train()
    clock = StepClock("torch", cfg, batches)
    for step in range(cfg.steps):
        fed = batches.step(step)
        batch = to_torch(fed, device)
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        clock.feed(fed["input_ids"])
        clock.lr(opt.param_groups[0]["lr"])
        clock.begin(step)
        loss_sum, count = loss_sum_count(model, batch)
        loss = loss_sum / count.clamp(min=1)
        loss.backward()
        if cfg.max_grad_norm is not None:  # the norm before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # sync point: the step's work is done after this
        clock.end(step, loss_value, grad_norm=grad_norm.item())
        result.losses.append(loss_value)
        if measured.after_step(step, clock.times):
            break  # --target-eval-loss reached
    clock.stop(result)
    return wrap_up(model, device, result, cfg, batches, out_dir, clock.times, measured)
