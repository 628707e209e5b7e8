"""LoRA / DoRA state of a PeftModel as numpy arrays keyed `<module path>.<leaf>` (PEFT layout:
lora_A (rank, in), lora_B (out, rank), DoRA's lora_magnitude_vector (out,)), the keys
ftcore.inputs.lora_init and the MLX side use; and any model's trainable state under the same keys
(a full fine-tune's: the decoder layers' own weights, `model.layers.0.self_attn.q_proj.weight`)."""

from __future__ import annotations

import re

import numpy as np
import torch

# PEFT's parameter name -> its lora_state key: base_model.model.<module>.lora_A.default.weight
# -> <module>.lora_A (lora_B, lora_magnitude_vector alike); any other parameter keeps its path.
_PEFT_PARAM = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.[^.]+\.weight$")


def _peft_tensor(module, leaf: str) -> torch.Tensor:
    """The live tensor of one lora_state leaf in a PEFT LoRA layer (adapter "default")."""
    if leaf == "lora_magnitude_vector":
        return module.lora_magnitude_vector["default"].weight
    return getattr(module, leaf)["default"].weight


def load_lora_state(model, state: dict[str, np.ndarray]) -> None:
    """Copy PEFT-layout arrays keyed `<module path>.<leaf>` into a PeftModel."""
    base = model.base_model.model
    with torch.no_grad():
        for key, value in state.items():
            path, leaf = key.rsplit(".", 1)
            _peft_tensor(base.get_submodule(path), leaf).copy_(torch.from_numpy(value))


def lora_state(model) -> dict[str, np.ndarray]:
    """The adapters of a PeftModel (with DoRA's magnitudes); {} for a model without adapters."""
    if not hasattr(model, "base_model"):
        return {}
    state = {}
    for name, module in model.base_model.model.named_modules():
        if "default" not in getattr(module, "lora_A", {}):
            continue
        dora = bool(getattr(module, "use_dora", {}).get("default", False))
        for leaf in ("lora_A", "lora_B", "lora_magnitude_vector")[: 3 if dora else 2]:
            state[f"{name}.{leaf}"] = _peft_tensor(module, leaf).detach().float().cpu().numpy()
    return state


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Every trainable tensor of the model (detached, not copied), keyed as `lora_state`."""
    return {lora_key(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def lora_key(param_name: str) -> str:
    """A model parameter's name as a `lora_state` key (the MLX side's name for it)."""
    return _PEFT_PARAM.sub(r".\1", param_name.removeprefix("base_model.model."))
