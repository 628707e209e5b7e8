"""Llama in MLX with Hugging Face parameter names:
`Model(args)(input_ids, attention_mask) -> logits`.

Parameter paths equal the HF checkpoint keys (`model.layers.0.self_attn.q_proj.weight`, ...), so
converted weights load by name. The forward pass matches `transformers`' LlamaForCausalLM (eager /
sdpa attention): rotate_half RoPE (`traditional=False`) at positions 0..L-1 (padding included, as
HF does when no position_ids are given) or, for packed rows, at the given `position_ids` with the
per-document causal mask (ftcore.mlx.ops.packed_mask), GQA, RMSNorm, SwiGLU, untied lm_head unless
the config ties it. Attention, softmax and silu come from ftcore.mlx.ops; LoRA from ftcore.mlx.lora.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ftcore.inputs.arch import normalise_config, unsupported
from ftcore.mlx.ops import additive_mask, attention, packed_mask, rope_at, silu

# in a conversion folder (ftcore.mlx.convert), as mlx-lm names it
WEIGHTS_FILE = "model.safetensors"


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
        if why := unsupported(d):
            raise ValueError(why)
        arch = normalise_config(d)
        return cls(**{f.name: arch[f.name] for f in fields(cls)})


class KVCache:
    """One layer's keys and values so far, (B, KV, offset, D) each, for greedy decoding."""

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = k, v
        else:
            self.keys = mx.concatenate([self.keys, k], axis=2)
            self.values = mx.concatenate([self.values, v], axis=2)
        return self.keys, self.values


def cached_causal_mask(new: int, offset: int, dtype: mx.Dtype) -> mx.array:
    """Additive (1, 1, new, offset+new) mask: new token i (at position offset+i) sees keys
    0..offset+i."""
    keys = mx.arange(offset + new)[None, :]
    queries = mx.arange(offset, offset + new)[:, None]
    blocked = mx.array(mx.finfo(dtype).min, dtype=dtype)
    return mx.where(keys <= queries, mx.array(0, dtype=dtype), blocked)[None, None]


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

    def __call__(self, x: mx.array, mask: mx.array | str, cache: KVCache | None = None,
                 positions: mx.array | None = None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, H*D) -> (B, H, L, D)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if positions is not None:  # packed rows: (B, L) positions restarting at each record
            q, k = rope_at(q, positions, self.rope.base), rope_at(k, positions, self.rope.base)
        else:
            # new tokens sit at positions offset..offset+L-1
            offset = 0 if cache is None else cache.offset
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, KV, offset+L, D)
        out = attention(q, k, v, self.scale, mask)  # (B, H, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


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

    def __call__(self, x: mx.array, mask: mx.array | str, cache: KVCache | None = None,
                 positions: mx.array | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """The decoder stack (HF `LlamaModel`): token ids -> final normed hidden states
    (B, L, hidden)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # gradient checkpointing: in training, each layer's activations are recomputed in the
        # backward pass from its input (mx.checkpoint) instead of being kept
        self.checkpoint_layers = False

    def __call__(
        self,
        input_ids: mx.array,
        attention_mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
        position_ids: mx.array | None = None,
    ) -> mx.array:
        """`cache` (one KVCache per layer, for decoding; no padding): the new tokens attend to the
        cached ones and to each other causally, and are appended to the cache. `position_ids`
        (B, L) (packed rows, with attention_mask): each record attends to itself only."""
        h = self.embed_tokens(input_ids)  # compute dtype = the weights' dtype
        if position_ids is not None:
            mask = packed_mask(position_ids, attention_mask, h.dtype)
        elif cache is None:
            mask = additive_mask(attention_mask, input_ids.shape[1], h.dtype)
        else:
            mask = cached_causal_mask(input_ids.shape[1], cache[0].offset, h.dtype)
        for i, layer in enumerate(self.layers):
            if self.checkpoint_layers and self.training and cache is None:
                h = checkpointed(layer, h, mask, position_ids)
            else:
                h = layer(h, mask, None if cache is None else cache[i], position_ids)
        return self.norm(h)


def checkpointed(layer: DecoderLayer, h: mx.array, mask: mx.array | str,
                 positions: mx.array | None = None) -> mx.array:
    """layer(h, mask) under mx.checkpoint: only h (and the mask) are kept for the backward pass,
    which runs the layer again. The layer's trainable parameters (LoRA) are inputs of the
    checkpointed function, so their gradients flow through it. (LoRA dropout would draw new masks
    in the recomputation: the preflight refuses --grad-checkpoint with dropout for MLX.)"""

    def run(params: dict, x: mx.array, *masks: mx.array) -> mx.array:
        layer.update(params)
        return layer(x, masks[0] if masks else mask, None, positions)

    masks = () if isinstance(mask, str) else (mask,)
    return mx.checkpoint(run)(layer.trainable_parameters(), h, *masks)


class Model(nn.Module):
    """HF `LlamaForCausalLM`:
    `model(input_ids (B, L), attention_mask (B, L) | None) -> logits (B, L, V)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 cache: list[KVCache] | None = None) -> mx.array:
        return self.head(self.model(input_ids, attention_mask, cache))

    def head(self, h: mx.array) -> mx.array:
        """Final hidden states (..., hidden) -> logits (..., V)."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)


def load_model(mlx_dir: str | Path) -> tuple[Model, ModelArgs]:
    """Load a converter output folder (ftcore.mlx.convert: config.json + model.safetensors); dtype
    as stored."""
    mlx_dir = Path(mlx_dir)
    args = ModelArgs.from_hf_config(json.loads((mlx_dir / "config.json").read_text()))
    model = Model(args)
    # Model() builds random parameters lazily; load_weights replaces them before any evaluation.
    model.load_weights(list(mx.load(str(mlx_dir / WEIGHTS_FILE)).items()), strict=True)
    mx.eval(model.parameters())
    return model, args
