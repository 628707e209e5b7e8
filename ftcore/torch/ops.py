"""Tensor operations the torch side builds itself (the mirror of ftcore.mlx.ops): the per-document
causal mask of packed rows."""

from __future__ import annotations

import torch


def packed_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive (B, 1, L, L) per-document causal mask of packed rows: query i sees key j when
    j <= i, both lie in the same record (a record starts where its position is 0) and j is a real
    token; blocked entries get dtype's most negative finite value (0 elsewhere). transformers uses
    a 4-D mask as given (masking_utils), in eager and sdpa attention alike."""
    doc = (position_ids == 0).cumsum(-1)  # (B, L): which record of the row each token is in
    L = doc.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc.device).tril()
    keep = causal & (doc[:, :, None] == doc[:, None, :]) & (attention_mask[:, None, :] != 0)
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=doc.device)
    return torch.where(keep, torch.zeros((), dtype=dtype, device=doc.device), blocked)[:, None]
