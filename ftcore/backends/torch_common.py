"""The start and end shared by the `torch` and `hf-trainer` recipes: threads, seed, the timed
model load, eval, the adapter in PEFT format and probe logits."""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.result_fields import (
    probe_batch,
    record_ranks,
    save_probe_logits,
    start_result,
)
from ftcore.backends.run_context import BackendRun
from ftcore.files import atomic_path, write_json_atomic
from ftcore.inputs.adapter_format import save_mlx_lm_adapter
from ftcore.inputs.arch import fine_tune_of, normalise_config
from ftcore.inputs.batches import Batches
from ftcore.inputs.lora_init import state_fingerprint
from ftcore.inputs.records import write_prompt_format
from ftcore.inputs.tokenizer import copy_tokenizer
from ftcore.measure.rss import current_rss_mb
from ftcore.process.ranks import rank_threads
from ftcore.torch.generate import greedy
from ftcore.torch.lora import lora_state, trainable_state
from ftcore.torch.loss import evaluate, to_torch
from ftcore.torch.model import load_training_model
from ftcore.torch.runtime import pick_device, sync


@torch.no_grad()
def probe_logits(model, batches: Batches, device: torch.device) -> np.ndarray:
    model.eval()
    b = to_torch(probe_batch(batches), device)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    model.train()
    return logits.float().cpu().numpy()


def start(run: BackendRun):
    """Shared by `torch` and `hf-trainer`: threads, seed, device, the timed model load and the
    RSS after it; sets run.result. Returns (model, device)."""
    cfg = run.cfg
    threads = rank_threads(cfg) if run.ranks else cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # LoRA dropout masks
    device = pick_device(cfg.device)
    result = start_result(run)
    result.threads = threads
    result.blas = result.env.get("torch_blas", "")
    result.device = str(device)
    result.extra["precision_mode"] = (
        "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + AdamW"
    )

    t0 = time.perf_counter()
    model = load_training_model(cfg, run.model_dir, device)
    sync(device)
    result.load_time_s = time.perf_counter() - t0
    result.baseline_rss_mb = current_rss_mb()
    trained = trainable_state(model)  # what the optimizer will update, as lora_state keys
    result.initial_adapter_fingerprint = state_fingerprint(trained, cfg.fine_tune == "full")
    result.fine_tune = fine_tune_of(list(trained))
    result.trainable_params = sum(p.numel() for p in trained.values())
    # transformers' own flag: whether its layers really recompute in the backward pass
    result.extra["grad_checkpoint_active"] = bool(
        getattr(model, "is_gradient_checkpointing", False)
    )
    result.threads = torch.get_num_threads()  # what torch reports, not what was asked for
    record_ranks(run)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model, device


def eval_schedule(run: BackendRun, model, device: torch.device) -> EvalSchedule:
    """Eval loss and greedy exact-match accuracy of this torch model, before, during and after."""
    return EvalSchedule(run, lambda: evaluate(model, run.batches, device),
                        lambda prompt, n, eos: greedy(model, prompt, n, eos))  # fmt: skip


def save_torch(run: BackendRun, model, device: torch.device) -> None:
    """Shared end, after the final eval: CUDA peak, what was trained (the adapter in PEFT format
    under adapter/ and in mlx-lm's under adapter_mlx_lm/; a full fine-tune's checkpoint under
    model/), probe logits."""
    if device.type == "cuda":
        run.result.framework_peak_mb = torch.cuda.max_memory_allocated() / 2**20
    full = run.cfg.fine_tune == "full"
    with atomic_path(run.out_dir / ("model" if full else "adapter")) as out:  # whole, or not at all
        # a full fine-tune: config.json + model.safetensors (+ the tokenizer, to load alone);
        # LoRA / DoRA: adapter_config.json + adapter_model.safetensors
        model.save_pretrained(str(out))
        if full:
            copy_tokenizer(run.model_dir, out)
            # rope_theta at the top level too: mlx-lm reads it there only (transformers 5 nests it)
            config = json.loads((out / "config.json").read_text())
            write_json_atomic(out / "config.json", normalise_config(config))
        write_prompt_format(out, run.cfg.prompt_format)  # for `ftcore generate`
    if not full:  # the same adapter in mlx-lm's format, as the MLX backends write it
        cfg = run.cfg
        info = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                "num_layers": model.config.num_hidden_layers, "fine_tune_type": cfg.fine_tune}
        save_mlx_lm_adapter(lora_state(model), info, run.out_dir / "adapter_mlx_lm")
    save_probe_logits(probe_logits(model, run.batches, device), run.out_dir)
