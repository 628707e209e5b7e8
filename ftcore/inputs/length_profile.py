"""The built-in Alpaca-length data (`--data builtin:alpaca-lengths`): records of real Alpaca lengths
made of the built-in tasks, to measure batching on work shaped like the users'.

Stanford Alpaca's records (prompt + response + EOS) tokenised with the Llama-2 tokenizer are
36 / 150 / 425 / 594 tokens at the 10th / 50th / 90th / 99th percentile (mean 193). The built-in
tasks are short (a question, a word-long answer), so a record here is several of them: "Answer
each task in order, one answer per line.", the tasks' questions as the input, their answers a
line each as the response. Each record draws a target length from those percentiles (linear in
between; 20 and 700 tokens at the ends) and takes as many tasks as the model's own tokenizer
needs to reach it (from the mean tokens a task adds, measured on 64 tasks), so the lengths
follow the profile with whatever tokenizer the run uses. The answers stay exact. The shortest
records are one task in the Alpaca template, ~42 tokens with the built-in presets' tokenizer, so
the 10th percentile lands near 42, not 36.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from ftcore.inputs.synthetic import FINETUNE_FAMILIES, Record, synthetic_records

NAME = "builtin:alpaca-lengths"
# (quantile, tokens): Stanford Alpaca with the Llama-2 tokenizer, prompt + response + EOS
PERCENTILES = ((0.0, 20), (0.10, 36), (0.50, 150), (0.90, 425), (0.99, 594), (1.0, 700))
INSTRUCTION = "Answer each task in order, one answer per line."


def _record(tasks: list[Record]) -> Record:
    if len(tasks) == 1:  # the shortest records: one task as it is
        return tasks[0]
    return {"instruction": INSTRUCTION,
            "input": "\n".join(f"{t['instruction']} {t['input']}".strip() for t in tasks),
            "output": "\n".join(t["output"] for t in tasks)}  # fmt: skip


def alpaca_length_records(tokens: Callable[[Record], int], n: int, seed: int = 0) -> list[Record]:
    """`n` records whose token lengths (`tokens(record)`: the run's template, tokenizer and EOS)
    follow PERCENTILES; the same for the same tokenizer and seed."""
    sample = synthetic_records(64, seed=seed + 1, families=FINETUNE_FAMILIES)
    base = tokens(_record(sample[:2]))  # two tasks under the wrapper
    per_task = (tokens(_record(sample)) - base) / (len(sample) - 2)
    quantiles, lengths = zip(*PERCENTILES, strict=True)
    targets = np.interp(np.random.default_rng(seed).random(n), quantiles, lengths)
    rng = random.Random(seed)
    out = []
    for target in targets:
        k = max(1, round(2 + (target - base) / per_task))
        out.append(_record([rng.choice(FINETUNE_FAMILIES)(rng) for _ in range(k)]))
    return out
