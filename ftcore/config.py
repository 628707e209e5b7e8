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
from typing import Any

from ftcore.config_checks import check_config
from ftcore.config_choices import (  # noqa: F401 (re-exported: the choices are RunConfig's)
    BATCHINGS,
    DEVICES,
    FINE_TUNES,
    LR_SCHEDULES,
    PRECISIONS,
    PRESETS,
    PROMPT_FORMATS,
    Batching,
    UserError,
)
from ftcore.lora_targets import LORA_TARGETS, parse_targets


def option(default: Any, help: str = "", *, choices: tuple[str, ...] | None = None,
           group: str | None = None) -> Any:
    """A RunConfig field with its command-line flag (ftcore.config_flags.add_run_options):
    `--<name>` with this help, choices and flag group (`group` starts a new one; later fields stay
    in it). The flag's type comes from the annotation; "(default X)" is added unless the help says
    it."""
    meta = {"help": help, "choices": choices, "group": group}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


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
    batch_size: int = option(4, "rows per forward and backward pass (the micro-batch)",
                             group="training")
    grad_accum: int = option(
        1, "micro-batches of --batch-size rows per optimiser step: a step trains batch-size x "
        "grad-accum rows, its loss the mean over all their target tokens")
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
    fine_tune: str = option(
        "lora", "lora: adapters on --lora-targets; dora: LoRA plus a learned magnitude per output "
        "row (PEFT's use_dora); full: every weight of every decoder layer, the embeddings, final "
        "norm and lm_head frozen (mlx-lm's full)", choices=FINE_TUNES, group="LoRA")
    lora_rank: int = option(8)
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
        """Every field's range (UserError naming the flag): ftcore.config_checks."""
        check_config(self)

    @property
    def generates(self) -> bool:
        """Whether eval measures exact-match accuracy of greedy answers (see eval_generate)."""
        return self.data is None if self.eval_generate is None else self.eval_generate

    @property
    def world_size(self) -> int:
        """Ranks in all: processes per machine x machines."""
        return self.nproc * self.nnodes

    @property
    def step_rows(self) -> int:
        """Rows one optimiser step trains: --batch-size x --grad-accum (the batches are built at
        this size; a step splits its rows into grad_accum micro-batches of batch_size)."""
        return self.batch_size * self.grad_accum

    @property
    def step_rows_text(self) -> str:
        """A step's rows as the flags name them: "--batch-size 2 x --grad-accum 4 (8 rows)"."""
        accum = f" x --grad-accum {self.grad_accum} ({self.step_rows} rows)"
        return f"--batch-size {self.batch_size}" + (accum if self.grad_accum > 1 else "")

    @property
    def lora_scale(self) -> float:
        """The literal multiplier on B(A(x)): alpha / rank (mlx-lm calls this `scale`)."""
        return self.lora_alpha / self.lora_rank

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step `step` (0-based), the same in every backend: linear
        warm-up over `warmup_steps` (as transformers' schedules), then constant, or linear or
        cosine decay to 0 over the remaining steps."""
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
        if unknown := set(d) - {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
