"""The loss contract every backend implements, and its numpy reference.

Training and eval loss = mean next-token cross-entropy over the target tokens:

* position t predicts token t + 1: logits at positions 0..L-2 against labels[:, 1:];
  the last position predicts nothing, so a backend may skip computing its logits;
* a target equal to IGNORE_INDEX (-100) does not count: padding always, and the prompt when
  masking (`--mask-prompt`, the default);
* normalisation: the sum over counted targets divided by their count, over the whole batch
  (not a mean of per-row means); eval divides the sum over all held-out batches by their count;
* cross-entropy is taken on fp32 logits, whatever the weights' precision;
* gradient accumulation (--grad-accum N): a step's rows are N micro-batches (`micro_batches`),
  each one's summed cross-entropy divided by the whole step's target count, so the step's loss
  and gradient are those of one batch of all N micro-batches' rows: the mean over all their
  targets, not the mean of the micro-batches' means (which weights a micro-batch with few targets
  as much as one with many).

`ftcore.torch.loss.loss_sum_count` and `ftcore.mlx.loss.loss_sum_count` compute (sum, count) this
way; tests pin both to `reference_sum_count` below. (mlx-lm's default loss differs: it counts one
pad target per row; the `mlx-lm` backend reports that in its notes.)
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # label value excluded from the loss (torch's cross_entropy default)


def target_count(labels: np.ndarray) -> int:
    """Targets that enter the loss in (..., L) labels: labels[..., 1:] that are not IGNORE_INDEX."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def trained_rows(labels: np.ndarray) -> np.ndarray:
    """(..., L) labels -> (...) bool: the rows with at least one target (every kept record has one;
    a short batch's filler rows have none)."""
    return (labels[..., 1:] != IGNORE_INDEX).any(-1)


def micro_batches(rows: dict, n: int) -> list[dict]:
    """A step's rows (step_rows, L) as n consecutive micro-batches of step_rows / n rows each, at
    the step's width; numpy, torch or MLX arrays alike (anything sliced along its first axis)."""
    size = len(next(iter(rows.values()))) // n
    return [{k: v[i * size : (i + 1) * size] for k, v in rows.items()} for i in range(n)]


def reference_sum_count(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """The contract in float64 numpy: full logits (B, L, V), labels (B, L) -> (CE sum, count)."""
    lo, tg = logits[:, :-1].astype(np.float64), labels[:, 1:]
    keep = tg != IGNORE_INDEX
    top = lo.max(-1)
    lse = np.log(np.exp(lo - top[..., None]).sum(-1)) + top
    picked = np.take_along_axis(lo, np.where(keep, tg, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * keep).sum()), int(keep.sum())
