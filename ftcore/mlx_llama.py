"""Llama in MLX, with Hugging Face parameter names, plus a PEFT-compatible LoRALinear.

Parameter paths equal the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), so
converted weights load by name. The forward pass matches `transformers`' LlamaForCausalLM (eager /
sdpa attention): rotate_half RoPE (`traditional=False`) at positions 0..L-1 (padding included, as
HF does when no position_ids are given), GQA, RMSNorm, SwiGLU, untied lm_head unless the config
ties it.

LoRA: `LoRALinear` keeps the base `weight` under its own name (so `q_proj.weight` stays
`q_proj.weight` after `apply_lora`) and adds two plain `mx.array` attributes in PEFT's layout:
`lora_A` (rank, in_features) and `lora_B` (out_features, rank), so adapters move between
frameworks with no transposes. `y = W x + (alpha / rank) * B(A(dropout(x)))`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

LORA_LEAVES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ModelArgs:
        """Build from an HF Llama config.json dict; ValueError for anything this model cannot do."""
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"{flag}=true is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
        # transformers 5: rope_parameters={"rope_type": ..., "rope_theta": ...};
        # older configs: top-level rope_theta and an optional rope_scaling dict.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"rope type {rope_type!r} is not supported (only default RoPE)")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )


def additive_mask(attention_mask: mx.array | None, length: int, dtype: mx.Dtype) -> mx.array | str:
    """Additive (B, 1, L, L) mask: causal AND key is a real token (attention_mask 1 = real, 0 = pad).

    Blocked entries get the dtype's most negative finite value (not -inf), so a fully masked row
    (a pad query under left padding) softmaxes to a uniform row instead of NaN.
    """
    if attention_mask is None:
        return "causal"
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))  # (L, L)
    keep = causal[None] & (attention_mask[:, None, :] != 0)  # (B, L, L)
    blocked = mx.array(mx.finfo(dtype).min, dtype=dtype)
    return mx.where(keep, mx.array(0, dtype=dtype), blocked)[:, None]


def writes_exp_out() -> bool:
    """True on MLX's CPU, where softmax, logsumexp and silu are written out with exp: MLX's prebuilt
    CPU kernels (and an unfused Sigmoid) run exp scalar on one thread, while written-out chains
    are fused by mx.compile into JIT kernels built with vector flags (ftcore.mlx_jit). On a GPU
    the library's own fused ops are used."""
    return mx.default_device() == mx.cpu


@mx.custom_function
def _softmax_written_out(x: mx.array) -> mx.array:
    """Softmax over the last axis with exp written out, so mx.compile fuses it (see attention)."""
    e = mx.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax_written_out.vjp
def _softmax_written_out_vjp(x: mx.array, cotangent: mx.array, probs: mx.array) -> mx.array:
    # dL/dx = p * (g - sum(g * p)): one fused pass over the saved probabilities instead of
    # autodiff's chain through divide, sum and exp (softmax fwd + bwd over (8, 4, 256, 256),
    # one thread: 23 -> 14 ms).
    return probs * (cotangent - (cotangent * probs).sum(axis=-1, keepdims=True))


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str) -> mx.array:
    """Softmax attention with GQA: q (B, H, L, D), k/v (B, KV, L, D) -> (B, H, L, D); softmax in fp32.

    On a GPU this is mx.fast.scaled_dot_product_attention. On the CPU it is written out: the fused
    primitive's CPU fallback runs its softmax (exp) in a prebuilt single-threaded kernel, while
    written-out ops are fused by mx.compile into JIT kernels (see ftcore.mlx_jit), and the softmax
    has a one-pass VJP. Forward + backward for one row (32 heads, 4 kv heads, 256 x 64), one
    thread: 58 ms with autodiff's softmax VJP, 39 ms with the hand-written one.
    """
    if not writes_exp_out():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    kv = k.shape[1]
    if isinstance(mask, str):  # "causal": the additive mask of a batch without padding
        mask = additive_mask(mx.ones((1, L), dtype=mx.int32), L, q.dtype)  # (1, 1, L, L)
    # (B, KV, H/KV, L, D): each kv head serves H/KV query heads, without repeating k and v.
    qg = (q * mx.array(scale, dtype=q.dtype)).reshape(B, kv, H // kv, L, D)
    scores = qg @ k[:, :, None].swapaxes(-1, -2) + mask[:, :, None]  # (B, KV, H/KV, L, L)
    probs = _softmax_written_out(scores.astype(mx.float32)).astype(v.dtype)
    return (probs @ v[:, :, None]).reshape(B, H, L, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        h, d = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        # HF's rotate_half convention rotates the two halves of head_dim: traditional=False.
        self.rope = nn.RoPE(d, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, mask: mx.array | str) -> mx.array:
        B, L, _ = x.shape
        # (B, L, H*D) -> (B, H, L, D)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q), self.rope(k)
        out = attention(q, k, v, self.scale, mask)  # (B, H, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


@mx.custom_function
def _silu_written_out(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (xf / (1 + mx.exp(-xf))).astype(x.dtype)


@_silu_written_out.vjp
def _silu_written_out_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    # silu'(x) = s (1 + x (1 - s)) with s = sigmoid(x); exp(-x) = inf below x = -88 gives s = 0, a
    # finite 0 (autodiff of x / (1 + exp(-x)) would give inf / inf = NaN there).
    xf = x.astype(mx.float32)
    s = 1 / (1 + mx.exp(-xf))
    return (cotangent * s * (1 + xf * (1 - s))).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x). nn.silu on a GPU; on the CPU computed in fp32 with exp written out and a
    hand-written VJP: autodiff of nn.silu shares the Sigmoid primitive's output between two
    products, which leaves it out of mx.compile's fused kernels, in a prebuilt scalar kernel.
    silu(gate) * up, forward + backward over (256, 5632), one thread: 27-35 ms with nn.silu, 5 ms
    with this."""
    if not writes_exp_out():
        return nn.silu(x)
    return _silu_written_out(x)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | str) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The decoder stack (HF `LlamaModel`): token ids -> final normed hidden states (B, L, hidden)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        h = self.embed_tokens(input_ids)  # compute dtype = the weights' dtype
        mask = additive_mask(attention_mask, input_ids.shape[1], h.dtype)
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h)


class Model(nn.Module):
    """HF `LlamaForCausalLM`: `model(input_ids (B, L), attention_mask (B, L) | None) -> logits (B, L, V)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        return self.head(self.model(input_ids, attention_mask))

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states (..., hidden) -> logits (..., V)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)


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


_ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


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
    unknown = set(targets) - set(_ATTN_TARGETS + _MLP_TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA target(s): {', '.join(sorted(unknown))}")
    model.freeze()
    n = len(model.model.layers) * len(targets)
    keys = mx.random.split(key, n) if key is not None else [None] * n
    i = 0
    for layer in model.model.layers:
        for name in targets:
            parent = layer.self_attn if name in _ATTN_TARGETS else layer.mlp
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


def load_model(mlx_dir: str | Path) -> tuple[Model, ModelArgs]:
    """Load a converter output folder (config.json + weights.safetensors); dtype as stored."""
    mlx_dir = Path(mlx_dir)
    args = ModelArgs.from_hf_config(json.loads((mlx_dir / "config.json").read_text()))
    model = Model(args)
    # Model() builds random parameters lazily; load_weights replaces them before any evaluation.
    model.load_weights(list(mx.load(str(mlx_dir / "weights.safetensors")).items()), strict=True)
    mx.eval(model.parameters())
    return model, args
