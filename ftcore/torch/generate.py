"""Greedy decoding through transformers' `generate` (KV cache included), base or base + PEFT
adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def greedy(model, prompt: Sequence[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Token ids after `prompt` (one row, no padding), argmax each step, until EOS (kept) or
    `max_new_tokens`: the same contract as ftcore.mlx.generate.greedy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )[0, ids.shape[1]:].tolist()
    model.train(was_training)
    if eos_id in out:  # generate pads after EOS only in batches; cut there all the same
        out = out[: out.index(eos_id) + 1]
    return out
