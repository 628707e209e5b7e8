"""RunConfig: the one object that drives every backend.

Every run flag is made from one field here (`option`: help, choices, group;
ftcore.config_flags.add_run_options builds the flags), so a new option is one field. A bad value is
refused on creation with a message naming the field, before any model is loaded or any data is
read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ftcore.lora_targets import LORA_TARGETS, parse_targets


class UserError(Exception):
    """A mistake in what the user asked for. The CLI prints `error: <message>` and exits 2."""


PRESETS = ("tiny-pretrained", "tiny", "tinyllama-1.1b")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "gpu")
LR_SCHEDULES = ("constant", "linear", "cosine")


class Batching(StrEnum):
    """How training and eval rows become batches (ftcore.inputs.batching): `padded` pads every row
    to --max-seq-len; `longest` is mlx-lm's trainer: rows sorted by length, consecutive batches in
    a seeded order, each padded to 1 + 32 * ceil(longest / 32) (at most --max-seq-len); `packed`
    puts several records in a row. A StrEnum: equal to, and written (flags, JSON) as, its value."""

    PADDED = "padded"
    LONGEST = "longest"
    PACKED = "packed"


BATCHINGS = tuple(b.value for b in Batching)  # the --batching choices
# How a record becomes text (ftcore.inputs.records): the Alpaca template, or the tokenizer's own
# chat template
PROMPT_FORMATS = ("alpaca", "chat")


def option(default: Any, help: str = "", *, choices: tuple[str, ...] | None = None,
           group: str | None = None) -> Any:
    """A RunConfig field with its command-line flag (ftcore.config_flags.add_run_options):
    `--<name>` with this help, choices and flag group (`group` starts a new one; later fields stay
    in it). The flag's type comes from the annotation; "(default X)" is added unless the help says
    it."""
    meta = {"help": help, "choices": choices, "group": group}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


def _need(ok: bool, name: str, why: str) -> None:
    """RunConfig's checks: refuse the flag `name` (its field's name) in one line when not `ok`."""
    if not ok:
        raise UserError(f"--{name.replace('_', '-')}: {why}")


@dataclass(frozen=True)
class RunConfig:
    """Every run option, one field each; a new option is one field here (its flag follows)."""

    # model: a local HF folder wins over a preset
    model: str | None = option(None, "local Hugging Face Llama folder (overrides --preset)",
                               group="model")
    # ftcore.inputs.presets
    preset: str = option(
        "tiny-pretrained", "built-in checkpoint made locally: tiny-pretrained (pretrained once on "
        "the built-in tasks), tiny (random init), tinyllama-1.1b (TinyLlama's architecture, random "
        "init)", choices=PRESETS)
    num_layers: int | None = option(None, "keep only the first N layers of the preset")
    allow_pickle: bool = option(False, "accept pickle weights from --model")  # *.bin / *.pt
    # data: None means the built-in synthetic Alpaca-format set
    data: str | None = option(
        None, "Alpaca .json/.jsonl or datasets.save_to_disk folder, or builtin:alpaca-lengths "
        "(built-in tasks in records of Stanford Alpaca's token lengths) (default: built-in "
        "synthetic)", group="data")
    num_samples: int = option(256, "training records drawn by seed")
    eval_samples: int = option(32, "held-out records for eval loss (0 disables eval)")
    max_seq_len: int = option(128, "tokens per row at most: longer records are truncated")
    batching: Batching = option(
        Batching.LONGEST, "padded: every row padded to --max-seq-len; longest: as mlx-lm's "
        "trainer, records sorted by length, consecutive batches in a seeded order, each padded to "
        "1 + 32*ceil(longest/32); packed: several records per row (first-fit-decreasing), each "
        "attending only to itself, positions restarting at 0", choices=BATCHINGS)
    mask_prompt: bool = option(True, "loss on the response only")
    prompt_format: str = option(
        "alpaca", "alpaca: the Stanford Alpaca template; chat: the model's own chat template "
        "(user = instruction + input, assistant = output; loss on the assistant turn), as mlx-lm "
        "formats chat data", choices=PROMPT_FORMATS)
    # run
    batch_size: int = option(4, group="training")
    steps: int = option(60, "optimiser steps")
    # ftcore.inputs.batching.epoch_steps
    epochs: int | None = option(
        None,
        "whole passes over the training records instead of --steps (overrides it): steps = "
        "epochs x steps per epoch",
    )
    project_records: int | None = option(None, "records a projected epoch holds (default: the "
                                         "data's; 52,002 for builtin:alpaca-lengths)")
    timing_warmup_steps: int = option(1, "first steps left out of throughput")  # compilation
    eval_every: int = option(10, "evaluate before training, every N steps and at the end; "
                             "0: before and end only")
    # None: only on the built-in data, whose answers are exact (free-form answers of real data
    # rarely match, and cost long decodes)
    eval_generate: bool | None = option(
        None,
        "greedy answers to the eval records, before and after training: exact-match accuracy "
        "(default: on for the built-in data, whose answers are exact; off for --data)",
    )
    target_eval_loss: float | None = option(  # needs eval_every > 0
        None, "stop once a periodic eval reaches this loss; report steps and seconds to it")
    seed: int = option(0, "data subset, batch order and initial LoRA weights")
    precision: str = option("fp32", choices=PRECISIONS)
    device: str = option("cpu", choices=DEVICES)
    threads: int | None = option(None, "threads per framework (default: all cores)")
    # less memory, ~1/3 more FLOPs
    grad_checkpoint: bool = option(
        False, "gradient checkpointing: recompute each layer's activations in the backward pass "
        "instead of keeping them (torch: transformers' gradient_checkpointing_enable; mlx, "
        "mlx-lm: mx.checkpoint per layer)")
    # optimiser: AdamW with bias correction in every backend
    lr: float = option(3e-3, "peak learning rate", group="optimiser (AdamW with bias correction)")
    lr_schedule: str = option("cosine", "after warm-up", choices=LR_SCHEDULES)
    warmup_steps: int = option(2, "linear LR warm-up steps")  # from 0
    weight_decay: float = option(0.0)
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.999)
    adam_eps: float = option(1e-8)
    max_grad_norm: float | None = option(None, "clip gradients to this norm (default: no clipping)")
    # LoRA: y = W x + (alpha / rank) * B(A(dropout(x)))
    lora_rank: int = option(8, group="LoRA")
    lora_alpha: float = option(16.0, "scale = alpha / rank")
    lora_dropout: float = option(0.0)
    lora_targets: tuple[str, ...] = option(  # all 7 linears of each layer
        LORA_TARGETS, f"comma list from {','.join(LORA_TARGETS)}")
    # data parallel (ftcore.process.ranks): processes per machine, machines, and how the launcher
    # finds them
    nproc: int = option(
        1,
        "processes per machine, each a shard of every global batch; threads are split over them; "
        "compare also runs each backend at 1 process",
        group="data parallel (torchrun / mlx.launch; torch and mlx backends)",
    )
    nnodes: int = option(1, "machines; torch needs --rdzv-endpoint, mlx --hostfile")
    rdzv_endpoint: str | None = option(None, "torchrun rendezvous HOST:PORT for --nnodes > 1")
    hostfile: str | None = option(None, "mlx.launch JSON hostfile, one entry per machine, for "
                                  "--nnodes > 1")

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets))
        else:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.batching in BATCHINGS:  # a flag's or JSON's string; anything else is refused below
            object.__setattr__(self, "batching", Batching(self.batching))
        self._validate()

    def _validate(self) -> None:
        """Every field's range (UserError naming the flag): the model and data, the schedule, the
        optimizer, LoRA and the processes."""
        self._validate_data_and_steps()
        self._validate_optimizer()
        self._validate_lora_and_processes()

    def _validate_data_and_steps(self) -> None:
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
        _need(self.batch_size <= self.num_samples, "batch_size",
              f"batch size {self.batch_size} is larger than the training subset "
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

    def _validate_optimizer(self) -> None:
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

    def _validate_lora_and_processes(self) -> None:
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
        _need(len(self.lora_targets) > 0, "lora_targets", "name at least one module")
        for t in self.lora_targets:
            _need(t in LORA_TARGETS, "lora_targets",
                  f"unknown target module {t!r} (choose from {','.join(LORA_TARGETS)})")
        twice = sorted({t for t in self.lora_targets if self.lora_targets.count(t) > 1})
        _need(not twice, "lora_targets",
              f"{', '.join(twice)} named twice (each module takes one adapter)")

    @property
    def generates(self) -> bool:
        """Whether eval measures exact-match accuracy of greedy answers (see eval_generate)."""
        return self.data is None if self.eval_generate is None else self.eval_generate

    @property
    def world_size(self) -> int:
        """Ranks in all: processes per machine x machines."""
        return self.nproc * self.nnodes

    @property
    def lora_scale(self) -> float:
        """The literal multiplier on B(A(x)): alpha / rank (mlx-lm calls this `scale`)."""
        return self.lora_alpha / self.lora_rank

    def lr_at(self, step: int) -> float:
        """Learning rate used for optimiser step `step` (0-based); the same formula in every
        backend.

        Linear warm-up over `warmup_steps` (like transformers' schedules), then constant, linear
        decay to 0 or cosine decay to 0 over the remaining steps.
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / (self.warmup_steps + 1)
        if self.lr_schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.lr_schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
