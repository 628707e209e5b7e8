"""`mlx` backend: ftcore's MLX Llama (`ftcore.mlx`) with LoRALinear, trained by the shared loop
(backends.loop) step for step like the torch backend (same loss, LR per step, AdamW with bias
correction, clipping, eval, adapter).

No torch or transformers import: this process's RSS is MLX's alone.
Precision: fp32 converts every weight to fp32. bf16 converts the frozen base weights to bf16 and
keeps LoRA weights, gradients and AdamW state in fp32 (as the torch backend does).
On the CPU the step splits each batch's rows over one stream per thread (ftcore.mlx.streams).
Under mlx.launch (ftcore.process.ranks) each rank takes its shard of every global batch, divides its
loss by the global target count, and one all_sum adds gradients and losses between the compiled
gradient step and the compiled clip + AdamW step; only rank 0 evaluates and saves. With
--grad-accum N (one process) the same two halves run: the compiled gradients once per micro-batch,
summed (ftcore.mlx.accumulate), then clip + AdamW.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.loop import StepRecipe, train_with
from ftcore.backends.result_fields import (
    optimizer_record,
    probe_batch,
    record_ranks,
    save_probe_logits,
    start_result,
)
from ftcore.backends.run_context import BackendRun
from ftcore.config import RunConfig
from ftcore.inputs.arch import fine_tune_of, read_arch
from ftcore.inputs.lora_init import dora_magnitudes, initial_lora_state, state_fingerprint
from ftcore.measure.blas import blas_threads, set_blas_threads
from ftcore.measure.rss import current_rss_mb
from ftcore.mlx import dist, jit
from ftcore.mlx.accumulate import accumulated_grads
from ftcore.mlx.adapters import save_adapters, save_checkpoint
from ftcore.mlx.convert import MANIFEST_FILE
from ftcore.mlx.generate import greedy
from ftcore.mlx.lora import adapted_weights, apply_lora, load_lora_state, lora_state
from ftcore.mlx.loss import evaluate, to_mx
from ftcore.mlx.model import Model, load_model
from ftcore.mlx.optim import make_optimizer, settings
from ftcore.mlx.runtime import blas_facts, convert, pick_device
from ftcore.mlx.streams import cpu_streams, loss_and_grads, plan_streams
from ftcore.process.ranks import rank_threads
from ftcore.result import RunResult

# Compile the whole train step (forward, backward, clipping, AdamW) into one graph: element-wise
# chains (exp, sigmoid, ...) become fused JIT CPU kernels, built with AVX2/FMA by ftcore.mlx.jit.
# Measured on a 2-core EPYC (tiny preset, 20 steps): losses within 1e-6 of the uncompiled step
# (FMA rounding). The first run on a machine builds the kernels with g++ (cached; announced and
# recorded by ftcore.mlx.jit.announce_new_kernels) inside the first (warm-up) step, excluded from
# throughput.
COMPILE = True


def load(cfg: RunConfig, model_dir: Path, result: RunResult) -> Model:
    """Cached HF -> MLX conversion at the run's precision, then the model with the shared
    adapters."""
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
    model.model.checkpoint_layers = cfg.grad_checkpoint
    if cfg.fine_tune == "full":  # every decoder layer's own weights, as mlx-lm's full
        model.freeze()
        for layer in model.model.layers:
            layer.unfreeze()
    else:
        dora = cfg.fine_tune == "dora"
        apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                   dora=dora)  # fmt: skip
        init = initial_lora_state(read_arch(model_dir), cfg.lora_targets, cfg.lora_rank, cfg.seed)
        if dora:  # the magnitudes from these fp32 weights, as the torch side from its own
            init |= dora_magnitudes(adapted_weights(model, cfg.lora_targets), init, cfg.lora_scale)
        load_lora_state(model, {k: mx.array(v) for k, v in init.items()})
    mx.eval(model.parameters())
    result.load_time_s = time.perf_counter() - t0
    return model


class MlxRecipe(StepRecipe):
    def setup(self) -> EvalSchedule:
        run, cfg = self.run, self.run.cfg
        # before anything slow: a bad --device fails at once
        self.device = device = pick_device(cfg.device)
        mx.set_default_device(device)
        mx.random.seed(cfg.seed)  # LoRA dropout masks
        result = start_result(run)
        if run.ranks:
            # this rank's threads, for streams and BLAS
            cfg = run.cfg = cfg.replace(threads=rank_threads(cfg))
            self.group = dist.init(device, run.ranks.world)
        blas_facts(result, cfg)

        self.model = model = load(cfg, run.model_dir, result)
        result.baseline_rss_mb = current_rss_mb()
        trained = dict(tree_flatten(model.trainable_parameters()))  # as lora_state keys
        result.initial_adapter_fingerprint = state_fingerprint(trained, cfg.fine_tune == "full")
        result.fine_tune = fine_tune_of(list(trained))
        mx.reset_peak_memory()
        # before any stream sets the BLAS to one thread (ready())
        return EvalSchedule(run, lambda: evaluate(model, run.batches),
                            lambda prompt, n, eos: greedy(model, prompt, n, eos))  # fmt: skip

    def ready(self) -> None:
        """Row streams, AdamW, and the compiled step."""
        run, cfg, result, device, model = (
            self.run,
            self.run.cfg,
            self.run.result,
            self.device,
            self.model,
        )
        # One stream per thread, each with a 1-thread BLAS (where its threads can be set: otherwise
        # streams x BLAS threads would oversubscribe the cores).
        rows = cfg.batch_size // run.ranks.world if run.ranks else cfg.batch_size
        self.n_streams = n_streams = plan_streams(device, result.threads, rows)
        if n_streams > 1 and not set_blas_threads(1):
            self.n_streams = n_streams = 1
        streams = cpu_streams(n_streams) if device == mx.cpu else (mx.default_stream(device),)
        result.extra["cpu_streams"] = n_streams

        self.opt = opt = make_optimizer(cfg)
        opt.init(model.trainable_parameters())
        trainable = tree_flatten(model.trainable_parameters())  # what opt.update updates
        result.optimizer = optimizer_record(
            settings(opt, [k for k, _ in trainable]), cfg.max_grad_norm
        )
        result.trainable_params = sum(v.size for _, v in trainable)
        # threads really at work in a step: one per stream, times the BLAS threads each one calls
        result.threads = n_streams * (blas_threads() or 1) if device == mx.cpu else result.threads
        record_ranks(run)

        result.extra["compiled_traces"] = 0  # counted by the compiled step's (or grads') traces
        # The LR lives in opt.state, so setting it per step feeds the compiled graph a new input.
        self.state = state = [model.state, opt.state, mx.random.state]
        # two compiled halves: gradients, then (after the ranks' or micro-batches' sum) clip + AdamW
        if run.ranks or cfg.grad_accum > 1:
            self.grads_part = compile_grads(model, run.batches.packed, streams, state, result.extra)
            self.apply_part = compile_apply(model, opt, cfg, state)
        else:
            self.whole = self.compile_step(streams)
        model.train()
        self.kernels_before = jit.built_kernels()

    def compile_step(self, streams: tuple):
        """batch -> (loss, norm before clipping): forward, backward, clipping, AdamW in one
        graph."""
        model, opt, cfg, result = self.model, self.opt, self.run.cfg, self.run.result
        packed = self.run.batches.packed

        def step_fn(batch: dict[str, mx.array]) -> tuple[mx.array, mx.array]:
            # Python runs here only while mx.compile traces: once per new input shape (width)
            result.extra["compiled_traces"] += 1
            loss, grads = loss_and_grads(model, batch, packed, streams)
            if cfg.max_grad_norm is not None:  # the norm before clipping
                grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            else:
                grad_norm = mx.sqrt(
                    sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))
                )
            opt.update(model, grads)
            return loss, grad_norm

        return mx.compile(step_fn, inputs=self.state, outputs=self.state) if COMPILE else step_fn

    def batch(self, rows: dict) -> dict[str, mx.array]:
        return to_mx(rows)

    def set_lr(self, lr: float) -> float:
        self.opt.learning_rate = lr
        return self.opt.learning_rate.item()

    def step(self, batch: dict[str, mx.array], count: int) -> tuple[float, float]:
        if not self.run.ranks and self.run.cfg.grad_accum == 1:
            loss, grad_norm = self.whole(batch)  # its own count: the batch's targets, the same
            self.run.result.grad_accum = 1
        elif not self.run.ranks:  # --grad-accum: the micro-batches' gradients summed
            n = self.run.cfg.grad_accum
            grads, loss, ran = accumulated_grads(self.grads_part, batch, n, count)
            self.run.result.grad_accum = ran
            grad_norm = self.apply_part(grads)
        else:  # two compiled halves with the all_sum between them
            loss, grads = self.grads_part(batch, mx.array(count, mx.float32))
            grads, loss, seconds = dist.all_sum_step(grads, loss, self.group)
            self.run.result.allreduce_times_s.append(seconds)
            self.run.result.grad_accum = 1
            grad_norm = self.apply_part(grads)
        mx.eval(loss, grad_norm, self.state)  # MLX is lazy: the step's work happens here
        return loss.item(), grad_norm.item()

    def after_step(self, step: int) -> None:
        # the first step's builds (inside the warm-up step's time), then any a new width added
        if step not in (0, self.run.cfg.steps - 1):
            return
        if built := jit.announce_new_kernels(self.kernels_before, "mlx"):
            extra = self.run.result.extra
            so_far = extra.get("mlx_kernels_built", {"kernels": 0, "seconds": 0.0})
            extra["mlx_kernels_built"] = {
                **built,
                "kernels": so_far["kernels"] + built["kernels"],
                "seconds": round(so_far["seconds"] + built["seconds"], 2),
            }
            self.kernels_before = jit.built_kernels()

    def end_steps(self) -> None:
        if self.n_streams > 1:
            set_blas_threads(
                self.run.result.rank_threads
            )  # eval and the GEMM probe run on one stream

    def finish(self) -> None:
        run, cfg, result, model = self.run, self.run.cfg, self.run.result, self.model
        self.threads_note()
        result.framework_peak_mb = mx.get_peak_memory() / 2**20
        result.extra["framework_peak_note"] = (
            "mx.get_peak_memory() since after load: MLX array buffers in use at the peak of "
            "training + eval (weights, activations, grads, optimizer state); excludes the "
            "allocator cache and non-MLX memory"
        )
        if cfg.fine_tune == "full":
            save_checkpoint(model, run.model_dir, run.out_dir / "model", cfg.prompt_format)
        else:
            save_adapters(cfg, lora_state(model), len(model.model.layers), run.model_dir,
                          run.out_dir)  # fmt: skip
        model.eval()
        probe = to_mx(probe_batch(run.batches))
        save_probe_logits(
            np.array(model(probe["input_ids"], probe["attention_mask"]).astype(mx.float32)),
            run.out_dir,
        )
        result.device = self.device.name
        result.compiled_step = COMPILE
        result.extra["precision_mode"] = (
            "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + AdamW"
        )

    def threads_note(self) -> None:
        result, n_streams = self.run.result, self.n_streams
        busy = result.cpu_busy_threads
        if n_streams > 1:
            result.note(
                f"threads: each batch's rows split over {n_streams} MLX CPU streams, each one "
                "thread with a 1-thread BLAS"
                + (f"; {busy:.2f} threads busy over the timed steps" if busy is not None else "")
            )
        elif self.run.cfg.grad_checkpoint and self.device == mx.cpu and result.threads > 1:
            result.note(
                f"threads: one MLX CPU stream with a {result.threads}-thread BLAS: with "
                "--grad-checkpoint mx.eval keeps its default width, which row streams cannot share"
            )


def train(run: BackendRun) -> RunResult:
    return train_with(run, MlxRecipe(run))


def compile_grads(model: Model, packed: bool, streams: tuple, state: list, extra: dict):
    """(rows, count) -> (their summed loss / count, their gradients), compiled: a rank's shard
    over the global batch's targets, or a micro-batch over its step's. Traces counted in
    extra["compiled_traces"] (once per new width)."""

    def grads_fn(batch: dict[str, mx.array], count: mx.array) -> tuple[mx.array, dict]:
        extra["compiled_traces"] += 1  # Python runs here only while mx.compile traces
        return loss_and_grads(model, batch, packed, streams, count)

    return mx.compile(grads_fn, inputs=state, outputs=state) if COMPILE else grads_fn


def compile_apply(model: Model, opt, cfg: RunConfig, state: list):
    """Summed gradients -> clip, AdamW update; returns the norm before clipping. Compiled."""

    def apply_fn(grads: dict) -> mx.array:
        if cfg.max_grad_norm is not None:
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            grad_norm = mx.sqrt(
                sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))
            )
        opt.update(model, grads)
        return grad_norm

    return mx.compile(apply_fn, inputs=state, outputs=state) if COMPILE else apply_fn
