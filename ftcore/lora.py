"""Framework-free LoRA facts shared by every backend: where adapters go, their initial weights.

Layout is PEFT's: lora_A (rank, in_features), lora_B (out_features, rank);
y = W x + (alpha / rank) * B(A(dropout(x))).
Every backend starts from `initial_lora_state(...)` so loss curves are comparable step by step.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_path(layer: int, target: str) -> str:
    """HF module path of a targeted linear, e.g. model.layers.0.self_attn.q_proj."""
    block = "self_attn" if target in ATTN else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def linear_shape(arch: dict[str, Any], target: str) -> tuple[int, int]:
    """(in_features, out_features) of a Llama linear from the HF config."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    head_dim = arch.get("head_dim") or h // arch["num_attention_heads"]
    q = arch["num_attention_heads"] * head_dim
    kv = arch.get("num_key_value_heads", arch["num_attention_heads"]) * head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }[target]


def initial_lora_state(
    arch: dict[str, Any], targets: tuple[str, ...], rank: int, seed: int
) -> dict[str, np.ndarray]:
    """fp32 initial adapters keyed `<module_path>.lora_A` / `.lora_B`.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) — the bound of PEFT's kaiming_uniform_(a=sqrt(5)) — and B = 0,
    drawn from one numpy generator in a fixed (layer, target) order.
    """
    rng = np.random.default_rng(seed)
    state = {}
    for layer in range(arch["num_hidden_layers"]):
        for t in targets:
            fan_in, fan_out = linear_shape(arch, t)
            bound = 1.0 / np.sqrt(fan_in)
            path = module_path(layer, t)
            state[f"{path}.lora_A"] = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
            state[f"{path}.lora_B"] = np.zeros((fan_out, rank), dtype=np.float32)
    return state


def trainable_params(arch: dict[str, Any], targets: tuple[str, ...], rank: int) -> int:
    """Closed form: rank * (in + out) per targeted linear per layer."""
    return arch["num_hidden_layers"] * sum(rank * sum(linear_shape(arch, t)) for t in targets)


def state_fingerprint(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k], dtype=np.float32)
        h.update(k.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
