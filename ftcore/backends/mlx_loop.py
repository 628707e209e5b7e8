"""`mlx` backend: ftcore's MLX Llama (`ftcore.mlx_llama`) + LoRALinear, trained step for step like
the torch backend (same loss, LR per step, AdamW with bias correction, clipping, eval, adapter).

No torch or transformers import: this process's RSS is MLX's alone.
Precision: fp32 converts every weight to fp32. bf16 converts the frozen base weights to bf16 and
keeps LoRA weights, gradients and AdamW state in fp32 (as the torch backend does).
On Linux CPU, MLX's own ops run on one thread per stream; only GEMMs go through BLAS, which the
runner preloads (OpenBLAS, ftcore.blas). So with T threads the training step splits each batch's
rows over T CPU streams with a 1-thread BLAS each (`plan_streams`), rather than one stream with a
T-thread BLAS: T threads in all either way, as torch gets.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map
from safetensors.numpy import save_file

from ftcore.backends.common import Progress, base_result, finish, probe_batch, save_probe_logits
from ftcore.blas import set_blas_threads
from ftcore.config import RunConfig, UserError
from ftcore.convert import (
    MANIFEST_FILE,
    cached_conversion,
    mlx_to_peft_adapter,
    save_mlx_lm_adapter,
)
from ftcore.data import IGNORE_INDEX, Batches
from ftcore.lora import initial_lora_state, state_fingerprint
from ftcore.measure import RunResult, current_rss_mb
from ftcore.mlx_jit import NOTE_ENV
from ftcore.mlx_llama import (
    Model,
    apply_lora,
    load_lora_state,
    load_model,
    lora_state,
    writes_exp_out,
)
from ftcore.models import cache_root, read_arch

# Compile the whole train step (forward, backward, clipping, AdamW) into one graph: element-wise
# chains (exp, sigmoid, ...) become fused JIT CPU kernels, built with AVX2/FMA by ftcore.mlx_jit.
# Measured on a 2-core EPYC (tiny preset, 20 steps): losses within 1e-6 of the uncompiled step
# (FMA rounding). The first run on a machine builds the kernels with g++ (cached): 10-20 s inside
# the first (warm-up) step, excluded from throughput.
COMPILE = True
# mx.eval lays the graph out breadth-first, at most MLX_BFS_MAX_WIDTH arrays wide (default 20), and
# holds back once 10 tasks are in flight. At 20 the step's two row streams were enqueued one after
# the other and ran in turn (86 tok/s, tinyllama-1.1b 4 layers, 2 cores); at 40, 100 and 1000 they
# overlap (163-167 tok/s, same peak memory). The runner sets it for `mlx` processes
# (runner.child_env).
BFS_WIDTH_ENV = "MLX_BFS_MAX_WIDTH"
BFS_WIDTH_PER_STREAM = 50
CONVERT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def pick_device(device: str) -> mx.Device:
    """mx.cpu, or mx.gpu when this MLX build has one (Metal on macOS, CUDA with mlx[cuda])."""
    if device == "cpu":
        return mx.cpu
    if mx.is_available(mx.gpu):
        return mx.gpu
    raise UserError(
        "--device gpu: this MLX build sees no GPU "
        "(needs Metal on macOS, or the mlx[cuda] build with an NVIDIA GPU)"
    )


def to_mx(batch: dict[str, np.ndarray]) -> dict[str, mx.array]:
    """int64 numpy (B, L) -> int32 mx arrays (token ids and -100 fit easily)."""
    return {k: mx.array(v.astype(np.int32)) for k, v in batch.items()}


def logsumexp(x: mx.array) -> mx.array:
    """logsumexp over the last axis. On the CPU written out (max shift, exp, sum) rather than
    mx.logsumexp, whose prebuilt CPU kernel runs exp on one thread without vector units: under
    mx.compile the exp here is fused into a JIT kernel (see ftcore.mlx_jit)."""
    if not writes_exp_out():
        return mx.logsumexp(x, axis=-1)
    shift = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return mx.log(mx.exp(x - shift).sum(axis=-1)) + shift[..., 0]


def loss_sum_count(model: Model, batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
    """Summed next-token cross-entropy over targets that are not IGNORE_INDEX, and their count.

    Same shift and normalisation as the torch backend: logits (fp32) at positions 0..L-2 against
    labels[:, 1:]; the last position predicts nothing, so its logits are not computed.
    """
    h = model.model(batch["input_ids"], batch["attention_mask"])[:, :-1]  # (B, L-1, hidden)
    logits = model.head(h).astype(mx.float32)  # (B, L-1, V); astype is a no-op in fp32
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    safe = mx.where(keep, targets, 0)  # a valid index for the gather; masked out below
    picked = mx.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    ce = logsumexp(logits) - picked  # (B, L-1)
    return mx.where(keep, ce, 0.0).sum(), keep.sum()


def loss_and_grads(
    model: Model, batch: dict[str, mx.array], streams: tuple[mx.Stream, ...]
) -> tuple[mx.array, dict]:
    """Mean loss over the batch's targets and its gradients w.r.t. the trainable parameters.

    The rows are split into len(streams) equal groups; each group's forward and backward runs on
    its own stream (a thread of its own on the CPU). Summed losses and gradients are divided by the
    whole batch's target count: one pass's numbers, up to float summation order.
    """
    n_rows = batch["input_ids"].shape[0]
    if n_rows % len(streams):
        raise ValueError(f"{n_rows} rows do not split evenly over {len(streams)} streams")
    rows = n_rows // len(streams)
    count = mx.maximum((batch["labels"][:, 1:] != IGNORE_INDEX).sum(), 1)
    sum_and_grad = nn.value_and_grad(model, lambda m, b: loss_sum_count(m, b)[0])
    totals, grads = [], []
    for i, stream in enumerate(streams):
        with mx.stream(stream):
            part = {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}
            total, g = sum_and_grad(model, part)
        totals.append(total)
        grads.append(g)
    return sum(totals) / count, tree_map(lambda *g: sum(g) / count, *grads)


def plan_streams(device: mx.Device, threads: int, batch_size: int) -> int:
    """How many CPU streams the step splits a batch's rows over: `threads` on the CPU when the rows
    divide evenly and mx.eval's width lets the streams overlap (BFS_WIDTH_ENV), else 1.

    Uneven groups would leave a thread idle while the bigger group finishes.
    """
    if device != mx.cpu or threads < 2 or batch_size % threads:
        return 1
    try:
        width = int(os.environ.get(BFS_WIDTH_ENV, "20"))
    except ValueError:
        return 1
    return threads if width >= BFS_WIDTH_PER_STREAM * threads else 1


@functools.cache
def cpu_streams(n: int) -> tuple[mx.Stream, ...]:
    """n CPU streams, made once per process (each new CPU stream starts a thread)."""
    if n == 1:
        return (mx.default_stream(mx.cpu),)
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


def evaluate(model: Model, batches: Batches) -> float | None:
    """Mean loss over all held-out target tokens (not a mean of per-batch means)."""
    if not batches.eval:
        return None
    model.eval()
    total, count = 0.0, 0
    for b in batches.eval:
        s, n = loss_sum_count(model, to_mx(b))
        total, count = total + s.item(), count + n.item()
    model.train()
    return total / max(count, 1)


def convert(cfg: RunConfig, model_dir: Path) -> Path:
    """The cached HF -> MLX conversion at the run's precision (made now if missing or stale)."""
    return cached_conversion(model_dir, cache_root() / "mlx", CONVERT_DTYPES[cfg.precision])


