"""`torch` backend: transformers LlamaForCausalLM + PEFT LoRA (ftcore.torch), trained by the shared
loop (backends.loop) with this step: loss, backward, clipping, AdamW. With --grad-accum N the step
runs forward + backward on each of its N micro-batches in turn, each one's summed loss divided by
the whole step's target count (ftcore.inputs.loss_contract), the gradients summing in .grad.

Under torchrun (ftcore.process.ranks) each rank trains on its shard of every global batch, its loss
divided by the global target count, and one all-reduce sums gradients and loss before clipping and
AdamW, so every rank steps identically; only rank 0 evaluates and saves.
"""

from __future__ import annotations

import torch

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.loop import StepRecipe, train_with
from ftcore.backends.result_fields import optimizer_record
from ftcore.backends.run_context import BackendRun
from ftcore.backends.torch_common import eval_schedule, save_torch, start
from ftcore.inputs.loss_contract import micro_batches
from ftcore.result import RunResult
from ftcore.torch import dist
from ftcore.torch.loss import loss_sum_count, to_torch
from ftcore.torch.optim import make_optimizer, settings


class TorchRecipe(StepRecipe):
    # (model, batch, packed) -> (summed loss, target count): the forward and the loss; the
    # torch-compile recipe replaces it with its torch.compile'd twin (backends.torch_compile)
    loss_fn = staticmethod(loss_sum_count)

    def setup(self) -> EvalSchedule:
        run, cfg, ranks = self.run, self.run.cfg, self.run.ranks
        if ranks:
            dist.pick_rank_gpu(cfg, ranks.local_rank)
        self.model, self.device = start(run)
        if ranks:
            dist.init(self.device, cfg.nproc)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(cfg, self.params)
        run.result.optimizer = optimizer_record(settings(self.opt, self.model), cfg.max_grad_norm)
        run.result.compiled_step = False  # eager: every op dispatched from Python, step by step
        return eval_schedule(run, self.model, self.device)

    def ready(self) -> None:
        self.model.train()

    def batch(self, rows: dict) -> dict[str, torch.Tensor]:
        return to_torch(rows, self.device)

    def set_lr(self, lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        return self.opt.param_groups[0]["lr"]

    def step(self, batch: dict[str, torch.Tensor], count: int) -> tuple[float, float]:
        run, params = self.run, self.params
        micros = micro_batches(batch, run.cfg.grad_accum)
        loss = 0
        for micro in micros:  # (batch_size, L) each; one micro-batch's activations at a time
            loss_sum, _ = self.loss_fn(self.model, micro, run.batches.packed)
            (loss_sum / count).backward()  # adds into .grad
            loss = loss + loss_sum.detach() / count
        run.result.grad_accum = len(micros)
        if run.ranks:
            loss_value, seconds = dist.all_reduce_step(params, loss, self.device)
            run.result.allreduce_times_s.append(seconds)
        if run.cfg.max_grad_norm is not None:  # the norm before clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(params, run.cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if not run.ranks:
            loss_value = loss.item()  # sync point: the step's work is done after this
        return loss_value, grad_norm.item()

    def end_steps(self) -> None:
        if self.run.ranks:
            dist.close()

    def finish(self) -> None:
        save_torch(self.run, self.model, self.device)


def train(run: BackendRun) -> RunResult:
    return train_with(run, TorchRecipe(run))
