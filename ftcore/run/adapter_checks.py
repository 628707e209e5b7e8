"""The adapter folder `ftcore generate --adapter` reads (PEFT format, LoRA or DoRA), read and
checked before any model loads: one `error:` line for a folder that would decode garbage or
silently act as the base model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ftcore.config import UserError
from ftcore.inputs.adapter_format import MAGNITUDE  # DoRA's leaf

# PEFT format (what ftcore writes)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# a tensor's layer, linear and leaf (its key less ".weight"), e.g.
# base_model.model.model.layers.3.mlp.down_proj.lora_A: A is (r, in), B (out, r), DoRA's magnitude
# (out,) (PEFT saves it without ".weight")
TENSOR_KEY = re.compile(
    r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(lora_A|lora_B|lora_magnitude_vector)$"
)


def leaf_key(key: str) -> str:
    """A PEFT file's key without its ".weight" (lora_A / lora_B carry one, the magnitude not)."""
    return key.removesuffix(".weight")


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PEFT LoRA / DoRA adapter folder -> (its config, its tensors as numpy); one-line errors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not adapter_dir.is_dir():
        raise UserError(f"adapter folder not found: {adapter_dir}")
    missing = [n for n in ADAPTER_FILES if not (adapter_dir / n).is_file()]
    if missing:
        raise UserError(f"{adapter_dir}: not a PEFT adapter folder (no {', '.join(missing)})")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (ValueError, UnicodeDecodeError, SafetensorError) as e:
        raise UserError(f"{adapter_dir}: unreadable adapter ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise UserError(
            f"{adapter_dir}: not a LoRA adapter (peft_type "
            f"{config.get('peft_type') if isinstance(config, dict) else None!r})"
        )
    if config.get("use_rslora"):  # another scale than alpha / r
        raise UserError(f"{adapter_dir}: rsLoRA adapters are not supported")
    return config, tensors


def check_adapter(
    config: dict[str, Any], tensors: dict[str, Any], arch: dict[str, Any], adapter_dir: Path,
    model_dir: Path,
) -> None:
    """Refuse an adapter that would decode garbage or silently act as the base model: non-finite
    or exploded weights (ftcore.run.training_health.EXPLODED), an unusable scale, a LoRA tensor
    that does not match the model (a layer it lacks, or another shape: an adapter of another
    model), or a target module of some layer without its lora_A / lora_B (and DoRA's magnitude)
    (a partial adapter): check_adapter_fits."""
    import numpy as np

    from ftcore.run.training_health import EXPLODED, largest_weight, nonfinite

    if bad := nonfinite(tensors):
        raise UserError(
            f"{adapter_dir}: {bad[0]} holds NaN or Inf ({len(bad)} tensor(s)); the adapter is "
            "broken"
        )
    name, biggest = largest_weight(tensors)
    if biggest > EXPLODED:  # a diverged fine-tune's: it would decode an empty answer
        raise UserError(
            f"{adapter_dir}: {name} holds |w| = {biggest:.3g} (> {EXPLODED:g}); the fine-tune "
            "that wrote it diverged"
        )
    alpha, rank = config.get("lora_alpha"), config.get("r")
    if not (
        isinstance(alpha, int | float)
        and isinstance(rank, int)
        and rank > 0
        and np.isfinite(alpha / rank)
        and abs(alpha / rank) < 1e6
    ):
        raise UserError(
            f"{adapter_dir}: lora_alpha {alpha!r} / r {rank!r} in adapter_config.json is not a "
            "usable scale"
        )
    check_adapter_fits(config, tensors, arch, adapter_dir, model_dir)


def check_adapter_fits(
    config: dict[str, Any], tensors: dict[str, Any], arch: dict[str, Any], adapter_dir: Path,
    model_dir: Path,
) -> None:
    """Each adapter tensor of a layer the model has, in the shape its linear and r give (else: an
    adapter of another model, named by the tensor, found vs expected shape), DoRA's magnitudes
    exactly when the config says use_dora, and every target module of every layer (else: a
    partial adapter, or a shallower model's when whole layers from some k on are absent)."""
    from ftcore.inputs.arch import module_path

    layers, other = arch["num_hidden_layers"], another_model(config)
    for key, w in sorted(tensors.items()):
        check_tensor(key, w, config, arch, adapter_dir, model_dir)
    dora = bool(config.get("use_dora"))
    if not dora and (held := [k for k in tensors if leaf_key(k).endswith(MAGNITUDE)]):
        raise UserError(
            f"{adapter_dir}: holds DoRA magnitudes ({held[0]}, ...) but its adapter_config.json "
            "says use_dora false; the folder's weights and config disagree"
        )
    leaves = ("lora_A", "lora_B", MAGNITUDE) if dora else ("lora_A", "lora_B")
    keys = {leaf_key(k) for k in tensors}
    targets = sorted(config.get("target_modules") or ())
    missing = [f"{module_path(i, t)}.{leaf}"
               for i in range(layers) for t in targets for leaf in leaves
               if not any(k.endswith(f"{module_path(i, t)}.{leaf}") for k in keys)]  # fmt: skip
    held_layers = {i for i in range(layers) if any(f"model.layers.{i}." in k for k in tensors)}
    # whole layers 0..k-1: a shallower model's
    if missing and held_layers and max(held_layers) + 1 == len(held_layers) < layers:
        raise UserError(
            f"{adapter_dir}: does not match {model_dir}: it holds LoRA tensors for "
            f"{len(held_layers)} layers, the model has {layers}; {other}"
        )
    if missing:
        raise UserError(
            f"{adapter_dir}: lacks {len(missing)} LoRA tensor(s) its config names, e.g. "
            f"{', '.join(missing[:3])}; a partial adapter would leave those layers as the base "
            "model"
        )


def another_model(config: dict[str, Any]) -> str:
    base = config.get("base_model_name_or_path")
    return f"an adapter of another model{f' ({base})' if base else ''}"


def check_tensor(key: str, w: Any, config: dict[str, Any], arch: dict[str, Any],
                 adapter_dir: Path, model_dir: Path) -> None:  # fmt: skip
    """One adapter tensor against the model: a layer it has, the shape its linear and r give
    (lora_A (r, in), lora_B (out, r), the magnitude (out,))."""
    from ftcore.inputs.arch import linear_shapes

    shapes, rank, other = linear_shapes(arch), config["r"], another_model(config)
    m = TENSOR_KEY.search(leaf_key(key))
    if not m or m[2] not in shapes:
        return
    if int(m[1]) >= arch["num_hidden_layers"]:
        raise UserError(
            f"{adapter_dir}: does not match {model_dir}: it holds {key} (layer {m[1]}), the "
            f"model has {arch['num_hidden_layers']} layers; {other}"
        )
    fan_in, fan_out = shapes[m[2]]
    want, r_at = {"lora_A": ((rank, fan_in), 0), "lora_B": ((fan_out, rank), 1),
                  MAGNITUDE: ((fan_out,), None)}[m[3]]  # fmt: skip
    if tuple(w.shape) == want:
        return
    # the folder disagrees with itself, whatever the model
    if r_at is not None and w.ndim == 2 and w.shape[r_at] != rank:
        raise UserError(
            f"{adapter_dir}: {key} is {tuple(w.shape)}, of rank {w.shape[r_at]}, but its "
            f"adapter_config.json says r {rank}; the folder's weights and config disagree"
        )
    raise UserError(
        f"{adapter_dir}: does not match {model_dir}: {key} is {tuple(w.shape)}, the model's "
        f"{m[2]} needs {want}; {other}"
    )
