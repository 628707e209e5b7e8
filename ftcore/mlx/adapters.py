"""Adapter files: PEFT <-> MLX adapter state, and the folders the MLX backends write after training
(PEFT format in adapter/, mlx-lm format in adapter_mlx_lm/).

PEFT keys: base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r), and DoRA's
base_model.model.<module>.lora_magnitude_vector (out,), the same layout as
`ftcore.mlx.lora.lora_state`; mlx-lm stores the transposes (lora_a (in, r), lora_b (r, out)) and
DoRA's magnitude as `m` (out,). A full fine-tune is saved as a whole Hugging Face checkpoint
(`save_checkpoint`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import safetensors.numpy
from mlx.utils import tree_flatten

from ftcore.config import RunConfig
from ftcore.files import atomic_path, json_bytes, write_atomic
from ftcore.inputs.adapter_format import (  # save_mlx_lm_adapter: re-exported
    MAGNITUDE,  # DoRA's leaf; no ".weight" in PEFT's files
    save_mlx_lm_adapter,  # noqa: F401
)
from ftcore.inputs.arch import normalise_config
from ftcore.inputs.records import write_prompt_format
from ftcore.inputs.tokenizer import copy_tokenizer
from ftcore.mlx.lora import LORA_LEAVES
from ftcore.mlx.weight_names import ConversionError, hf_to_mlx_key, mlx_to_hf_key

# PEFT: base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r); a state_dict()
# taken from the live model also carries the adapter name: lora_A.default.weight.
_PEFT_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?P<leaf>lora_A|lora_B)(?:\.[^.]+)?\.weight$"
    r"|^base_model\.model\.(?P<dmodule>.+)\.(?P<dleaf>lora_magnitude_vector)(?:\.[^.]+\.weight)?$"
)


def _module_path(module: str, to_mlx: bool) -> str:
    """Map a linear's module path through the weight table (`<module>.weight`)."""
    key = f"{module}.weight"
    mapped = hf_to_mlx_key(key) if to_mlx else mlx_to_hf_key(key)
    if mapped is None:
        raise ConversionError(f"{module} cannot carry an adapter")
    return mapped.removesuffix(".weight")


def peft_to_mlx_adapter(peft_state: Mapping[str, np.ndarray | mx.array]) -> dict[str, mx.array]:
    """PEFT adapter state (`get_peft_model_state_dict`, as numpy) -> `lora_state` keys, no
    transposes."""
    out: dict[str, mx.array] = {}
    for key, value in peft_state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ConversionError(f"not a PEFT LoRA key: {key!r}")
        module, leaf = (m["module"], m["leaf"]) if m["module"] else (m["dmodule"], m["dleaf"])
        name = f"{_module_path(module, to_mlx=True)}.{leaf}"
        if name in out:
            raise ConversionError(f"two PEFT tensors map to {name} (more than one adapter?)")
        out[name] = mx.array(value)
    return out


def mlx_to_peft_adapter(state: Mapping[str, mx.array]) -> dict[str, np.ndarray]:
    """`lora_state` -> PEFT `get_peft_model_state_dict` keys, as numpy (bf16 widened to fp32,
    exactly)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if leaf not in LORA_LEAVES:
            raise ConversionError(f"not an adapter key: {key!r}")
        if value.dtype == mx.bfloat16:
            value = value.astype(mx.float32)  # numpy has no bf16
        # C order: safetensors.numpy writes raw buffers, a transposed view would be scrambled
        suffix = "" if leaf == MAGNITUDE else ".weight"
        out[f"base_model.model.{_module_path(module, to_mlx=False)}.{leaf}{suffix}"] = (
            np.ascontiguousarray(np.array(value))
        )
    return out


def save_adapters(
    cfg: RunConfig, state: dict[str, mx.array], num_layers: int, model_dir: Path, out_dir: Path
) -> None:
    """PEFT format in out_dir/adapter (loads with PeftModel.from_pretrained), mlx-lm format in
    out_dir/adapter_mlx_lm. `state`: `lora_state` keys and PEFT layout."""
    with atomic_path(out_dir / "adapter") as peft_dir:  # the folder appears whole, or not at all
        peft_dir.mkdir()
        write_peft_adapter(cfg, state, model_dir, peft_dir)
    info = {
        "rank": cfg.lora_rank,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "num_layers": num_layers,
        "fine_tune_type": cfg.fine_tune,
    }
    save_mlx_lm_adapter(state, info, out_dir / "adapter_mlx_lm")


def write_peft_adapter(
    cfg: RunConfig, state: dict[str, mx.array], model_dir: Path, peft_dir: Path
) -> None:
    """The PEFT adapter's files (weights, adapter_config.json, prompt format) into peft_dir."""
    weights = safetensors.numpy.save(mlx_to_peft_adapter(state), metadata={"format": "pt"})
    write_atomic(peft_dir / "adapter_model.safetensors", weights)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": cfg.fine_tune == "dora",
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    write_atomic(peft_dir / "adapter_config.json", json_bytes(peft_config))
    write_prompt_format(peft_dir, cfg.prompt_format)  # for `ftcore generate`


def save_checkpoint(model: nn.Module, model_dir: Path, out_dir: Path, prompt_format: str) -> None:
    """A full fine-tune as a Hugging Face checkpoint folder, whole or not at all: model.safetensors
    (HF names, the trained dtype), the source's config.json and tokenizer, the prompt format. It
    loads in transformers, mlx-lm and `ftcore generate --model`."""
    weights = {mlx_to_hf_key(k): v for k, v in tree_flatten(model.parameters())}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        buf = io.BytesIO()  # written by Python, atomically: a full disk names the file
        mx.save_safetensors(buf, weights, metadata={"format": "pt"})  # transformers needs "pt"
        write_atomic(tmp / "model.safetensors", buf.getvalue())
        # rope_theta at the top level too: mlx-lm reads it there only (transformers 5 nests it)
        config = normalise_config(json.loads((Path(model_dir) / "config.json").read_text()))
        write_atomic(tmp / "config.json", json_bytes(config))
        copy_tokenizer(Path(model_dir), tmp)
        write_prompt_format(tmp, prompt_format)
