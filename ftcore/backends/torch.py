"""`torch` backend: transformers LlamaForCausalLM + PEFT LoRA (ftcore.torch), trained by a plain loop.

Under torchrun (ftcore.process.ranks) each rank trains on its shard of every global batch, its loss divided
by the global target count, and one all-reduce sums gradients and loss before clipping and AdamW,
so every rank steps identically; only rank 0 evaluates and saves.
"""

from __future__ import annotations

import torch

from ftcore.backends.result_fields import optimizer_record
from ftcore.backends.run_context import Run
from ftcore.backends.step_clock import StepClock
from ftcore.backends.torch_common import eval_schedule, start, wrap_up
from ftcore.inputs.loss_contract import target_count
from ftcore.process.ranks import shard
from ftcore.result import RunResult
from ftcore.torch import dist
from ftcore.torch.loss import loss_sum_count, to_torch
from ftcore.torch.optim import make_optimizer, settings


def train(run: Run) -> RunResult:
    cfg, batches, ranks = run.cfg, run.batches, run.ranks
    if ranks:
        dist.pick_rank_gpu(cfg, ranks.local_rank)
    model, device = start(run)
    result = run.result
    if ranks:
        dist.init(device, cfg.nproc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    result.optimizer = optimizer_record(settings(opt, model), cfg.max_grad_norm)
    evals = eval_schedule(run, model, device)
    if run.lead:
        evals.before()  # rank 0 only, as every eval
    model.train()
    clock = StepClock(run)
    for step in range(cfg.steps):
        fed = batches.step(step)
        mine = shard(fed, ranks.rank, ranks.world) if ranks else fed
        batch, targets = to_torch(mine, device), target_count(mine["labels"])  # this rank's rows
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        clock.feed(fed["input_ids"])  # the global batch, which the ranks split
        clock.lr(opt.param_groups[0]["lr"])
        clock.begin(step)
        loss_sum, count = loss_sum_count(model, batch, batches.packed)
        if ranks:  # the global count: summed over ranks this is the one-process loss
            loss = loss_sum / max(target_count(fed["labels"]), 1)
        else:
            loss = loss_sum / count.clamp(min=1)
        loss.backward()
        if ranks:
            loss_value, seconds = dist.all_reduce_step(params, loss, device)
            result.allreduce_times_s.append(seconds)
        if cfg.max_grad_norm is not None:  # the norm before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not ranks:
            loss_value = loss.item()  # sync point: the step's work is done after this
        clock.end(step, loss_value, grad_norm=grad_norm.item(), targets=targets)
        result.losses.append(loss_value)
        if not run.lead:
            continue  # eval: rank 0 only (the others wait in the next all-reduce)
        if evals.after_step(step, clock.times):
            break  # --target-eval-loss reached (one process only: refused with --nproc > 1)
    clock.stop()
    if ranks:
        dist.close()
        if ranks.rank:
            return result  # identical weights: rank 0 evaluates and saves
    return wrap_up(run, model, device, clock.times, evals)