def load(cfg: RunConfig, model_dir: Path, result: RunResult) -> Model:
    """Cached HF -> MLX conversion at the run's precision, then the model with the shared adapters."""
    t0 = time.perf_counter()
    started_ns = time.time_ns()
    mlx_dir = convert(cfg, model_dir)
    result.extra["convert_time_s"] = time.perf_counter() - t0
    # A conversion made just now has a manifest newer than this call's start.
    hit = (mlx_dir / MANIFEST_FILE).stat().st_mtime_ns < started_ns
    result.extra["conversion_cache_hit"] = hit
    result.extra["conversion_dir"] = str(mlx_dir)
    if not hit:  # the conversion's arrays sat in this process: its peak RSS includes them
        result.extra["peak_rss_includes_conversion"] = True
    mx.clear_cache()  # freed conversion buffers must not count in the baseline RSS

    model, _ = load_model(mlx_dir)
    apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    init = initial_lora_state(read_arch(model_dir), cfg.lora_targets, cfg.lora_rank, cfg.seed)
    load_lora_state(model, {k: mx.array(v) for k, v in init.items()})
    mx.eval(model.parameters())
    result.load_time_s = time.perf_counter() - t0
    return model


def make_optimizer(cfg: RunConfig) -> optim.AdamW:
    """AdamW equal to torch's: MLX's defaults (weight_decay=0.01, bias_correction=False) are
    overridden explicitly. The LR is set per step from cfg.lr_at by the loop."""
    return optim.AdamW(
        learning_rate=cfg.lr_at(0),
        betas=[cfg.adam_beta1, cfg.adam_beta2],
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,  # decoupled p *= 1 - lr*wd before the update, as torch
        bias_correction=True,
    )


def blas_facts(result: RunResult, cfg: RunConfig) -> None:
    """Record the BLAS MLX really calls (from the probe env_info ran in this process) and threads."""
    probe = result.env.get("mlx_blas")  # ftcore.blas.mlx_blas_info(): dladdr + a timed GEMM
    result.extra["blas_probe"] = probe
    result.blas = f"{probe['name']} ({probe['path']})" if probe else "unknown (probe failed)"
    result.threads = cfg.threads or (probe or {}).get("threads") or os.cpu_count() or 1
    # Set by the runner (ftcore.mlx_jit.child_env); absent when this process was started by hand.
    result.extra["mlx_jit"] = os.environ.get(NOTE_ENV, "MLX default g++ flags (not set by ftcore)")
    warning = result.env.get("blas_warning")
    if warning:
        print(warning, file=sys.stderr, flush=True)
        result.extra.setdefault("warnings", []).append(warning)


