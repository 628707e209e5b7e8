"""The loss contract (ftcore.inputs.loss_contract) in MLX: summed CE over target tokens and its
count, and eval."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ftcore.inputs.batches import Batches
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.mlx.model import Model
from ftcore.mlx.ops import logsumexp


def to_mx(batch: dict[str, np.ndarray]) -> dict[str, mx.array]:
    """int64 numpy (B, L) -> int32 mx arrays (token ids and -100 fit easily)."""
    return {k: mx.array(v.astype(np.int32)) for k, v in batch.items()}


def loss_sum_count(
    model: Model, batch: dict[str, mx.array], packed: bool
) -> tuple[mx.array, mx.array]:
    """Summed next-token cross-entropy over targets that are not IGNORE_INDEX, and their count.
    packed: the rows hold several records (Batches.packed), each attending to itself only.

    Same shift and normalisation as the torch backend: logits (fp32) at positions 0..L-2 against
    labels[:, 1:]; the last position predicts nothing, so its logits are not computed.
    """
    # packed rows: per-document mask and positions from their position_ids (ftcore.mlx.model)
    positions = batch["position_ids"] if packed else None
    h = model.model(batch["input_ids"], batch["attention_mask"], position_ids=positions)
    h = h[:, :-1]  # (B, L-1, hidden)
    logits = model.head(h).astype(mx.float32)  # (B, L-1, V); astype is a no-op in fp32
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    safe = mx.where(keep, targets, 0)  # a valid index for the gather; masked out below
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    ce = logsumexp(logits) - picked  # (B, L-1)
    return mx.where(keep, ce, 0.0).sum(), keep.sum()


def evaluate(model: Model, batches: Batches) -> float | None:
    """Mean loss over all held-out target tokens (not a mean of per-batch means)."""
    if not batches.eval:
        return None
    model.eval()
    total, count = 0.0, 0
    for b in batches.eval:
        s, n = loss_sum_count(model, to_mx(b), batches.packed)
        total, count = total + s.item(), count + n.item()
    model.train()
    return total / max(count, 1)
