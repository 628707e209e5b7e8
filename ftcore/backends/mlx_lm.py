"""`mlx-lm` backend: the same config through mlx-lm's own machinery, as a reference for `mlx`.

mlx-lm's loader (`mlx_lm.utils.load_model`) reads the HF folder, its `linear_to_lora_layers`
adds its LoRALinear (`scale` = alpha / rank, literally), and `mlx_lm.tuner.trainer.train` runs
its compiled step with its `default_loss` on our batches (fed through its `iterate_batches`
hook). The adapters start from the shared `initial_lora_state` (transposed: mlx-lm's lora_a is
(in, r), lora_b is (r, out)). The optimiser is configured as a user of mlx-lm would
(`optim.Adam`, or `optim.AdamW` when weight decay is asked for, MLX defaults otherwise), so the
loss curve differs from the other backends; its report notes (`result.notes`) say where and why.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from ftcore.backends.eval_schedule import EvalSchedule
from ftcore.backends.loop import Recipe, train_with
from ftcore.backends.mlx_lm_model import import_mlx_lm, load, peft_layout, save
from ftcore.backends.mlx_lm_recorder import Recorder
from ftcore.backends.result_fields import optimizer_record, start_result
from ftcore.backends.run_context import BackendRun
from ftcore.backends.step_clock import StepClock
from ftcore.config import RunConfig
from ftcore.files import atomic_path
from ftcore.inputs.arch import fine_tune_of
from ftcore.inputs.batches import Batches
from ftcore.inputs.lora_init import state_fingerprint
from ftcore.inputs.loss_contract import IGNORE_INDEX, micro_batches, target_count, trained_rows
from ftcore.measure.blas import blas_threads
from ftcore.measure.rss import current_rss_mb
from ftcore.mlx.optim import settings
from ftcore.mlx.runtime import blas_facts, pick_device
from ftcore.result import RunResult


def offsets_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """mlx-lm's per-row (offset, length), (B, 2): the first loss target position (the prompt
    length when masking) and the real length (padding excluded; our rows are right-padded). A row
    with no target (a short batch's filler row) gets (1, 0): no position counts."""
    offsets = np.argmax(batch["labels"] != IGNORE_INDEX, axis=1)
    trained = trained_rows(batch["labels"])
    ol = np.stack([offsets, batch["attention_mask"].sum(axis=1)], axis=1)
    return np.where(trained[:, None], ol, np.array([1, 0]))


def mlx_lm_batch(batch: dict[str, np.ndarray]) -> tuple[mx.array, mx.array]:
    """Our (B, L) batch as what mlx-lm's iterate_batches yields: (tokens, offsets_lengths)."""
    tokens = batch["input_ids"].astype(np.int32)
    return mx.array(tokens), mx.array(offsets_lengths(batch).astype(np.int32))


def mlx_lm_target_count(batch: dict[str, np.ndarray]) -> int:
    """Targets default_loss counts: positions offset..length (inclusive) within 1..L-1."""
    ol = offsets_lengths(batch)
    positions = np.arange(1, batch["input_ids"].shape[1])[None]  # (1, L-1)
    return int(((positions >= ol[:, :1]) & (positions <= ol[:, 1:])).sum())


def our_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
    """mlx-lm's `iterate_batches` hook: yield our prepared (tokens, lengths) pairs in order."""
    yield from dataset


def make_optimizer(cfg: RunConfig, result: RunResult, names: list[str]) -> optim.Optimizer:
    """What an mlx-lm user gets: its default `adam` (or `adamw` for weight decay) with the
    config's betas/eps and MLX's defaults otherwise (no bias correction); our per-step LRs as
    a schedule (mlx-lm accepts any callable of the step). `names`: the trainable tensors as
    `lora_state` keys (its trainer updates all of them)."""
    lrs = mx.array([cfg.lr_at(s) for s in range(cfg.steps)])

    def schedule(step: mx.array) -> mx.array:
        # `step` counts the updates done so far: update k uses lrs[k]
        return lrs[mx.minimum(step, cfg.steps - 1)]

    common = {
        "learning_rate": schedule,
        "betas": [cfg.adam_beta1, cfg.adam_beta2],
        "eps": cfg.adam_eps,
    }
    if cfg.weight_decay > 0:
        opt = optim.AdamW(weight_decay=cfg.weight_decay, **common)
    else:
        opt = optim.Adam(**common)  # mlx-lm's default optimizer
    result.optimizer = optimizer_record(settings(opt, names), None)  # its trainer does not clip
    return opt


def numerics_notes(cfg: RunConfig, batches: Batches) -> list[str]:
    ours = target_count(batches.train["labels"])
    theirs = sum(mlx_lm_target_count(batches.step(s)) for s in range(cfg.steps))
    notes = [
        "loss: mlx-lm's default_loss counts targets at positions offset..length inclusive, i.e. "
        f"one pad target after each untruncated row: {theirs} targets over the run vs {ours} in "
        "the other backends; the mean is over its count",
        "loss: the model sees tokens[:, :-1] (tokens/s still counts full rows, as elsewhere) with "
        "a causal mask only (no padding mask: the same for the counted targets under right "
        "padding); cross-entropy runs in the logits' dtype",
        "Adam: no bias correction (MLX default bias_correction=False); the other backends use "
        "AdamW with bias correction, so steps differ from the first update",
        "mlx-lm's trainer clears MLX's buffer cache after every step (clear_cache_threshold=0)",
    ]
    if cfg.weight_decay > 0:
        notes.append(
            f"weight decay {cfg.weight_decay}: MLX AdamW's decoupled p *= 1 - lr*wd, as torch"
        )
    if cfg.max_grad_norm is not None:
        notes.append(
            f"--max-grad-norm {cfg.max_grad_norm} ignored: mlx-lm's trainer does not clip gradients"
        )
    if cfg.eval_every:
        notes.append("--eval-every ignored: eval runs once, after training")
    if cfg.fine_tune == "dora" and cfg.lora_dropout > 0:
        notes.append(
            "DoRA with dropout: mlx-lm scales W x + scale * B A d(x) by m / ||W + scale B A||; "
            "PEFT and the other backends add (m / ||.|| - 1) * W d(x) instead"
        )
    if cfg.grad_accum > 1:
        notes.append(
            f"--grad-accum {cfg.grad_accum}: mlx-lm averages the micro-batches' mean gradients "
            "(each micro-batch's loss a mean over its own targets, the sum divided by the "
            "micro-batches), and reports the mean of their mean losses; the other backends divide "
            "each micro-batch's summed loss by the whole step's target count"
        )
    if cfg.precision == "bf16":
        notes.append(
            "bf16: mlx-lm's LoRALinear rounds the LoRA term to bf16 before adding it to the base "
            "output"
        )
    return notes


class MlxLmRecipe(Recipe):
    """mlx-lm's trainer runs the steps (`steps`), timed on the shared clock by Recorder; its own
    evaluate measures the eval loss after training (no evals before or during)."""

    def setup(self) -> None:
        self.trainer, utils, load_model = import_mlx_lm()
        run, cfg = self.run, self.run.cfg
        self.device = device = pick_device(cfg.device)
        mx.set_default_device(device)
        mx.random.seed(cfg.seed)
        result = start_result(run)
        blas_facts(result, cfg)
        # mlx-lm imports transformers (tokenizer_utils), which imports torch when installed: its RSS
        result.extra["torch_imported"] = "torch" in sys.modules
        self.model = model = load(cfg, run.model_dir, result, utils, load_model)
        result.baseline_rss_mb = current_rss_mb()
        trained = peft_layout(model)
        result.initial_adapter_fingerprint = state_fingerprint(trained, cfg.fine_tune == "full")
        result.fine_tune = fine_tune_of(list(trained))
        result.trainable_params = sum(v.size for v in trained.values())
        if device == mx.cpu:  # one stream: MLX's ops on one thread, GEMMs on the BLAS's threads
            result.threads = blas_threads() or 1
        mx.reset_peak_memory()

    def steps(self, clock: StepClock, evals: EvalSchedule | None) -> None:
        cfg, trainer, model = self.run.cfg, self.trainer, self.model
        opt = make_optimizer(cfg, self.run.result, list(peft_layout(model)))
        recorder = Recorder(clock, opt, cfg.grad_accum)
        # the micro-batches in order; mlx-lm accumulates grad_accum of them an update
        train_set = [mlx_lm_batch(micro) for s in range(cfg.steps)
                     for micro in micro_batches(self.run.batches.step(s), cfg.grad_accum)]
        # the trainer's own final save goes to a temporary name, renamed only once complete
        with atomic_path(
            self.run.out_dir / "adapter_mlx_lm" / "adapters.safetensors"
        ) as adapter_file:
            args = trainer.TrainingArgs(
                batch_size=cfg.batch_size,
                iters=cfg.steps * cfg.grad_accum,  # micro-batches
                grad_accumulation_steps=cfg.grad_accum,
                steps_per_report=cfg.grad_accum,  # one report per optimizer step
                steps_per_save=cfg.steps * cfg.grad_accum + 1,  # only the final save
                max_seq_length=cfg.max_seq_len,
                adapter_file=str(adapter_file),
                # mlx-lm's own: mx.checkpoint around each layer
                grad_checkpoint=cfg.grad_checkpoint,
            )
            trainer.train(model, opt, train_set, args=args, loss=trainer.default_loss,
                          iterate_batches=recorder.batches, training_callback=recorder)  # fmt: skip

    def finish(self) -> None:
        run, cfg, result, batches = self.run, self.run.cfg, self.run.result, self.run.batches
        if batches.eval:
            eval_set = [mlx_lm_batch(b) for b in batches.eval]
            result.eval_loss = self.trainer.evaluate(
                self.model,
                eval_set,
                cfg.batch_size,
                num_batches=-1,
                max_seq_length=cfg.max_seq_len,
                iterate_batches=our_batches,
            )
            result.eval_losses.append([cfg.steps, result.eval_loss])
        result.framework_peak_mb = mx.get_peak_memory() / 2**20
        save(self.model, run)
        result.device = self.device.name
        # mlx_lm.tuner.trainer.train wraps its step in @partial(mx.compile, inputs=state, ...)
        result.compiled_step = True
        for note in numerics_notes(cfg, batches):
            result.note(f"numerics differ: {note}")
        result.extra["precision_mode"] = (
            "fp32" if cfg.precision == "fp32" else "bf16 base weights, fp32 LoRA + Adam"
        )


def train(run: BackendRun) -> RunResult:
    return train_with(run, MlxLmRecipe(run))
