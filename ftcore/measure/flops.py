"""Analytic training FLOPs per token for LoRA fine-tuning a Llama, and the closed-form count of
trainable LoRA parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ftcore.inputs.arch import linear_shapes
from ftcore.lora_targets import LORA_TARGETS


def lora_param_count(arch: dict[str, Any], targets: Iterable[str], rank: int) -> int:
    """rank * (in + out) per targeted linear per layer."""
    shapes = linear_shapes(arch)
    return arch["num_hidden_layers"] * sum(rank * sum(shapes[t]) for t in targets)


def trainable_param_count(arch: dict[str, Any], fine_tune: str, targets: Iterable[str],
                          rank: int) -> int:
    """What --fine-tune trains, in closed form: lora: rank * (in + out) per targeted linear per
    layer; dora: that plus one magnitude per output row; full: every decoder layer's 7 linears and
    2 RMSNorm weights (hidden each)."""
    shapes, layers, targets = linear_shapes(arch), arch["num_hidden_layers"], list(targets)
    if fine_tune == "full":
        return layers * (sum(i * o for i, o in shapes.values()) + 2 * arch["hidden_size"])
    magnitudes = layers * sum(shapes[t][1] for t in targets) if fine_tune == "dora" else 0
    return lora_param_count(arch, targets, rank) + magnitudes


def flops_per_token(arch: dict[str, Any], seq_len: int, lora_targets: Iterable[str],
                    lora_rank: int, fine_tune: str = "lora") -> dict[str, Any]:
    """Analytic training FLOPs per token for LoRA fine-tuning a Llama (matmuls only).

    A matmul of (m x k) by (k x n) counts 2*m*k*n. Per token and layer:

    * base linears B = sum over q,k,v,o,gate,up,down of 2*in*out (k,v have kv_heads*head_dim
      outputs); lm_head Hd = 2*hidden*vocab; the embedding is a lookup (0).
    * attention A = 2*2*seq_len*heads*head_dim: QK^T and AV over the *full* seq_len, i.e. the
      dense, non-causal-halved count (what SDPA with a mask computes; PaLM's MFU convention).
    * LoRA R = 2*r*(in+out) per targeted linear (x@A then @B).

    forward = L*(B + A + R) + Hd.
    backward: frozen weights need only the input gradient (1x forward, no weight gradient);
    LoRA weights need input and weight gradients (2x); attention has no weights, but both
    operands of each matmul need gradients (2x). backward = L*(B + 2A + 2R) + Hd.
    total = forward + backward = L*(2B + 3A + 3R) + 2*Hd  (vs. 6N-ish for full fine-tuning).

    Convention: input gradients are counted for every layer, although autograd may skip
    the frozen base matmuls of layer 0 whose input (the embedding) needs no gradient — an
    over-count of at most one layer's B. Norms, RoPE, softmax, SiLU and the loss are ignored.

    --fine-tune full: no LoRA term, and the layers' weights need weight gradients too:
    backward = L*(2B + 2A) + Hd. dora: as lora per token (its weight norm, out x in x (2r + 2) per
    target, is per step, not per token, and is not counted).
    """
    layers, vocab, h = arch["num_hidden_layers"], arch["vocab_size"], arch["hidden_size"]
    heads = arch["num_attention_heads"]
    hd = arch.get("head_dim") or h // heads
    shapes = linear_shapes(arch)
    full = fine_tune == "full"
    targets = list(lora_targets) if lora_rank and not full else []
    if unknown := sorted(set(targets) - set(LORA_TARGETS)):
        raise ValueError(f"unknown LoRA target(s) {unknown}; expected some of {LORA_TARGETS}")
    base = sum(2 * i * o for i, o in shapes.values())
    attn = 2 * 2 * seq_len * heads * hd
    lora = sum(2 * lora_rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    head = 2 * h * vocab
    fwd = layers * (base + attn + lora) + head
    bwd = layers * ((2 if full else 1) * base + 2 * attn + 2 * lora) + head
    return {
        "forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd),
        "base_linear_forward": float(layers * base), "attention_forward": float(layers * attn),
        "lora_forward": float(layers * lora), "lm_head_forward": float(head),
        "linear_params": layers * base // 2 + head // 2,
        "lora_params": layers * lora // 2,
        "convention": "2*m*n*k matmul FLOPs; dense (non-causal-halved) attention; "
                      "frozen weights: input grads only",
    }


MAX_PROBE_GFLOP = 4.0  # GEMMs larger than this run at the large-square rate: not probed one by one


def gemm_shapes(
    arch: dict[str, Any], batch: int, seq_len: int, threads: int
) -> list[tuple[int, int, int]]:
    """(m, k, n) of the base-weight GEMMs one training step runs, forward and backward (input
    gradient: (m, n) @ (n, k)), for the whole batch (m = batch * seq_len) and for one row stream
    (m / threads, the MLX CPU split), small enough to probe quickly (<= MAX_PROBE_GFLOP).

    MFU's peak is the best of these and a large square: a framework may run the run's own small
    shapes faster than the square (MLX's bf16 CPU fallback does), and MFU must not exceed 1."""
    pairs = set(linear_shapes(arch).values()) | {(arch["hidden_size"], arch["vocab_size"])}
    rows = {batch * seq_len}
    if threads > 1 and batch % threads == 0:
        rows.add(batch // threads * seq_len)
    shapes = {(m, k, n) for m in rows for k, n in pairs} | {
        (m, n, k) for m in rows for k, n in pairs
    }
    return sorted(s for s in shapes if 2 * s[0] * s[1] * s[2] <= MAX_PROBE_GFLOP * 1e9)
