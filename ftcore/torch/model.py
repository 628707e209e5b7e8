"""transformers LlamaForCausalLM + PEFT LoRA, loaded for training, on the run's device.

Precision: fp32 loads everything in fp32. bf16 loads the frozen base weights in bf16 (no autocast)
and keeps the LoRA weights, gradients and AdamW state in fp32 (PEFT's autocast_adapter_dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.inputs.lora_init import initial_lora_state
from ftcore.torch.lora import load_lora_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_peft_model(cfg: RunConfig, model_dir: Path, device: torch.device):
    """Base model + LoRA adapters set to the shared initial weights; only LoRA trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(
        str(model_dir),
        dtype=DTYPES[cfg.precision],
        local_files_only=True,
        use_safetensors=not cfg.allow_pickle,
    ).to(device)
    with torch.no_grad():  # weights may be mmapped lazily: page them in now, so load time and
        for p in model.parameters():  # RSS after load cover them (as mx.eval does for MLX)
            p.sum()
    # each decoder layer recomputed in the backward pass (training mode only);
    if cfg.grad_checkpoint:
        # non-reentrant: gradients reach the LoRA weights without the inputs requiring grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_cfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_cfg)
    load_lora_state(
        model, initial_lora_state(read_arch(model_dir), cfg.lora_targets, cfg.lora_rank, cfg.seed)
    )
    return model
