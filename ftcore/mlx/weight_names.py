"""HF <-> MLX tensor names: the explicit table every converted tensor goes through (mapped or
deliberately dropped; an unknown key is an error), used by the weight conversion (convert) and
the adapter files (adapters)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ftcore.inputs.adapter_format import ConversionError  # noqa: F401 (the converter's error)

# HF key template -> MLX key template ("{}" = layer index); None = deliberately dropped.
HF_TO_MLX: dict[str, str | None] = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": (
        "model.layers.{}.post_attention_layernorm.weight"
    ),
    "model.layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",  # dropped instead when tie_word_embeddings
    # RoPE frequencies, stored by old checkpoints; MLX recomputes them from rope_theta.
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,
}
MLX_TO_HF: dict[str, str] = {v: k for k, v in HF_TO_MLX.items() if v is not None}


def _map_key(key: str, table: Mapping[str, str | None]) -> str | None:
    template = re.sub(r"\.(\d+)\.", ".{}.", key, count=1)
    if template not in table:
        raise ConversionError(f"no mapping for tensor {key!r}")
    target = table[template]
    if target is None or "{}" not in template:
        return target
    return target.format(re.search(r"\.(\d+)\.", key).group(1))


def hf_to_mlx_key(key: str, tie_word_embeddings: bool = False) -> str | None:
    """MLX name of an HF tensor; None if deliberately dropped; ConversionError if unknown."""
    if tie_word_embeddings and key == "lm_head.weight":
        return None  # the head is embed_tokens; some tied checkpoints still store a copy
    return _map_key(key, HF_TO_MLX)


def mlx_to_hf_key(key: str) -> str:
    """HF name of an MLX tensor; ConversionError if unknown."""
    return _map_key(key, MLX_TO_HF)


