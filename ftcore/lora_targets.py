"""The linears of a Llama layer that LoRA can target (Hugging Face's names), on the package's floor
so that RunConfig can check --lora-targets; ftcore.inputs.arch has the rest of the architecture."""

from __future__ import annotations

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # under model.layers.{i}.self_attn
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")  # under model.layers.{i}.mlp
LORA_TARGETS = ATTN_TARGETS + MLP_TARGETS  # every per-layer linear of a Llama


def parse_targets(text: str) -> tuple[str, ...]:
    """"q_proj, v_proj" -> ("q_proj", "v_proj"); names are checked by RunConfig."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
