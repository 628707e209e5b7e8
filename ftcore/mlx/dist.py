"""mx.distributed for data-parallel ranks (launched by mlx.launch; ftcore.process.ranks): the ring
backend on the CPU, NCCL with the CUDA build, and one all_sum of the LoRA gradients and the loss per
step."""

from __future__ import annotations

import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten


def init(device: mx.Device, world: int):
    group = mx.distributed.init(strict=True, backend="nccl" if device == mx.gpu else "ring")
    if group.size() != world:
        raise RuntimeError(
            f"mx.distributed sees {group.size()} ranks, the launcher was asked for {world}"
        )
    return group


def all_sum_step(grads: dict, loss: mx.array, group) -> tuple[dict, mx.array, float]:
    """Sum every rank's gradients and loss (evaluated before: the timing is the all_sum alone)
    with one all_sum; each rank's loss is its shard's CE sum over the GLOBAL target count.
    Returns (summed grads, global loss, seconds)."""
    leaves = tree_flatten(grads)
    mx.eval(loss, [g for _, g in leaves])
    flat = mx.concatenate([g.reshape(-1).astype(mx.float32) for _, g in leaves]
                          + [loss.reshape(1).astype(mx.float32)])  # fmt: skip
    mx.eval(flat)
    t0 = time.perf_counter()
    total = mx.distributed.all_sum(flat, group=group)
    mx.eval(total)
    seconds = time.perf_counter() - t0
    out, offset = [], 0
    for name, g in leaves:
        out.append((name, total[offset : offset + g.size].reshape(g.shape).astype(g.dtype)))
        offset += g.size
    return tree_unflatten(out), total[-1], seconds
