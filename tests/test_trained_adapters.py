"""The adapters the backends train, through the files users move around (integration: the
backends train in child processes, parity_utils.backend_runs, shared with test_parity_training.py).

- PEFT -> MLX: the adapter the torch backend trained (out_dir/adapter) read into ftcore's MLX model
  reproduces the PeftModel's logits.
- MLX -> PEFT: the adapter the mlx backend trained, exported to out_dir/adapter, loads with
  `PeftModel.from_pretrained` and reproduces the MLX model's logits, where the MLX side holds the
  weights from the backend's *other* export (out_dir/adapter_mlx_lm, mlx-lm layout, transposed),
  so the two files are checked against each other, not one against itself.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import max_err_real, mlx_logits, torch_logits
from parity_utils import backend_runs, peft_dir_into_mlx

from ftcore.mlx.convert import convert_hf_to_mlx
from ftcore.mlx.lora import apply_lora, load_lora_state
from ftcore.mlx.model import load_model
from ftcore.tolerances import FP32_LOGITS_ATOL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _peft_logits(pm, batch) -> np.ndarray:
    return torch_logits(pm, batch["input_ids"], batch["attention_mask"])


def _mlx_logits(model, batch) -> np.ndarray:
    return mlx_logits(model, batch["input_ids"], batch["attention_mask"])


# ----------------------------------------------------------------------------- trained adapters


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    r = backend_runs(("fp32",), tmp_path_factory.getbasetemp() / "parity-runs")["fp32"]
    for b in ("torch", "mlx"):
        assert r[b].status == "ok", f"{b}: {r[b].error}"
    return r


@pytest.fixture(scope="module")
def probe_batches(fp32_runs):
    """The run's held-out batches (real data, right padding) and a left-padded random batch."""
    batches = [dict(b) for b in fp32_runs["prep"].batches.eval]
    vocab = json.loads((fp32_runs["prep"].model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(5)
    ids = rng.integers(0, vocab, (3, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :20] = 0
    batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@pytest.fixture(scope="module")
def base_models(fp32_runs, tmp_path_factory):
    from transformers import LlamaForCausalLM

    model_dir = fp32_runs["prep"].model_dir
    mlx_dir = convert_hf_to_mlx(model_dir, tmp_path_factory.mktemp("interop") / "mlx")
    return (
        model_dir,
        mlx_dir,
        lambda: LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval(),
    )


def test_torch_trained_adapter_loads_into_mlx(fp32_runs, probe_batches, base_models):
    from peft import PeftModel

    model_dir, mlx_dir, hf = base_models
    adapter_dir = fp32_runs["dirs"]["torch"] / "adapter"
    pm = PeftModel.from_pretrained(hf(), str(adapter_dir)).eval()
    model = peft_dir_into_mlx(mlx_dir, adapter_dir)
    base, _ = load_model(mlx_dir)
    for batch in probe_batches:
        ref, got = _peft_logits(pm, batch), _mlx_logits(model, batch)
        mask = batch["attention_mask"]
        assert (
            max_err_real(ref, _mlx_logits(base, batch), mask) > 0.1
        )  # the adapter acts (measured ~2)
        assert max_err_real(ref, got, mask) < FP32_LOGITS_ATOL


def test_mlx_trained_adapter_loads_into_peft(fp32_runs, probe_batches, base_models):
    from peft import PeftModel

    cfg = fp32_runs["cfg"]
    model_dir, mlx_dir, hf = base_models
    out = fp32_runs["dirs"]["mlx"]
    pm = PeftModel.from_pretrained(hf(), str(out / "adapter")).eval()
    # What PEFT built from the exported config is what was trained.
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == cfg.lora_rank and layer.scaling["default"] == pytest.approx(
        cfg.lora_scale
    )
    assert (
        sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
        == fp32_runs["mlx"].trainable_params
    )

    # MLX side: the weights from the mlx-lm export (lora_a (in, r), lora_b (r, out)).
    lm = mx.load(str(out / "adapter_mlx_lm" / "adapters.safetensors"))
    lm_cfg = json.loads((out / "adapter_mlx_lm" / "adapter_config.json").read_text())[
        "lora_parameters"
    ]
    assert lm_cfg["scale"] == pytest.approx(cfg.lora_scale)
    model, _ = load_model(mlx_dir)
    apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
    load_lora_state(
        model,
        {
            k[: -len("lora_a")] + ("lora_A" if k.endswith("lora_a") else "lora_B"): v.T
            for k, v in lm.items()
        },
    )
    base, _ = load_model(mlx_dir)
    for batch in probe_batches:
        ref, got = _peft_logits(pm, batch), _mlx_logits(model, batch)
        mask = batch["attention_mask"]
        assert (
            max_err_real(got, _mlx_logits(base, batch), mask) > 0.1
        )  # the adapter acts (measured ~2)
        assert max_err_real(ref, got, mask) < FP32_LOGITS_ATOL
