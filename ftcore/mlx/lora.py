"""LoRA and DoRA for the MLX Llama, in PEFT's layout, so adapters move between frameworks with no
transposes.

`LoRALinear` keeps the base `weight` under its own name (so `q_proj.weight` stays `q_proj.weight`
after `apply_lora`) and adds two plain `mx.array` attributes: `lora_A` (rank, in_features) and
`lora_B` (out_features, rank). `y = W x + (alpha / rank) * B(A(dropout(x)))`; adapters stay fp32
under a bf16 base, as PEFT's autocast_adapter_dtype does. `DoRALinear` adds DoRA's magnitude per
output row, `lora_magnitude_vector` (out,), computed as PEFT's use_dora computes it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ftcore.inputs.arch import block_of
from ftcore.lora_targets import LORA_TARGETS
from ftcore.mlx.model import Model

LORA_LEAVES = ("lora_A", "lora_B", "lora_magnitude_vector")  # DoRA's magnitude last


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
        self.dropout_p = dropout
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


class DoRALinear(LoRALinear):
    """LoRALinear plus DoRA's magnitude per output row, `lora_magnitude_vector` (out,), as PEFT's
    use_dora: with g = m / ||W + scale * B A|| per row (the norm detached from the gradient, DoRA's
    section 4.3, as PEFT), `y = W x + (g - 1) * W d(x) + g * scale * B(A(d(x)))` where d is the
    dropout; without dropout (or in eval) `W d(x)` is `W x`, computed once. The magnitude starts
    at the row norms of W + scale * B A (B = 0: W's)."""

    def __init__(self, weight: mx.array, rank: int, alpha: float, dropout: float = 0.0,
                 key: mx.array | None = None):
        super().__init__(weight, rank, alpha, dropout, key)
        self.lora_magnitude_vector = self.adapted_norm().astype(mx.float32)

    def adapted_norm(self) -> mx.array:
        """||W + scale * B A|| per output row (out,), outside the gradient."""
        adapted = self.weight + self.scale * (self.lora_B @ self.lora_A)  # (out, in)
        return mx.stop_gradient(mx.linalg.norm(adapted, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        dropped = self.dropout(x)
        z = (dropped @ self.lora_A.T) @ self.lora_B.T  # (..., rank) -> (..., out)
        g = self.lora_magnitude_vector / self.adapted_norm()  # (out,)
        base = dropped @ self.weight.T if self.training and self.dropout_p > 0 else y
        return (y + ((g - 1) * base + g * z * self.scale)).astype(y.dtype)

    def fuse(self) -> nn.Linear:
        """A plain nn.Linear with (m / ||W + scale B A||) * (W + scale B A) per row."""
        fused = super().fuse()
        g = self.lora_magnitude_vector / self.adapted_norm()
        fused.weight = (g[:, None] * fused.weight).astype(self.weight.dtype)
        return fused


def apply_lora(
    model: Model,
    targets: tuple[str, ...],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    dora: bool = False,
) -> Model:
    """Swap the named linears of every layer for LoRALinear (DoRALinear for `dora`); only the
    adapters (lora_A, lora_B, and DoRA's magnitudes) stay trainable. lora_A is drawn from MLX's
    global PRNG (the backends then load the shared initial state).
    """
    unknown = set(targets) - set(LORA_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s): {', '.join(sorted(unknown))}")
    model.freeze()
    for layer in model.model.layers:
        for name in targets:
            parent = getattr(layer, block_of(name))
            base = getattr(parent, name)
            if isinstance(base, LoRALinear):
                raise ValueError(f"{name} already has a LoRA adapter")
            kind = DoRALinear if dora else LoRALinear
            setattr(parent, name, kind.from_base(base, rank, alpha, dropout))
    return model


def adapted_weights(model: Model, targets: tuple[str, ...]) -> dict[str, mx.array]:
    """The base weight (out, in) of each targeted linear, by HF module path (DoRA's magnitudes
    start from them: ftcore.inputs.lora_init.dora_magnitudes)."""
    return {f"model.layers.{i}.{block_of(t)}.{t}": getattr(getattr(layer, block_of(t)), t).weight
            for i, layer in enumerate(model.model.layers) for t in targets}  # fmt: skip


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
