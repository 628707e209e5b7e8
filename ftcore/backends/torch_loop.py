"""`torch` backend: transformers LlamaForCausalLM + PEFT LoRA, trained by a plain loop.

Precision: fp32 loads everything in fp32. bf16 loads the frozen base weights in bf16 (no autocast)
and keeps the LoRA weights, gradients and AdamW state in fp32 (PEFT's autocast_adapter_dtype).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ftcore.backends.common import Progress, base_result, finish, probe_batch, save_probe_logits
from ftcore.config import RunConfig, UserError
from ftcore.data import IGNORE_INDEX, Batches
from ftcore.lora import initial_lora_state, state_fingerprint
from ftcore.measure import RunResult, current_rss_mb
from ftcore.models import read_arch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def pick_device(device: str) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    raise UserError("--device gpu: torch sees no CUDA or MPS device on this machine")


def sync(device: torch.device) -> None:
    """Wait for queued kernels so a wall-clock reading covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


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
    lora_cfg = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora_cfg)
    set_lora_state(
        model, initial_lora_state(read_arch(model_dir), cfg.lora_targets, cfg.lora_rank, cfg.seed)
    )
    return model


def set_lora_state(model, state: dict[str, np.ndarray]) -> None:
    """Copy PEFT-layout arrays keyed `<module path>.lora_A|lora_B` into a PeftModel."""
    base = model.base_model.model
    with torch.no_grad():
        for key, value in state.items():
            path, which = key.rsplit(".", 1)
            layer = getattr(base.get_submodule(path), which)["default"]
            layer.weight.copy_(torch.from_numpy(value))


def get_lora_state(model) -> dict[str, np.ndarray]:
    base = model.base_model.model
    state = {}
    for name, module in base.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            state[f"{name}.lora_A"] = module.lora_A["default"].weight.detach().float().cpu().numpy()
            state[f"{name}.lora_B"] = module.lora_B["default"].weight.detach().float().cpu().numpy()
    return state


def loss_sum_count(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over targets that are not IGNORE_INDEX, and their count.

    Position t predicts token t+1: logits at positions 0..L-2 against labels[:, 1:]. The last
    position predicts nothing, so its logits are not computed (`logits_to_keep`, as the MLX backend
    does). Every backend uses this same shift and normalisation (sum / count).
    """
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)  # 0..L-2
    logits = model(
        input_ids=ids, attention_mask=batch["attention_mask"], logits_to_keep=positions
    ).logits  # (B, L-1, V)
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (targets != IGNORE_INDEX).sum()


def to_torch(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches: Batches, device: torch.device) -> float | None:
    """Mean loss over all held-out target tokens (not a mean of per-batch means)."""
    if not batches.eval:
        return None
    model.eval()
    total, count = 0.0, 0
    for b in batches.eval:
        s, n = loss_sum_count(model, to_torch(b, device))
        total, count = total + s.item(), count + int(n.item())
    model.train()
    return total / max(count, 1)


def make_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW as every torch-based backend uses it (bias correction is built in); the LR is set
    per step from cfg.lr_at by the loop or scheduler."""
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


@torch.no_grad()
def probe_logits(model, batches: Batches, device: torch.device) -> np.ndarray:
    model.eval()
    b = to_torch(probe_batch(batches), device)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    model.train()
    return logits.float().cpu().numpy()


def start(backend: str, cfg: RunConfig, model_dir: Path, batches: Batches):
    """Shared by `torch` and `hf-trainer`: threads, seed, device, the timed model load and the
    RSS after it. Returns (model, device, result)."""
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)  # LoRA dropout masks
    device = pick_device(cfg.device)
    result = base_result(backend, cfg, model_dir, batches, "torch")
    result.threads = threads
    result.blas = result.env.get("torch_blas", "")
    result.extra["device"] = str(device)
    result.extra["precision_mode"] = (
        "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + AdamW"
    )

    t0 = time.perf_counter()
    model = load_peft_model(cfg, model_dir, device)
    sync(device)
    result.load_time_s = time.perf_counter() - t0
    result.baseline_rss_mb = current_rss_mb()
    result.initial_adapter_fingerprint = state_fingerprint(get_lora_state(model))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model, device, result


def wrap_up(
    model,
    device: torch.device,
    result: RunResult,
    cfg: RunConfig,
    batches: Batches,
    out_dir: Path,
    step_times: list[float],
) -> RunResult:
    """Shared end: eval loss, CUDA peak, the adapter in PEFT format, probe logits, throughput."""
    result.eval_loss = evaluate(model, batches, device)
    if result.eval_loss is not None:
        result.eval_losses.append([cfg.steps, result.eval_loss])
    if device.type == "cuda":
        result.framework_peak_mb = torch.cuda.max_memory_allocated() / 2**20
    model.save_pretrained(
        str(out_dir / "adapter")
    )  # adapter_config.json + adapter_model.safetensors
    save_probe_logits(probe_logits(model, batches, device), out_dir)
    return finish(result, cfg, batches, step_times, "torch")


def train(cfg: RunConfig, model_dir: Path, batches: Batches, out_dir: Path) -> RunResult:
    model, device, result = start("torch", cfg, model_dir, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    model.train()
    progress = Progress("torch", cfg.steps)
    step_times: list[float] = []
    for step in range(cfg.steps):
        batch = to_torch(batches.step(step), device)
        t = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss_sum, count = loss_sum_count(model, batch)
        loss = loss_sum / count.clamp(min=1)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()  # sync point: the step's work is done after this
        step_times.append(time.perf_counter() - t)
        result.losses.append(loss_value)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            result.eval_losses.append([step + 1, evaluate(model, batches, device)])
        timed = step_times[cfg.timing_warmup_steps :]
        progress.update(
            step,
            loss_value,
            batches.stats["tokens_per_step"] * len(timed) / sum(timed) if timed else None,
        )

    return wrap_up(model, device, result, cfg, batches, out_dir, step_times)
