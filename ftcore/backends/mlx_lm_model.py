"""The `mlx-lm` backend's model: mlx-lm's own loader and LoRA / DoRA layers (or, for a full
fine-tune, its layers unfrozen, as its lora.py does), set to the shared initial state, its
trainable tensors under `lora_state` keys in PEFT layout (mlx-lm stores the transposes), and what
the run saves of it (`save`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ftcore.backends.result_fields import probe_batch, save_probe_logits
from ftcore.backends.run_context import BackendRun
from ftcore.config import RunConfig, UserError
from ftcore.inputs.arch import block_of, read_arch
from ftcore.inputs.lora_init import dora_magnitudes, initial_lora_state
from ftcore.mlx.adapters import save_adapters, save_checkpoint
from ftcore.result import RunResult

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16}


def import_mlx_lm():
    try:
        from mlx_lm.tuner import trainer, utils
        from mlx_lm.utils import load_model
    except ImportError as e:
        raise UserError("mlx-lm is not installed (pip install 'ftcore[mlx-lm]')") from e
    return trainer, utils, load_model


def mlx_lm_key(target: str) -> str:
    """mlx-lm's per-layer LoRA key for a target: q_proj -> self_attn.q_proj."""
    return f"{block_of(target)}.{target}"


def mlx_lm_weight(key: str, value: np.ndarray) -> tuple[str, mx.array]:
    """A `lora_state` entry as mlx-lm's (name, array): ...q_proj.lora_A (r, in) -> ...q_proj.lora_a
    (in, r), lora_B likewise, lora_magnitude_vector -> m."""
    module, leaf = key.rsplit(".", 1)
    if leaf == "lora_magnitude_vector":
        return f"{module}.m", mx.array(value)
    return f"{module}.{leaf.lower()}", mx.array(np.ascontiguousarray(value.T))


# mlx-lm's adapter leaves -> lora_state's (its lora_a, lora_b are the transposes of PEFT's)
LEAVES = {"lora_a": "lora_A", "lora_b": "lora_B", "m": "lora_magnitude_vector"}


def peft_layout(model) -> dict[str, mx.array]:
    """mlx-lm's trainable tensors as `lora_state` keys in PEFT layout: lora_a (in, r) -> lora_A
    (r, in), lora_b likewise, DoRA's m -> lora_magnitude_vector; a full fine-tune's weights keep
    their names (mlx-lm's Llama uses Hugging Face's)."""
    out = {}
    for key, value in tree_flatten(model.trainable_parameters()):
        module, leaf = key.rsplit(".", 1)
        if leaf not in LEAVES:
            out[key] = value
        else:
            out[f"{module}.{LEAVES[leaf]}"] = value if leaf == "m" else value.T
    return out


def load(cfg: RunConfig, model_dir: Path, result: RunResult, utils, load_model):
    """mlx-lm's loader on the HF folder, cast to the run's precision, LoRA set to the shared
    init."""
    arch = read_arch(model_dir)
    t0 = time.perf_counter()
    # mlx-lm's ModelArgs defaults tie_word_embeddings=True (its sanitize then drops lm_head), and
    # its llama reads a top-level rope_theta only; pass both as HF means them.
    overrides = {
        "tie_word_embeddings": bool(arch.get("tie_word_embeddings", False)),
        "rope_theta": arch["rope_theta"],
    }
    model, _ = load_model(Path(model_dir), model_config=overrides)
    if overrides["tie_word_embeddings"] == hasattr(model, "lm_head"):
        raise RuntimeError("mlx-lm's model does not match the checkpoint's lm_head tying")
    model.set_dtype(DTYPES[cfg.precision])  # every float weight; adapters are added in fp32 below
    model.freeze()
    if cfg.fine_tune == "full":  # its lora.py: every layer unfrozen, nothing else
        for layer in model.layers:
            layer.unfreeze()
    else:
        add_adapters(model, cfg, arch, utils)
        result.extra["mlx_lm_lora_parameters"] = lora_parameters(cfg)
    mx.eval(model.parameters())
    result.load_time_s = time.perf_counter() - t0
    return model


def lora_parameters(cfg: RunConfig) -> dict:
    """mlx-lm's lora_parameters for the run (its adapter_config.json's)."""
    return {"rank": cfg.lora_rank, "scale": cfg.lora_scale, "dropout": cfg.lora_dropout,
            "keys": [mlx_lm_key(t) for t in cfg.lora_targets]}  # fmt: skip


def add_adapters(model, cfg: RunConfig, arch: dict, utils) -> None:
    """mlx-lm's LoRA (DoRA: use_dora) layers on every layer, set to the shared initial adapters
    (and DoRA's magnitudes from the base weights, as the other backends)."""
    init = initial_lora_state(arch, cfg.lora_targets, cfg.lora_rank, cfg.seed)
    if cfg.fine_tune == "dora":
        base = {k.removesuffix(".weight"): v for k, v in tree_flatten(model.parameters())
                if k.removesuffix(".weight").rsplit(".", 1)[-1] in cfg.lora_targets
                and k.endswith(".weight")}  # fmt: skip
        init |= dora_magnitudes(base, init, cfg.lora_scale)
    utils.linear_to_lora_layers(model, len(model.layers), lora_parameters(cfg),
                                use_dora=cfg.fine_tune == "dora")  # fmt: skip
    weights = [mlx_lm_weight(k, v) for k, v in init.items()]
    model.load_weights(weights, strict=False)
    if {k for k, _ in tree_flatten(model.trainable_parameters())} != {k for k, _ in weights}:
        raise RuntimeError("mlx-lm's trainable adapters do not match the initial LoRA state")


def save(model, run: BackendRun) -> None:
    """What was trained (adapter/ and adapter_mlx_lm/; a full fine-tune's checkpoint under model/)
    and the probe logits, as the other backends save them."""
    cfg, out_dir = run.cfg, run.out_dir
    if cfg.fine_tune == "full":
        save_checkpoint(model, run.model_dir, out_dir / "model", cfg.prompt_format)
        # the trainer's own save of the trained layers (no adapter_config.json, so no loader reads
        # it): model/ holds them whole
        shutil.rmtree(out_dir / "adapter_mlx_lm", ignore_errors=True)
    else:
        save_adapters(cfg, peft_layout(model), len(model.layers), run.model_dir, out_dir)
    model.eval()
    # mlx-lm's forward takes no padding mask: causal, so the probe row's positions before its
    # first pad (the whole probe window on any templated record) are those the others compute
    logits = model(mx.array(probe_batch(run.batches)["input_ids"]))
    save_probe_logits(np.array(logits.astype(mx.float32)), out_dir)
