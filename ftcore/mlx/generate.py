"""Greedy decoding with a KV cache in ftcore's MLX Llama (the base, or the base with LoRA)."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from ftcore.mlx.model import KVCache, Model


def greedy(model: Model, prompt: Sequence[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Token ids after `prompt` (one row, no padding), argmax each step, until EOS (kept) or
    `max_new_tokens`. The prompt runs once (prefill); each new token then attends to the cache."""
    was_training = model.training
    model.eval()
    cache = [KVCache() for _ in model.model.layers]
    tokens = mx.array([list(prompt)], dtype=mx.int32)  # (1, P), then (1, 1) per new token
    out: list[int] = []
    for _ in range(max_new_tokens):
        h = model.model(tokens, cache=cache)[:, -1]  # (1, hidden): only the last position predicts
        next_id = int(mx.argmax(model.head(h).astype(mx.float32), axis=-1).item())
        out.append(next_id)
        if next_id == eos_id:
            break
        tokens = mx.array([[next_id]], dtype=mx.int32)
    model.train(was_training)
    return out
