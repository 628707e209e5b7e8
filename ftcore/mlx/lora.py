"""LoRA for the MLX Llama, in PEFT's layout, so adapters move between frameworks with no transposes.

`LoRALinear` keeps the base `weight` under its own name (so `q_proj.weight` stays `q_proj.weight`
after `apply_lora`) and adds two plain `mx.array` attributes: `lora_A` (rank, in_features) and
`lora_B` (out_features, rank). `y = W x + (alpha / rank) * B(A(dropout(x)))`; adapters stay fp32
under a bf16 base, as PEFT's autocast_adapter_dtype does.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ftcore.inputs.arch import block_of
from ftcore.lora_targets import LORA_TARGETS
from ftcore.mlx.model import Model

LORA_LEAVES = ("lora_A", "lora_B")


class LoRALinear(nn.Module):
    """A frozen bias-free linear plus a trainable low-rank update, PEFT layout.

    Parameters: `weight` (out, in) (the base, same name as in nn.Linear), `lora_A` (rank, in),
    `lora_B` (out, rank). `scale` = alpha / rank (a float, not a parameter).
    """

    def __init__(
        self,
        weight: mx.array,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        key: mx.array | None = None,
    ):
        super().__init__()
        out_features, in_features = weight.shape
        self.weight = weight
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p=dropout)
        # PEFT: kaiming_uniform_(a=sqrt(5)) on (rank, in) == U(-1/sqrt(in), 1/sqrt(in)); B = 0.
        # Adapters stay fp32 under a bf16 base, as PEFT's autocast_adapter_dtype does.
        bound = 1.0 / math.sqrt(in_features)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_features), key=key)
        self.lora_B = mx.zeros((out_features, rank))
        self.freeze(keys=["weight"], recurse=False)

    @classmethod
    def from_base(
        cls,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        key: mx.array | None = None,
    ) -> LoRALinear:
        if "bias" in linear:
            raise ValueError("LoRALinear supports bias-free linears only")
        return cls(linear.weight, rank, alpha, dropout, key)

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        z = (self.dropout(x) @ self.lora_A.T) @ self.lora_B.T  # (..., rank) -> (..., out)
        # Add in the wider dtype, then round once (PEFT: bf16 result + fp32 update, cast back).
        return (y + self.scale * z).astype(y.dtype)

    def fuse(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B @ A, in the base weight's dtype."""
        out_features, in_features = self.weight.shape
        fused = nn.Linear(in_features, out_features, bias=False)
        delta = self.scale * (self.lora_B @ self.lora_A)  # (out, in)
        fused.weight = (self.weight + delta).astype(self.weight.dtype)
        return fused


def apply_lora(
    model: Model,
    targets: tuple[str, ...],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    key: mx.array | None = None,
) -> Model:
    """Swap the named linears of every layer for LoRALinear; only lora_A/lora_B stay trainable.

    `key` seeds lora_A (split once per module, in layer then target order); None uses MLX's
    global PRNG.
    """
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s): {', '.join(sorted(unknown))}")
    model.freeze()
    n = len(model.model.layers) * len(targets)
    keys = mx.random.split(key, n) if key is not None else [None] * n
    i = 0
    for layer in model.model.layers:
        for name in targets:
            parent = getattr(layer, block_of(name))
            base = getattr(parent, name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            setattr(parent, name, LoRALinear.from_base(base, rank, alpha, dropout, keys[i]))
            i += 1
    return model


def lora_state(model: nn.Module) -> dict[str, mx.array]:
    """All adapter arrays, keyed by module path: `model.layers.0.self_attn.q_proj.lora_A`."""
    return {
        k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in LORA_LEAVES
    }


def load_lora_state(model: nn.Module, state: dict[str, mx.array]) -> None:
    """Set adapter arrays in place; the keys and shapes must match the model's adapters exactly."""
    current = lora_state(model)
    if missing := current.keys() - state.keys():
        raise ValueError(f"adapter state lacks {len(missing)} key(s), e.g. {sorted(missing)[0]}")
    if extra := state.keys() - current.keys():
        raise ValueError(f"adapter state has {len(extra)} unknown key(s), e.g. {sorted(extra)[0]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(current[k].shape):
            raise ValueError(f"{k}: shape {tuple(v.shape)} != model's {tuple(current[k].shape)}")
    model.update(tree_unflatten(list(state.items())))
