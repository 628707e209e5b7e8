"""Analytic memory of a LoRA fine-tune: what one training process must hold at its peak, by
component. The report puts it beside the measured peak RSS, so `peak RSS / model` shows how much a
backend holds beyond the necessary (runtime, allocator caches, copies).

Counted (MB = 2**20 bytes), for one process training `rows` rows of `seq_len` tokens:

* weights: every base parameter at the run's precision (4 bytes fp32, 2 bf16);
* LoRA parameters, their gradients and AdamW's two moments: fp32 in both precisions;
* saved activations: what the backward pass reads, per token and layer, at the compute precision:
  the layer input and its RMSNorm output, q and k after RoPE and v, the attention probabilities
  (heads x seq_len per token: eager attention, and MLX's written-out attention, keep them; a
  fused kernel would keep one value per head), the attention output (o_proj's input), the residual
  and its RMSNorm output, gate, up, silu(gate) and their product (down_proj's input), and each
  targeted linear's rank-r LoRA intermediate;
  with gradient checkpointing only each layer's input is kept, plus one layer's activations while
  the backward pass recomputes it;
* backward working set: the gradients of one layer's activations, alive while it is backpropagated;
* logits and their gradient: 2 x rows x seq_len x vocab in fp32 (the loss runs in fp32).

Not counted: the interpreter and the frameworks' own code and buffers, the tokenizer and data, the
allocator's cache, and any transient copies a backend makes; that is what `peak RSS / model`
beyond 1 measures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ftcore.config import RunConfig
from ftcore.inputs.arch import linear_shapes
from ftcore.measure.flops import lora_param_count

BYTES = {"fp32": 4, "bf16": 2}
MB = 2**20


def base_param_count(arch: dict[str, Any]) -> int:
    """Every base parameter: embedding, per layer the 7 linears and 2 RMSNorms, final norm, lm_head
    (unless tied to the embedding)."""
    h, vocab, layers = arch["hidden_size"], arch["vocab_size"], arch["num_hidden_layers"]
    per_layer = sum(i * o for i, o in linear_shapes(arch).values()) + 2 * h
    head = 0 if arch.get("tie_word_embeddings") else h * vocab
    return vocab * h + layers * per_layer + h + head


def saved_per_token_layer(
    arch: dict[str, Any], seq_len: int, targets: Iterable[str], rank: int
) -> int:
    """Activation values one layer keeps per token for its backward pass (see the module doc)."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or h // heads
    attention = 2 * h + (heads + 2 * kv) * hd + heads * seq_len + heads * hd
    mlp = 2 * h + 4 * inter
    return attention + mlp + rank * len(list(targets))


def memory_model(arch: dict[str, Any], cfg: RunConfig, rows: int, seq_len: int) -> dict[str, Any]:
    """{component: MB, ..., "total": MB, "checkpoint": bool} for one training process of `rows`
    rows of `seq_len` tokens (the run's widest step, Batches.widest) at the run's precision, LoRA
    targets and rank, and --grad-checkpoint."""
    precision, rank, checkpoint = cfg.precision, cfg.lora_rank, cfg.grad_checkpoint
    targets = list(cfg.lora_targets)
    b = BYTES[precision]
    tokens = rows * seq_len
    layers = arch["num_hidden_layers"]
    lora = lora_param_count(arch, targets, rank)
    one_layer = tokens * saved_per_token_layer(arch, seq_len, targets, rank) * b
    if checkpoint:  # layer inputs, plus one layer recomputed in the backward pass
        saved = layers * tokens * arch["hidden_size"] * b + one_layer
    else:
        saved = layers * one_layer
    parts = {
        "weights": base_param_count(arch) * b,
        "lora_params": lora * 4,
        "lora_grads": lora * 4,
        "adamw_state": 2 * lora * 4,
        "saved_activations": saved,
        "backward_working": one_layer,
        "logits": 2 * tokens * arch["vocab_size"] * 4,
    }
    out: dict[str, Any] = {k: v / MB for k, v in parts.items()}
    out["total"] = sum(parts.values()) / MB
    out["checkpoint"] = checkpoint
    return out


def peak_over_model(peak_max_rank_mb: float | None, peak_mb: float | None,
                    model: dict[str, Any] | None) -> float | None:
    """Peak RSS of one process over the analytic model's total: what it holds beyond the necessary.

    The model is per process, so a data-parallel run uses its largest rank's peak."""
    one_process = peak_max_rank_mb or peak_mb
    total = (model or {}).get("total")
    return one_process / total if one_process and total else None