def save_adapters(
    cfg: RunConfig, state: dict[str, mx.array], num_layers: int, model_dir: Path, out_dir: Path
) -> None:
    """PEFT format in out_dir/adapter (loads with PeftModel.from_pretrained), mlx-lm format in
    out_dir/adapter_mlx_lm. `state`: `lora_state` keys and PEFT layout."""
    peft_dir = out_dir / "adapter"
    peft_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        mlx_to_peft_adapter(state),
        str(peft_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    (peft_dir / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
    info = {
        "rank": cfg.lora_rank,
        "alpha": cfg.lora_alpha,
        "dropout": cfg.lora_dropout,
        "num_layers": num_layers,
    }
    save_mlx_lm_adapter(state, info, out_dir / "adapter_mlx_lm")


def train(cfg: RunConfig, model_dir: Path, batches: Batches, out_dir: Path) -> RunResult:
    device = pick_device(cfg.device)  # before anything slow: a bad --device fails at once
    mx.set_default_device(device)
    mx.random.seed(cfg.seed)  # LoRA dropout masks
    result = base_result("mlx", cfg, model_dir, batches, "mlx")
    blas_facts(result, cfg)

    model = load(cfg, model_dir, result)
    result.baseline_rss_mb = current_rss_mb()
    result.initial_adapter_fingerprint = state_fingerprint(
        {k: np.array(v) for k, v in lora_state(model).items()}
    )
    mx.reset_peak_memory()

    # One stream per thread, each with a 1-thread BLAS (where its threads can be set: otherwise
    # streams x BLAS threads would oversubscribe the cores).
    n_streams = plan_streams(device, result.threads, cfg.batch_size)
    if n_streams > 1 and not set_blas_threads(1):
        n_streams = 1
    streams = cpu_streams(n_streams) if device == mx.cpu else (mx.default_stream(device),)
    result.extra["cpu_streams"] = n_streams
    result.extra["threads_note"] = (
        f"each batch's rows split over {n_streams} MLX CPU streams, each one thread with a "
        "1-thread BLAS"
        if n_streams > 1
        else f"MLX CPU ops on one thread; BLAS GEMMs on {result.threads}"
    )

    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())

    def step_fn(batch: dict[str, mx.array]) -> mx.array:
        loss, grads = loss_and_grads(model, batch, streams)
        if cfg.max_grad_norm is not None:
            grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        opt.update(model, grads)
        return loss

    # The LR lives in opt.state, so setting it per step feeds the compiled graph a new input.
    state = [model.state, opt.state, mx.random.state]
    step = mx.compile(step_fn, inputs=state, outputs=state) if COMPILE else step_fn

    model.train()
    progress = Progress("mlx", cfg.steps)
    step_times: list[float] = []
    step_cpu_times: list[float] = []  # CPU seconds of all this process's threads
    for i in range(cfg.steps):
        batch = to_mx(batches.step(i))
        t, c = time.perf_counter(), time.process_time()
        opt.learning_rate = cfg.lr_at(i)
        loss = step(batch)
        mx.eval(loss, state)  # MLX is lazy: the step's work happens here
        loss_value = loss.item()
        step_times.append(time.perf_counter() - t)
        step_cpu_times.append(time.process_time() - c)
        result.losses.append(loss_value)
        if cfg.eval_every and (i + 1) % cfg.eval_every == 0 and i + 1 < cfg.steps:
            result.eval_losses.append([i + 1, evaluate(model, batches)])
        timed = step_times[cfg.timing_warmup_steps :]
        progress.update(
            i,
            loss_value,
            batches.stats["tokens_per_step"] * len(timed) / sum(timed) if timed else None,
        )

    if n_streams > 1:
        set_blas_threads(result.threads)  # eval and the GEMM probe in finish() run on one stream
    timed = slice(cfg.timing_warmup_steps, None)
    if sum(step_times[timed]) > 0:  # threads kept busy in timed steps: do the streams overlap?
        result.extra["cpu_busy_threads"] = sum(step_cpu_times[timed]) / sum(step_times[timed])

    result.eval_loss = evaluate(model, batches)
    if result.eval_loss is not None:
        result.eval_losses.append([cfg.steps, result.eval_loss])
    result.framework_peak_mb = mx.get_peak_memory() / 2**20
    result.extra["framework_peak_note"] = (
        "mx.get_peak_memory() since after load: MLX array buffers in use at the peak of training + "
        "eval (weights, activations, grads, optimizer state); excludes the allocator cache and "
        "non-MLX memory"
    )
    save_adapters(cfg, lora_state(model), len(model.model.layers), model_dir, out_dir)
    model.eval()
    probe = to_mx(probe_batch(batches))
    save_probe_logits(
        np.array(model(probe["input_ids"], probe["attention_mask"]).astype(mx.float32)), out_dir
    )
    result.extra["device"] = device.name
    result.extra["compiled"] = COMPILE
    result.extra["precision_mode"] = (
        "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + AdamW"
    )
    return finish(result, cfg, batches, step_times, "mlx")
