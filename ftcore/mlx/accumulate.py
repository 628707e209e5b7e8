"""Gradient accumulation (--grad-accum N) in MLX: a step's rows as N micro-batches, each one's
summed loss divided by the whole step's target count (ftcore.inputs.loss_contract), their
gradients summed: the step's loss and gradient are those of one batch of all its rows."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx.utils import tree_map

from ftcore.inputs.loss_contract import micro_batches


def accumulated_grads(
    grads_fn: Callable[[dict, mx.array], tuple[mx.array, dict]], batch: dict[str, mx.array], n: int,
    count: int,
) -> tuple[dict, mx.array, int]:
    """(summed gradients, step loss, micro-batches run) of a step's (n * B, L) rows over n
    micro-batches of B rows; `count`: the step's targets (>= 1).
    grads_fn(micro, count) -> (micro CE sum / count, its gradients): the compiled per-micro-batch
    function, traced once per width (every micro-batch of a step has its shape; the count is an
    array input, not a constant). Evaluated after each micro-batch, so one micro-batch's
    activations live at a time."""
    count = mx.array(count, mx.float32)
    grads, loss, ran = None, mx.array(0.0), 0
    for micro in micro_batches(batch, n):
        part, g = grads_fn(micro, count)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        loss, ran = loss + part, ran + 1
        mx.eval(grads, loss)
    return grads, loss, ran
