"""mlx-lm's adapter folder, written from numpy in either framework's process (the torch backends
write one beside PEFT's, as the MLX ones do): `adapters.safetensors` with mlx-lm's names and
layout (lora_a (in, r), lora_b (r, out): the transposes of PEFT's; DoRA's magnitude as `m` (out,))
and `adapter_config.json`. ConversionError: a state or folder that cannot be converted (the
converter's too: ftcore.mlx.weight_names re-exports it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from ftcore.files import json_bytes, write_atomic


class ConversionError(Exception):
    """A source or conversion folder that cannot be converted; the message is one line."""


MAGNITUDE = "lora_magnitude_vector"  # DoRA's leaf in lora_state keys

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(lora_A|lora_B|lora_magnitude_vector)$")


def save_mlx_lm_adapter(
    state: Mapping[str, Any], cfg_info: Mapping[str, Any], out_dir: str | Path
) -> Path:
    """Write an mlx-lm adapter folder (`mlx_lm.tuner.utils.load_adapters` reads it) from a
    `lora_state` (numpy, torch CPU or MLX fp32 arrays: either framework's process writes it).

    cfg_info: {"rank", "alpha", "dropout" (default 0), "num_layers" (the model's layer count),
    "fine_tune_type" ("lora" default, or "dora": the state holds magnitudes, saved as `m`)}.
    mlx-lm stores the transposes: lora_a (in, r), lora_b (r, out), under the same module paths,
    and adapts the last `num_layers` layers, each with the same `keys`.
    """
    out_dir = Path(out_dir)
    rank, alpha = int(cfg_info["rank"]), float(cfg_info["alpha"])
    arrays: dict[str, np.ndarray] = {}
    per_layer: dict[int, set[str]] = {}
    for key, value in state.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            raise ConversionError(f"not a per-layer adapter key: {key!r}")
        layer, module, leaf = int(m[1]), m[2], m[3]
        per_layer.setdefault(layer, set()).add(module)
        if leaf == MAGNITUDE:  # (out,), no transpose
            arrays[f"model.layers.{layer}.{module}.m"] = np.asarray(value, dtype=np.float32)
            continue
        r = value.shape[0] if leaf == "lora_A" else value.shape[1]
        if r != rank:
            raise ConversionError(f"{key}: rank {r} != configured rank {rank}")
        # C order: safetensors writes raw buffers, a transposed view would be scrambled
        arrays[f"model.layers.{layer}.{module}.{leaf.lower()}"] = np.ascontiguousarray(
            np.asarray(value, dtype=np.float32).T)
    total = int(cfg_info["num_layers"])
    layers = sorted(per_layer)
    if not layers or layers != list(range(total - len(layers), total)):
        raise ConversionError(
            f"mlx-lm adapts the last N layers; adapters sit on layers {layers} of {total}"
        )
    keys = per_layer[layers[0]]
    if any(per_layer[i] != keys for i in layers):
        raise ConversionError("mlx-lm needs the same adapted modules in every layer")
    out_dir.mkdir(parents=True, exist_ok=True)
    # written by Python, atomically: a full disk is an OSError naming the file
    write_atomic(out_dir / "adapters.safetensors", safetensors.numpy.save(arrays))
    config = {
        "fine_tune_type": cfg_info.get("fine_tune_type", "lora"),
        "num_layers": len(layers),
        "lora_parameters": {
            "rank": rank,
            "scale": alpha / rank,  # mlx-lm's literal multiplier
            "dropout": float(cfg_info.get("dropout", 0.0)),
            "keys": sorted(keys),
        },
    }
    write_atomic(out_dir / "adapter_config.json", json_bytes(config))
    return out_dir
