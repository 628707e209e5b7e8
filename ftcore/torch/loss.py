"""The loss contract (ftcore.inputs.loss_contract) in torch: summed CE over target tokens and its
count, and eval."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ftcore.inputs.batches import Batches
from ftcore.inputs.loss_contract import IGNORE_INDEX
from ftcore.torch.ops import packed_mask


def loss_sum_count(
    model, batch: dict[str, torch.Tensor], packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over targets that are not IGNORE_INDEX, and their count.
    packed: the rows hold several records (Batches.packed), each attending to itself only.

    Position t predicts token t+1: logits at positions 0..L-2 against labels[:, 1:]. The last
    position predicts nothing, so its logits are not computed (`logits_to_keep`, as the MLX backend
    does). Every backend uses this same shift and normalisation (sum / count).
    """
    ids = batch["input_ids"]
    keep = torch.arange(ids.shape[1] - 1, device=ids.device)  # logits at positions 0..L-2
    # (B, L-1, V)
    logits = model(**model_inputs(batch, model.dtype, packed), logits_to_keep=keep).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()


def model_inputs(
    batch: dict[str, torch.Tensor], dtype: torch.dtype, packed: bool
) -> dict[str, torch.Tensor]:
    """The model's keyword inputs: ids and the 2-D padding mask, or for packed rows (which carry
    position_ids) the per-document 4-D mask and the positions restarting at each record."""
    if not packed:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": packed_mask(batch["position_ids"], batch["attention_mask"], dtype),
        "position_ids": batch["position_ids"],
    }


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches: Batches, device: torch.device) -> float | None:
    """Mean loss over all held-out target tokens (not a mean of per-batch means)."""
    if not batches.eval:
        return None
    model.eval()
    total, count = 0.0, 0
    for b in batches.eval:
        s, n = loss_sum_count(model, to_torch(b, device), batches.packed)
        total, count = total + s.item(), count + int(n.item())
    model.train()
    return total / max(count, 1)
