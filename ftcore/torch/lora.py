"""LoRA state of a PeftModel as numpy arrays keyed `<module path>.lora_A|lora_B` (PEFT layout:
lora_A (rank, in), lora_B (out, rank)), the keys ftcore.inputs.lora_init and the MLX side use."""

from __future__ import annotations

import re

import numpy as np
import torch

# PEFT's parameter name -> its lora_state key: base_model.model.<module>.lora_A.default.weight
# -> <module>.lora_A; any other parameter keeps its module path.
_PEFT_PARAM = re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$")


def load_lora_state(model, state: dict[str, np.ndarray]) -> None:
    """Copy PEFT-layout arrays keyed `<module path>.lora_A|lora_B` into a PeftModel."""
    base = model.base_model.model
    with torch.no_grad():
        for key, value in state.items():
            path, which = key.rsplit(".", 1)
            layer = getattr(base.get_submodule(path), which)["default"]
            layer.weight.copy_(torch.from_numpy(value))


def lora_state(model) -> dict[str, np.ndarray]:
    base = model.base_model.model
    state = {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            state[f"{name}.lora_A"] = module.lora_A["default"].weight.detach().float().cpu().numpy()
            state[f"{name}.lora_B"] = module.lora_B["default"].weight.detach().float().cpu().numpy()
    return state


def lora_key(param_name: str) -> str:
    """A PeftModel parameter's name as a `lora_state` key (the MLX side's name for it)."""
    return _PEFT_PARAM.sub(r".\1", param_name.removeprefix("base_model.model."))
