"""The closed sets of choices RunConfig's flags take, and UserError (ftcore.config re-exports
them)."""

from __future__ import annotations

from enum import StrEnum


class UserError(Exception):
    """A mistake in what the user asked for. The CLI prints `error: <message>` and exits 2."""


PRESETS = ("tiny-pretrained", "tiny", "tinyllama-1.1b")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("cpu", "gpu")
LR_SCHEDULES = ("constant", "linear", "cosine")
# What a fine-tune trains (--fine-tune): LoRA adapters; DoRA (LoRA plus a learned magnitude per
# output row, PEFT's use_dora); or every weight of every decoder layer (mlx-lm's "full": the
# embeddings, the final norm and lm_head stay frozen)
FINE_TUNES = ("lora", "dora", "full")


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
