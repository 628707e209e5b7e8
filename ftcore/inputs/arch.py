"""Llama architecture facts, in one place: the shapes and module paths of the linears LoRA can
target (their names: ftcore.lora_targets), and reading a Hugging Face config.json.

Every other module (RunConfig, FLOPs, both frameworks, the converter) takes these from here.
Names are Hugging Face's (`model.layers.{i}.self_attn.q_proj`), which the MLX model keeps too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftcore.lora_targets import ATTN_TARGETS, LORA_TARGETS, MLP_TARGETS


def block_of(target: str) -> str:
    """The submodule of a decoder layer that holds `target`: "self_attn" or "mlp"."""
    if target in ATTN_TARGETS:
        return "self_attn"
    if target in MLP_TARGETS:
        return "mlp"
    raise ValueError(f"unknown Llama linear {target!r} (one of {', '.join(LORA_TARGETS)})")


def module_path(layer: int, target: str) -> str:
    """HF module path of a per-layer linear, e.g. model.layers.0.self_attn.q_proj."""
    return f"model.layers.{layer}.{block_of(target)}.{target}"


# Trainable tensors' last name part, per framework: LoRA's A and B (PEFT / ftcore: lora_A, lora_B;
# mlx-lm: lora_a, lora_b) and DoRA's magnitude per output row (PEFT / ftcore:
# lora_magnitude_vector; mlx-lm: m)
ADAPTER_LEAVES = frozenset({"lora_A", "lora_B", "lora_a", "lora_b"})
MAGNITUDE_LEAVES = frozenset({"lora_magnitude_vector", "m"})


def fine_tune_of(names: list[str]) -> str:
    """What a model trains, from its trainable tensors' names (PEFT names as `lora_state` keys):
    "dora" (adapters and magnitudes), "lora" (adapters), "full" (the decoder layers' own weights,
    no adapter), "" (nothing trainable), or "mixed: ..." for anything else (a run to refuse)."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    layer_weights = all(n.startswith("model.layers.") for n in names)
    if not names:
        return ""
    if leaves <= ADAPTER_LEAVES | MAGNITUDE_LEAVES and leaves & ADAPTER_LEAVES:
        return "dora" if leaves & MAGNITUDE_LEAVES else "lora"
    if not leaves & (ADAPTER_LEAVES | MAGNITUDE_LEAVES) and layer_weights:
        return "full"
    return f"mixed: {', '.join(sorted(leaves))}"


def linear_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each per-layer linear; k/v have kv_heads * head_dim
    outputs."""
    h, inter = arch["hidden_size"], arch["intermediate_size"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or h // heads
    return {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv * hd),
        "v_proj": (h, kv * hd),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def normalise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """An HF Llama config dict with the fields every consumer needs filled in: `rope_theta` at the
    top level (transformers 5 nests it in `rope_parameters`), `head_dim`, `num_key_value_heads`,
    `rms_norm_eps`, `tie_word_embeddings`. Other keys are kept as they are."""
    out = dict(cfg)
    rope = out.get("rope_parameters") or out.get("rope_scaling") or {}
    out["rope_theta"] = float(rope.get("rope_theta", out.get("rope_theta", 10000.0)))
    out["head_dim"] = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
    out["num_key_value_heads"] = out.get("num_key_value_heads") or out["num_attention_heads"]
    out.setdefault("rms_norm_eps", 1e-6)
    out["tie_word_embeddings"] = bool(out.get("tie_word_embeddings", False))
    return out


def unsupported(cfg: dict[str, Any]) -> str | None:
    """Why a Llama config uses something ftcore's MLX model does not implement, or None."""
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            return f"{flag}=true is not supported"
    if cfg.get("hidden_act", "silu") != "silu":
        return f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)"
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        return f"rope type {rope_type!r} is not supported (only default RoPE)"
    return None


def read_arch(model_dir: str | Path) -> dict[str, Any]:
    """The normalised config.json of a checkpoint folder (see normalise_config)."""
    return normalise_config(json.loads((Path(model_dir) / "config.json").read_text()))
