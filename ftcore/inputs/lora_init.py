"""The initial LoRA weights every backend starts from, and a fingerprint of adapter state.

Layout is PEFT's: lora_A (rank, in_features), lora_B (out_features, rank);
y = W x + (alpha / rank) * B(A(dropout(x))).
Every backend starts from `initial_lora_state(...)` so loss curves are comparable step by step.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from ftcore.inputs.arch import linear_shapes, module_path


def initial_lora_state(
    arch: dict[str, Any], targets: tuple[str, ...], rank: int, seed: int
) -> dict[str, np.ndarray]:
    """fp32 initial adapters keyed `<module_path>.lora_A` / `.lora_B`.

    A ~ U(-1/sqrt(in), 1/sqrt(in)) — the bound of PEFT's kaiming_uniform_(a=sqrt(5)) — and
    B = 0, drawn from one numpy generator in a fixed (layer, target) order.
    """
    rng = np.random.default_rng(seed)
    shapes = linear_shapes(arch)
    state = {}
    for layer in range(arch["num_hidden_layers"]):
        for t in targets:
            fan_in, fan_out = shapes[t]
            bound = 1.0 / np.sqrt(fan_in)
            path = module_path(layer, t)
            state[f"{path}.lora_A"] = rng.uniform(-bound, bound, (rank, fan_in)).astype(np.float32)
            state[f"{path}.lora_B"] = np.zeros((fan_out, rank), dtype=np.float32)
    return state


def dora_magnitudes(base: dict[str, Any], state: dict[str, np.ndarray], scale: float,
                    ) -> dict[str, np.ndarray]:
    """DoRA's initial magnitude per output row of each adapted linear, PEFT's: the row norms of
    W + scale * B @ A (out,), fp32, keyed `<module_path>.lora_magnitude_vector`. `base`: each
    adapted linear's weight (out, in) by module path, as numpy or any array numpy reads (one at a
    time: a framework's own fp32 weights). Computed in float64 numpy from the same fp32 values in
    every backend, so the bytes, and the initial-adapter fingerprint, are equal."""
    out = {}
    for path, weight in base.items():
        w = np.asarray(weight, dtype=np.float64)
        delta = state[f"{path}.lora_B"].astype(np.float64) @ state[f"{path}.lora_A"]
        out[f"{path}.lora_magnitude_vector"] = np.linalg.norm(w + scale * delta, axis=1).astype(
            np.float32)
    return out


def state_fingerprint(state: dict[str, Any], sampled: bool = False) -> str:
    """sha256 (16 hex) of a trainable state's names and fp32 values (numpy, or any array numpy
    reads). `sampled` (a full fine-tune's billion weights): each tensor's shape and every
    (size // 4096)-th value instead of all of them, so hashing costs no copy of the model."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if sampled:
            h.update(str(tuple(v.shape)).encode())
            v = v.reshape(-1)[:: max(1, math.prod(v.shape) // 4096)]
        v = v.cpu() if hasattr(v, "cpu") else v  # a torch tensor on a GPU
        a = np.ascontiguousarray(np.asarray(v), dtype=np.float32)
        h.update(k.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
