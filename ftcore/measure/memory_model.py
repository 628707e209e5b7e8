"""Analytic memory of a fine-tune (--fine-tune lora, dora or full): what one training process must
hold at its peak, by component. The report puts it beside the measured peak, so `peak / model`
shows how much a backend holds beyond the necessary (runtime, allocator caches, copies).

Counted (MB = 2**20 bytes), for one process training `rows` rows (one micro-batch) of `seq_len`
tokens:

* weights: every base parameter at the run's precision (4 bytes fp32, 2 bf16);
* adapters: LoRA's A and B (and DoRA's magnitude per output row), fp32 in both precisions; none
  for a full fine-tune, whose trained weights are the decoder layers' own (in `weights`);
* grads and AdamW's two moments: fp32, one of each per trainable parameter
  (ftcore.measure.flops.trainable_param_count): a full fine-tune's are the size of the layers;
* saved activations: what the backward pass reads, per token and layer, at the compute precision:
  the layer input and its RMSNorm output, q and k after RoPE and v, the attention probabilities
  (heads x seq_len per token: eager attention, and MLX's written-out attention, keep them; a
  fused kernel would keep one value per head), the attention output (o_proj's input), the residual
  and its RMSNorm output, gate, up, silu(gate) and their product (down_proj's input), and each
  targeted linear's rank-r LoRA intermediate; DoRA also keeps each targeted linear's base and LoRA
  outputs (2 x out per token), which the magnitude's gradient reads;
  with gradient checkpointing only each layer's input is kept, plus one layer's activations while
  the backward pass recomputes it;
* backward working set: the gradients of one layer's activations, alive while it is backpropagated;
* DoRA's weight norm: W + scale * B A of the largest targeted linear and its product B A (fp32),
  made each step to take the row norms;
* logits and their gradient: 2 x rows x seq_len x vocab in fp32 (the loss runs in fp32).

Not counted: the interpreter and the frameworks' own code and buffers, the tokenizer and data, the
allocator's cache, and any transient copies a backend makes; that is what `peak / model` beyond 1
measures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ftcore.config import RunConfig
from ftcore.inputs.arch import linear_shapes
from ftcore.measure.flops import trainable_param_count

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
    arch: dict[str, Any], seq_len: int, targets: Iterable[str], rank: int, fine_tune: str = "lora"
) -> int:
    """Activation values one layer keeps per token for its backward pass (see the module doc)."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or h // heads
    attention = 2 * h + (heads + 2 * kv) * hd + heads * seq_len + heads * hd
    mlp = 2 * h + 4 * inter
    targets, shapes = list(targets), linear_shapes(arch)
    if fine_tune == "full":
        return attention + mlp
    dora = 2 * sum(shapes[t][1] for t in targets) if fine_tune == "dora" else 0
    return attention + mlp + rank * len(targets) + dora


def memory_model(arch: dict[str, Any], cfg: RunConfig, rows: int, seq_len: int) -> dict[str, Any]:
    """{component: MB, ..., "total": MB, "checkpoint": bool, "fine_tune": str} for one training
    process of `rows` rows of `seq_len` tokens (a micro-batch at the run's widest step,
    Batches.widest) at the run's precision, --fine-tune, LoRA targets and rank, and
    --grad-checkpoint."""
    precision, rank, checkpoint, kind = (cfg.precision, cfg.lora_rank, cfg.grad_checkpoint,
                                         cfg.fine_tune)  # fmt: skip
    targets = list(cfg.lora_targets)
    b = BYTES[precision]
    tokens = rows * seq_len
    layers = arch["num_hidden_layers"]
    trainable = trainable_param_count(arch, kind, targets, rank)
    one_layer = tokens * saved_per_token_layer(arch, seq_len, targets, rank, kind) * b
    if checkpoint:  # layer inputs, plus one layer recomputed in the backward pass
        saved = layers * tokens * arch["hidden_size"] * b + one_layer
    else:
        saved = layers * one_layer
    largest = max(i * o for i, o in (linear_shapes(arch)[t] for t in targets))
    parts = {
        "weights": base_param_count(arch) * b,
        "adapters": 0 if kind == "full" else trainable * 4,
        "grads": trainable * 4,
        "adamw_state": 2 * trainable * 4,
        "saved_activations": saved,
        "backward_working": one_layer,
        "dora_norm": 2 * largest * 4 if kind == "dora" else 0,
        "logits": 2 * tokens * arch["vocab_size"] * 4,
    }
    out: dict[str, Any] = {k: v / MB for k, v in parts.items()}
    out["total"] = sum(parts.values()) / MB
    out["checkpoint"] = checkpoint
    out["fine_tune"] = kind
    return out


def peak_over_model(peak_max_rank_mb: float | None, peak_mb: float | None,
                    model: dict[str, Any] | None) -> float | None:
    """Peak RSS of one process over the analytic model's total: what it holds beyond the necessary.

    The model is per process, so a data-parallel run uses its largest rank's peak."""
    one_process = peak_max_rank_mb or peak_mb
    total = (model or {}).get("total")
    return one_process / total if one_process and total else None
