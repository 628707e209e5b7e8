"""transformers LlamaForCausalLM, loaded for training on the run's device, as --fine-tune says:
`lora` / `dora`: PEFT adapters (LoraConfig, use_dora) set to the shared initial weights, only they
trainable; `full`: the plain model with every decoder layer's weights trainable (7 linears and 2
RMSNorms each) and the embeddings, final norm and lm_head frozen, as mlx-lm's full fine-tune.

Precision: fp32 loads everything in fp32. bf16 (LoRA only) loads the frozen base weights in bf16
(no autocast) and keeps the LoRA weights, gradients and AdamW state in fp32 (PEFT's
autocast_adapter_dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftcore.config import RunConfig
from ftcore.inputs.arch import module_path, read_arch
from ftcore.inputs.lora_init import dora_magnitudes, initial_lora_state

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_training_model(cfg: RunConfig, model_dir: Path, device: torch.device):
    """The model as --fine-tune trains it (module doc), with its trainable weights set."""
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
    if cfg.fine_tune == "full":
        model.requires_grad_(False)
        model.model.layers.requires_grad_(True)
        return model
    return with_adapters(model, cfg, read_arch(model_dir))


def with_adapters(model, cfg: RunConfig, arch: dict):
    """PEFT LoRA (DoRA for --fine-tune dora) on cfg.lora_targets, set to the shared initial
    adapters (and DoRA's initial magnitudes: ftcore.inputs.lora_init.dora_magnitudes)."""
    from peft import LoraConfig, get_peft_model

    from ftcore.torch.lora import load_lora_state

    lora_cfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=cfg.fine_tune == "dora",
    )
    state = initial_lora_state(arch, cfg.lora_targets, cfg.lora_rank, cfg.seed)
    if cfg.fine_tune == "dora":
        weights = {module_path(i, t): model.get_submodule(module_path(i, t)).weight.detach()
                   for i in range(arch["num_hidden_layers"]) for t in cfg.lora_targets}
        state |= dora_magnitudes(weights, state, cfg.lora_scale)
    model = get_peft_model(model, lora_cfg)
    load_lora_state(model, state)
    return model
