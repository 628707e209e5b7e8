"""`mlx` backend: ftcore's MLX Llama (`ftcore.mlx`) with LoRALinear, trained step for step like the
torch backend (same loss, LR per step, AdamW with bias correction, clipping, eval, adapter).

No torch or transformers import: this process's RSS is MLX's alone.
Precision: fp32 converts every weight to fp32. bf16 converts the frozen base weights to bf16 and
keeps LoRA weights, gradients and AdamW state in fp32 (as the torch backend does).
On the CPU the step splits each batch's rows over one stream per thread (ftcore.mlx.streams).
Under mlx.launch (ftcore.process.ranks) each rank takes its shard of every global batch, divides its loss by
the global target count, and one all_sum adds gradients and losses between the compiled gradient
step and the compiled clip + AdamW step; only rank 0 evaluates and saves.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.result_fields import (
    finish_result,
    optimizer_record,
    probe_batch,
    record_ranks,
    save_probe_logits,
    start_result,
)
from ftcore.backends.run_context import Run
from ftcore.backends.step_clock import StepClock
from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.inputs.lora_init import initial_lora_state, state_fingerprint
from ftcore.inputs.loss_contract import target_count
from ftcore.measure.blas import blas_threads, set_blas_threads
from ftcore.measure.rss import current_rss_mb
from ftcore.mlx import dist, jit
from ftcore.mlx.adapters import save_adapters
from ftcore.mlx.convert import MANIFEST_FILE
from ftcore.mlx.generate import greedy
from ftcore.mlx.lora import apply_lora, load_lora_state, lora_state
from ftcore.mlx.loss import evaluate, to_mx
from ftcore.mlx.model import Model, load_model
from ftcore.mlx.optim import make_optimizer, settings
from ftcore.mlx.runtime import blas_facts, convert, pick_device
from ftcore.mlx.streams import cpu_streams, loss_and_grads, plan_streams
from ftcore.process.ranks import rank_threads, shard
from ftcore.result import RunResult

# Compile the whole train step (forward, backward, clipping, AdamW) into one graph: element-wise
# chains (exp, sigmoid, ...) become fused JIT CPU kernels, built with AVX2/FMA by ftcore.mlx.jit.
# Measured on a 2-core EPYC (tiny preset, 20 steps): losses within 1e-6 of the uncompiled step
# (FMA rounding). The first run on a machine builds the kernels with g++ (cached; announced and
# recorded by ftcore.mlx.jit.announce_new_kernels) inside the first (warm-up) step, excluded from
# throughput.
COMPILE = True


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
    model.model.checkpoint_layers = cfg.grad_checkpoint
    init = initial_lora_state(read_arch(model_dir), cfg.lora_targets, cfg.lora_rank, cfg.seed)
    load_lora_state(model, {k: mx.array(v) for k, v in init.items()})
    mx.eval(model.parameters())
    result.load_time_s = time.perf_counter() - t0
    return model


def train(run: Run) -> RunResult:
    cfg, batches, model_dir, ranks = run.cfg, run.batches, run.model_dir, run.ranks
    device = pick_device(cfg.device)  # before anything slow: a bad --device fails at once
    mx.set_default_device(device)
    mx.random.seed(cfg.seed)  # LoRA dropout masks
    result = start_result(run)
    if ranks:
        cfg = run.cfg = cfg.replace(threads=rank_threads(cfg))  # this rank's threads, for streams and BLAS
        group = dist.init(device, ranks.world)
    blas_facts(result, cfg)

    model = load(cfg, model_dir, result)
    result.baseline_rss_mb = current_rss_mb()
    result.initial_adapter_fingerprint = state_fingerprint(
        {k: np.array(v) for k, v in lora_state(model).items()}
    )
    mx.reset_peak_memory()
    # before any stream sets the BLAS to one thread
    evals = EvalSchedule(run, lambda: evaluate(model, batches),
                         lambda prompt, n, eos: greedy(model, prompt, n, eos))  # fmt: skip
    if run.lead:
        evals.before()  # rank 0 only, as every eval

    # One stream per thread, each with a 1-thread BLAS (where its threads can be set: otherwise
    # streams x BLAS threads would oversubscribe the cores).
    rows = cfg.batch_size // ranks.world if ranks else cfg.batch_size
    n_streams = plan_streams(device, result.threads, rows)
    if n_streams > 1 and not set_blas_threads(1):
        n_streams = 1
    streams = cpu_streams(n_streams) if device == mx.cpu else (mx.default_stream(device),)
    result.extra["cpu_streams"] = n_streams

    opt = make_optimizer(cfg)
    opt.init(model.trainable_parameters())
    trainable = tree_flatten(model.trainable_parameters())  # what opt.update updates
    result.optimizer = optimizer_record(settings(opt, [k for k, _ in trainable]), cfg.max_grad_norm)
    result.trainable_params = sum(v.size for _, v in trainable)
    # threads really at work in a step: one per stream, times the BLAS threads each one calls
    result.threads = n_streams * (blas_threads() or 1) if device == mx.cpu else result.threads
    record_ranks(run)

    result.extra["compiled_traces"] = 0

    def step_fn(batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
        # Python runs here only while mx.compile traces: once per new input shape (width)
        result.extra["compiled_traces"] += 1
        loss, grads = loss_and_grads(model, batch, batches.packed, streams)
        if cfg.max_grad_norm is not None:  # the norm before clipping
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            grad_norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        opt.update(model, grads)
        return loss, grad_norm

    # The LR lives in opt.state, so setting it per step feeds the compiled graph a new input.
    state = [model.state, opt.state, mx.random.state]
    step = mx.compile(step_fn, inputs=state, outputs=state) if COMPILE else step_fn
    if ranks:  # two compiled halves with the all_sum between them
        grads_part = compile_grads(model, batches.packed, streams, state)
        apply_part = compile_apply(model, opt, cfg, state)

        def step(batch: dict[str, mx.array], count: mx.array) -> tuple[mx.array, mx.array]:
            loss, grads = grads_part(batch, count)
            grads, loss, seconds = dist.all_sum_step(grads, loss, group)
            result.allreduce_times_s.append(seconds)
            return loss, apply_part(grads)

    model.train()
    clock = StepClock(run)
    kernels_before = jit.built_kernels()
    for i in range(cfg.steps):
        fed = batches.step(i)
        mine = shard(fed, ranks.rank, ranks.world) if ranks else fed
        batch, targets = to_mx(mine), target_count(mine["labels"])  # this rank's rows
        opt.learning_rate = cfg.lr_at(i)
        clock.feed(fed["input_ids"])
        clock.lr(opt.learning_rate.item())
        clock.begin(i)
        if ranks:  # the global count: summed over ranks this is the one-process loss
            loss, grad_norm = step(batch, mx.array(max(target_count(fed["labels"]), 1), mx.float32))
        else:
            loss, grad_norm = step(batch)
        mx.eval(loss, grad_norm, state)  # MLX is lazy: the step's work happens here
        loss_value = loss.item()
        clock.end(i, loss_value, grad_norm=grad_norm.item(), targets=targets)
        result.losses.append(loss_value)
        if (i == 0 or i == cfg.steps - 1) and (built := jit.announce_new_kernels(kernels_before, "mlx")):
            # the first step's builds (inside the warm-up step's time), then any a new width added
            so_far = result.extra.get("mlx_kernels_built", {"kernels": 0, "seconds": 0.0})
            result.extra["mlx_kernels_built"] = {**built, "kernels": so_far["kernels"] + built["kernels"],
                                                 "seconds": round(so_far["seconds"] + built["seconds"], 2)}
            kernels_before = jit.built_kernels()
        if not run.lead:
            continue  # eval: rank 0 only (the others wait in the next all_sum)
        if evals.after_step(i, clock.times):
            break  # --target-eval-loss reached (one process only: refused with --nproc > 1)
    clock.stop()
    step_times = clock.times
    if not run.lead:
        return result  # identical weights: rank 0 evaluates and saves

    if n_streams > 1:
        set_blas_threads(result.rank_threads)  # eval and the GEMM probe in finish_result() run on one stream
    busy = result.cpu_busy_threads
    if n_streams > 1:
        result.note(
            f"threads: each batch's rows split over {n_streams} MLX CPU streams, each one thread "
            "with a 1-thread BLAS"
            + (f"; {busy:.2f} threads busy over the timed steps" if busy is not None else "")
        )
    elif cfg.grad_checkpoint and device == mx.cpu and result.threads > 1:
        result.note(
            f"threads: one MLX CPU stream with a {result.threads}-thread BLAS: with "
            "--grad-checkpoint mx.eval keeps its default width, which row streams cannot share"
        )

    evals.after(step_times)
    result.framework_peak_mb = mx.get_peak_memory() / 2**20
    result.extra["framework_peak_note"] = (
        "mx.get_peak_memory() since after load: MLX array buffers in use at the peak of training + "
        "eval (weights, activations, grads, optimizer state); excludes the allocator cache and "
        "non-MLX memory"
    )
    save_adapters(cfg, lora_state(model), len(model.model.layers), model_dir, run.out_dir)
    model.eval()
    probe = to_mx(probe_batch(batches))
    save_probe_logits(
        np.array(model(probe["input_ids"], probe["attention_mask"]).astype(mx.float32)), run.out_dir
    )
    result.device = device.name
    result.extra["compiled"] = COMPILE
    result.extra["precision_mode"] = (
        "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + AdamW"
    )
    return finish_result(run, step_times)


def compile_grads(model: Model, packed: bool, streams: tuple, state: list):
    """(shard, global target count) -> (this rank's loss share, its gradients), compiled."""

    def grads_fn(batch: dict[str, mx.array], count: mx.array) -> tuple[mx.array, dict]:
        return loss_and_grads(model, batch, packed, streams, count)

    return mx.compile(grads_fn, inputs=state, outputs=state) if COMPILE else grads_fn


def compile_apply(model: Model, opt, cfg: RunConfig, state: list):
    """Summed gradients -> clip, AdamW update; returns the norm before clipping. Compiled."""

    def apply_fn(grads: dict) -> mx.array:
        if cfg.max_grad_norm is not None:
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            grad_norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
        opt.update(model, grads)
        return grad_norm

    return mx.compile(apply_fn, inputs=state, outputs=state) if COMPILE else apply_fn
