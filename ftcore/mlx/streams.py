"""The MLX training step's row streams: a batch's rows split over one CPU stream per thread.

On Linux CPU, MLX's own ops run on one thread per stream; only GEMMs go through BLAS. So with T
threads the step splits each batch's rows over T CPU streams with a 1-thread BLAS each, rather than
one stream with a T-thread BLAS: T threads in all either way, as torch gets. mx.eval must be wide
enough for the streams to overlap: unlimited (ftcore.mlx.env.row_streams_env), which a run with
--grad-checkpoint gives up for memory (one stream then).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.mlx.env import BFS_NO_LIMIT, BFS_WIDTH_ENV
from ftcore.mlx.loss import loss_sum_count
from ftcore.mlx.model import Model


def loss_and_grads(
    model: Model, batch: dict[str, mx.array], packed: bool, streams: tuple[mx.Stream, ...],
    count: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """Mean loss over the batch's targets and its gradients w.r.t. the trainable parameters
    (packed: several records per row, Batches.packed).

    The rows are split into len(streams) equal groups; each group's forward and backward runs on
    its own stream (a thread of its own on the CPU). Summed losses and gradients are divided by the
    whole batch's target count (or `count`: a data-parallel rank passes the global batch's),
    one pass's numbers, up to float summation order.
    """
    n_rows = batch["input_ids"].shape[0]
    if n_rows % len(streams):
        raise ValueError(f"{n_rows} rows do not split evenly over {len(streams)} streams")
    rows = n_rows // len(streams)
    if count is None:
        count = mx.maximum((batch["labels"][:, 1:] != IGNORE_INDEX).sum(), 1)
    sum_and_grad = nn.value_and_grad(model, lambda m, b: loss_sum_count(m, b, packed)[0])
    totals, grads = [], []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            part = {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}
            total, g = sum_and_grad(model, part)
        totals.append(total)
        grads.append(g)
    return sum(totals) / count, tree_map(lambda *g: sum(g) / count, *grads)


def plan_streams(device: mx.Device, threads: int, batch_size: int) -> int:
    """How many CPU streams the step splits a batch's rows over: `threads` on the CPU when the rows
    divide evenly and mx.eval's breadth-first width is unlimited (BFS_WIDTH_ENV, set by
    ftcore.mlx.env.row_streams_env), which lets the streams overlap, else 1.

    Uneven groups would leave a thread idle while the bigger group finishes.
    """
    if device != mx.cpu or threads < 2 or batch_size % threads:
        return 1
    try:
        width = int(os.environ.get(BFS_WIDTH_ENV, "20"))
    except ValueError:
        return 1
    return threads if width >= BFS_NO_LIMIT else 1


@functools.cache
def cpu_streams(n: int) -> tuple[mx.Stream, ...]:
    """n CPU streams, made once per process (each new CPU stream starts a thread)."""
    if n == 1:
        return (mx.default_stream(mx.cpu),)
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))
