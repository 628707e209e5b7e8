"""RunConfig's checks: every field's range, refused on creation in one line naming the flag
(UserError), before any model is loaded or any data is read. `self` is the ftcore.config.RunConfig
checked (not imported: it imports this module)."""

from __future__ import annotations

import math
from typing import Any

from ftcore.config_choices import (
    BATCHINGS,
    DEVICES,
    FINE_TUNES,
    LR_SCHEDULES,
    PRECISIONS,
    PRESETS,
    PROMPT_FORMATS,
    UserError,
)
from ftcore.lora_targets import LORA_TARGETS


def _need(ok: bool, name: str, why: str) -> None:
    """RunConfig's checks: refuse the flag `name` (its field's name) in one line when not `ok`."""
    if not ok:
        raise UserError(f"--{name.replace('_', '-')}: {why}")


def check_config(self: Any) -> None:
    """Every field's range (UserError naming the flag): the model and data, the schedule, the
    optimizer, LoRA and the processes."""
    _data_and_steps(self)
    _optimizer(self)
    _lora_and_processes(self)


def _data_and_steps(self: Any) -> None:
    _need(self.preset in PRESETS, "preset",
          f"unknown preset {self.preset!r} (one of {', '.join(PRESETS)})")
    _need(self.num_layers is None or self.num_layers >= 1, "num_layers", "must be >= 1")
    _need(self.num_layers is None or not self.model, "num_layers",
          "truncates a --preset only; with --model DIR, train a checkpoint of the depth you "
          "want")
    _need(self.num_samples >= 1, "num_samples", "must be >= 1")
    _need(self.eval_samples >= 0, "eval_samples", "must be >= 0")
    _need(self.max_seq_len >= 8, "max_seq_len", "must be >= 8")
    _need(self.prompt_format in PROMPT_FORMATS, "prompt_format",
          f"unknown prompt format {self.prompt_format!r} (one of {', '.join(PROMPT_FORMATS)})")
    _need(self.batching in BATCHINGS, "batching",
          f"unknown batching {self.batching!r} (one of {', '.join(BATCHINGS)})")
    _need(self.batch_size >= 1, "batch_size", "must be >= 1")
    _need(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
    _need(self.step_rows <= self.num_samples, "batch_size",
          f"a step of {self.step_rows_text} is larger than the training subset "
          f"({self.num_samples} samples)")
    _need(self.steps >= 1, "steps", "must be >= 1")
    _need(self.epochs is None or self.epochs >= 1, "epochs", "must be >= 1")
    _need(self.project_records is None or self.project_records >= 1, "project_records",
          "must be >= 1")
    _need(0 <= self.timing_warmup_steps < self.steps, "timing_warmup_steps",
          "must be >= 0 and < --steps")
    _need(self.eval_every >= 0, "eval_every", "must be >= 0")
    if self.target_eval_loss is not None:
        _need(math.isfinite(self.target_eval_loss) and self.target_eval_loss > 0,
              "target_eval_loss", "must be a positive number")
        _need(self.eval_samples > 0, "target_eval_loss",
              "needs eval records (--eval-samples > 0)")
        _need(self.eval_every > 0, "target_eval_loss", "needs periodic eval (--eval-every > 0)")
        _need(self.nproc * self.nnodes == 1, "target_eval_loss",
              "one process only (rank 0 evaluates; the ranks cannot stop together)")

def _optimizer(self: Any) -> None:
    _need(0 <= self.seed < 2**32, "seed",
          f"must be in [0, 2**32) (numpy's seed range), got {self.seed}")
    _need(self.precision in PRECISIONS, "precision",
          f"unknown precision {self.precision!r} (one of {', '.join(PRECISIONS)})")
    _need(self.device in DEVICES, "device",
          f"unknown device {self.device!r} (one of {', '.join(DEVICES)})")
    _need(self.threads is None or self.threads >= 1, "threads", "must be >= 1")
    _need(math.isfinite(self.lr) and self.lr > 0, "lr",
          f"learning rate must be a positive number, got {self.lr}")
    _need(self.lr_schedule in LR_SCHEDULES, "lr_schedule",
          f"unknown schedule {self.lr_schedule!r} (one of {', '.join(LR_SCHEDULES)})")
    _need(0 <= self.warmup_steps <= self.steps, "warmup_steps", "must be between 0 and --steps")
    _need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
          "must be >= 0")
    _need(0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
    _need(0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
    # an infinite eps makes every Adam update 0: nothing would train, yet every step "ran"
    _need(math.isfinite(self.adam_eps) and self.adam_eps > 0, "adam_eps",
          f"must be a finite number > 0, got {self.adam_eps}")
    _need(self.max_grad_norm is None
          or (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0),
          "max_grad_norm", f"must be a finite number > 0, got {self.max_grad_norm}")

def _lora_and_processes(self: Any) -> None:
    _need(self.lora_rank >= 1, "lora_rank", f"rank must be >= 1, got {self.lora_rank}")
    _need(math.isfinite(self.lora_alpha) and self.lora_alpha > 0, "lora_alpha", "must be > 0")
    _need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    _need(self.nproc >= 1, "nproc", "must be >= 1")
    _need(self.nnodes >= 1, "nnodes", "must be >= 1")
    _need(
        self.batch_size % self.world_size == 0,
        "batch_size",
        f"batch size {self.batch_size} does not split evenly over {self.world_size} processes "
        "(each rank takes an equal shard of every global batch)",
    )
    _need(self.nnodes == 1 or bool(self.rdzv_endpoint or self.hostfile), "nnodes",
         "more than one machine needs --rdzv-endpoint (torch) or --hostfile (mlx)")
    _need(self.grad_accum == 1 or self.world_size == 1, "grad_accum",
          "one process only (data parallel splits each step over ranks instead)")
    _need(self.fine_tune in FINE_TUNES, "fine_tune",
          f"unknown fine-tune {self.fine_tune!r} (one of {', '.join(FINE_TUNES)})")
    _need(self.fine_tune == "lora" or self.precision == "fp32", "fine_tune",
          f"{self.fine_tune} trains in fp32 only (bf16 runs LoRA: a bf16 base, fp32 adapters)")
    _need(self.fine_tune == "lora" or self.world_size == 1, "fine_tune",
          f"{self.fine_tune}: one process only (data parallel runs LoRA)")
    _need(len(self.lora_targets) > 0, "lora_targets", "name at least one module")
    for t in self.lora_targets:
        _need(t in LORA_TARGETS, "lora_targets",
              f"unknown target module {t!r} (choose from {','.join(LORA_TARGETS)})")
    twice = sorted({t for t in self.lora_targets if self.lora_targets.count(t) > 1})
    _need(not twice, "lora_targets",
          f"{', '.join(twice)} named twice (each module takes one adapter)")
