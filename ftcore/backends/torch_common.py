"""The start and end shared by the `torch` and `hf-trainer` backends: threads, seed, the timed
model load, eval, the adapter in PEFT format, probe logits and the throughput figures."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ftcore.backends.step_clock import (
    Quality,
    base_result,
    finish,
    probe_batch,
    record_ranks,
    save_probe_logits,
)
from ftcore.config import RunConfig
from ftcore.inputs.batches import Batches
from ftcore.inputs.lora_init import state_fingerprint
from ftcore.inputs.records import write_prompt_format
from ftcore.measure.rss import current_rss_mb
from ftcore.result import RunResult
from ftcore.run.ranks import RankInfo, rank_threads
from ftcore.torch.generate import greedy
from ftcore.torch.lora import get_lora_state
from ftcore.torch.loss import evaluate, to_torch
from ftcore.torch.model import load_peft_model, pick_device, sync


@torch.no_grad()
def probe_logits(model, batches: Batches, device: torch.device) -> np.ndarray:
    model.eval()
    b = to_torch(probe_batch(batches), device)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    model.train()
    return logits.float().cpu().numpy()


def start(backend: str, cfg: RunConfig, model_dir: Path, batches: Batches,
          ranks: RankInfo | None = None):
    """Shared by `torch` and `hf-trainer`: threads, seed, device, the timed model load and the
    RSS after it. Returns (model, device, result)."""
    threads = rank_threads(cfg) if ranks else cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # LoRA dropout masks
    device = pick_device(cfg.device)
    result = base_result(backend, cfg, model_dir, batches, "torch")
    result.threads = threads
    result.blas = result.env.get("torch_blas", "")
    result.device = str(device)
    result.extra["precision_mode"] = (
        "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + AdamW"
    )

    t0 = time.perf_counter()
    model = load_peft_model(cfg, model_dir, device)
    sync(device)
    result.load_time_s = time.perf_counter() - t0
    result.baseline_rss_mb = current_rss_mb()
    result.initial_adapter_fingerprint = state_fingerprint(get_lora_state(model))
    result.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # transformers' own flag: whether its layers really recompute in the backward pass
    result.extra["grad_checkpoint_active"] = bool(getattr(model, "is_gradient_checkpointing", False))
    result.threads = torch.get_num_threads()  # what torch reports, not what was asked for
    record_ranks(result, ranks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model, device, result


def quality(model, device: torch.device, cfg: RunConfig, batches: Batches, result: RunResult) -> Quality:
    """Eval loss and greedy exact-match accuracy of this torch model, before, during and after."""
    return Quality(cfg, batches, result, lambda: evaluate(model, batches, device),
                   lambda prompt, n, eos: greedy(model, prompt, n, eos))  # fmt: skip


def wrap_up(
    model,
    device: torch.device,
    result: RunResult,
    cfg: RunConfig,
    batches: Batches,
    out_dir: Path,
    step_times: list[float],
    measured: Quality,
) -> RunResult:
    """Shared end: eval loss and accuracy after training, CUDA peak, the adapter in PEFT format,
    probe logits, throughput."""
    measured.after(step_times)
    if device.type == "cuda":
        result.framework_peak_mb = torch.cuda.max_memory_allocated() / 2**20
    model.save_pretrained(str(out_dir / "adapter"))  # adapter_config.json + adapter_model.safetensors
    write_prompt_format(out_dir / "adapter", cfg.prompt_format)  # for `ftcore generate`
    save_probe_logits(probe_logits(model, batches, device), out_dir)
    return finish(result, cfg, batches, step_times, "torch")
