"""The initial LoRA weights every backend starts from, and a fingerprint of adapter state.

Layout is PEFT's: lora_A (rank, in_features), lora_B (out_features, rank);
y = W x + (alpha / rank) * B(A(dropout(x))).
Every backend starts from `initial_lora_state(...)` so loss curves are comparable step by step.
"""

from __future__ import annotations

import hashlib
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


def state_fingerprint(state: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k], dtype=np.float32)
        h.update(k.encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]
