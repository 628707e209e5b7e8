"""Adapter interop through the files users move around.

- PEFT -> MLX: a PeftModel's `save_pretrained` folder (adapter_config.json + adapter_model.safetensors)
  read into ftcore's MLX model (rank / alpha / targets from PEFT's own config file, weights through
  ftcore.mlx.adapters.peft_to_mlx_adapter) reproduces the PeftModel's logits, for random configs
  and random adapters (hypothesis).
The adapters the backends train, moved between frameworks: tests/test_trained_adapters.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import make_hf_model, max_err_real, mlx_logits, torch_logits
from hypothesis import given, note
from parity_utils import (
    add_peft,
    lora_cfg_from_peft_dir,
    model_cases,
    peft_dir_into_mlx,
    save_and_convert,
)

from ftcore.tolerances import FP32_LOGITS_ATOL

pytestmark = pytest.mark.parity


def _peft_logits(pm, batch) -> np.ndarray:
    return torch_logits(pm, batch["input_ids"], batch["attention_mask"])


def _mlx_logits(model, batch) -> np.ndarray:
    return mlx_logits(model, batch["input_ids"], batch["attention_mask"])


@given(case=model_cases())
def test_saved_peft_adapter_loads_into_mlx(case):
    cfg, lora, batch, seed = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = make_hf_model(cfg, seed)
        _, mlx_dir = save_and_convert(hf, tmp)
        pm = add_peft(hf, lora["targets"], lora["rank"], lora["alpha"], lora["b_std"], seed + 1)
        pm.save_pretrained(tmp / "adapter")
        assert lora_cfg_from_peft_dir(tmp / "adapter") == (
            lora["targets"],
            lora["rank"],
            lora["alpha"],
        )
        model = peft_dir_into_mlx(mlx_dir, tmp / "adapter")
    ref, got = _peft_logits(pm, batch), _mlx_logits(model, batch)
    err = max_err_real(ref, got, batch["attention_mask"])
    note(f"max |logit| {np.abs(ref).max():.3g}, err {err:.3g}")
    assert err < FP32_LOGITS_ATOL
