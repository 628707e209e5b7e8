"""The result fields every backend fills the same way: the ones known before training
(start_result), the throughput figures and this framework's own GEMM peak from the step times
(finish_result), the optimizer record, the data-parallel ranks, and the probe logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ftcore.backends.run_context import BackendRun
from ftcore.files import atomic_path
from ftcore.inputs.arch import read_arch
from ftcore.inputs.batches import Batches
from ftcore.measure.blas import framework_blas
from ftcore.measure.flops import flops_per_token, gemm_shapes, trainable_param_count
from ftcore.measure.gemm_peak import gemm_peak_cached
from ftcore.measure.hostinfo import affinity_cores, host_info
from ftcore.measure.memory_model import memory_model
from ftcore.measure.projection import project_runs
from ftcore.result import RunResult


def optimizer_record(read_back: dict, max_grad_norm: float | None) -> dict[str, Any]:
    """result.optimizer: the settings read back from the optimizer object (framework.optim.settings)
    and the clipping the loop applies; the learning rate of every step is added as the steps run
    (StepClock.lr), read from the optimizer too. Compared across backends for fairness."""
    return {**read_back, "max_grad_norm": max_grad_norm, "lr_per_step": []}


def throughput(run: BackendRun, step_times: list[float]) -> dict[str, float]:
    """Timing figures over the steps after the timing warm-up.

    tokens_per_s counts every position of the batches as fed (padding included: what the step
    computes on); real_tokens_per_s the non-pad tokens; loss_tokens_per_s only the targets that
    enter the loss (labels after the shift that are not IGNORE_INDEX).
    """
    w, batches = run.cfg.timing_warmup_steps, run.batches
    timed = step_times[w:]
    train_time = sum(timed)
    tokens = batches.step_tokens(w, len(step_times))
    rate = (lambda n: n / train_time) if train_time > 0 else (lambda n: 0.0)
    return {
        "train_time_s": train_time,
        "warmup_time_s": sum(step_times[:w]),
        "tokens_per_s": rate(tokens["fed"]),
        "real_tokens_per_s": rate(tokens["real"]),
        "loss_tokens_per_s": rate(tokens["loss"]),
    }


def start_result(run: BackendRun) -> RunResult:
    """run.result: a RunResult with every field that does not depend on the training itself. The
    BLAS probed is this process's framework's (run.framework)."""
    cfg, batches, framework = run.cfg, run.batches, run.framework
    arch = read_arch(run.model_dir)
    seq_len = (
        batches.seq_len
    )  # the length of per-token work: FLOPs and GEMM shapes (Batches.seq_len)
    flops = flops_per_token(arch, seq_len, cfg.lora_targets, cfg.lora_rank, cfg.fine_tune)[
        "total"
    ]  # per real token
    result = run.result = RunResult(
        backend=run.backend,
        status="ok",
        config=cfg.to_dict(),
        env={**host_info(), "framework": framework, **framework_blas(framework)},
        steps=cfg.steps,
        flops_per_token=flops,
        batch_fingerprint=batches.fingerprint,
        precision=cfg.precision,
    )
    # one process: a rank holds the model and its shard's rows
    result.memory_model = memory_model(
        arch, cfg, cfg.batch_size // cfg.world_size, batches.widest
    )  # the peak step
    # what --fine-tune should train; the backend counts what its model really trains
    result.trainable_params_expected = trainable_param_count(
        arch, cfg.fine_tune, cfg.lora_targets, cfg.lora_rank
    )
    result.records = {
        k: batches.stats.get(f"{k}_records") for k in ("train", "eval", "dropped", "prompt_only")
    }
    result.step_widths = [int(w) for w in batches.train["widths"]]
    # the epoch projected (ftcore.measure.projection): --project-records, else the data's records,
    # like the --num-samples drawn: their lengths, and the same share too long to train
    result.epoch_records = cfg.project_records or batches.stats["data_records"]
    scale = result.epoch_records / cfg.num_samples
    result.epoch_widths = {w: n * scale for w, n in batches.stats["epoch_widths"].items()}
    # the run's GEMM shapes: the GEMM peaks MFU divides by are measured over them too
    # (ftcore.measure.flops.gemm_shapes; the parent reads them back, ftcore.measure.mfu)
    threads = cfg.threads or affinity_cores()
    result.extra["gemm_shapes"] = gemm_shapes(arch, cfg.batch_size, seq_len, threads)
    return result


def record_ranks(run: BackendRun) -> None:
    """World size and threads of a data-parallel run: `threads` becomes all ranks' threads
    together, the figure compared for fairness; `rank_threads` one's."""
    result = run.result
    result.rank_threads = result.threads
    if run.ranks:
        result.world_size = run.ranks.world
        result.threads = result.threads * run.ranks.world


def finish_result(run: BackendRun, step_times: list[float]) -> RunResult:
    """Fill the throughput fields from the per-step wall times, and measure this framework's own
    GEMM peak in this process (its BLAS and threads as trained; on a GPU, that GPU's). MFU itself
    is computed from these by the parent, in one place (ftcore.measure.mfu.record_mfu)."""
    cfg, result, framework = run.cfg, run.result, run.framework
    result.step_times_s = list(step_times)
    for k, v in throughput(run, step_times).items():
        setattr(result, k, v)
    run_figures = {"config": cfg.to_dict(), "step_times_s": result.step_times_s,
                   "step_widths": result.step_widths, "epoch_widths": result.epoch_widths}
    for k, v in (project_runs([run_figures]) or {}).items():  # this run alone; a compare pools
        setattr(result, k, v)
    result.final_loss = result.losses[-1] if result.losses else None
    ar = result.allreduce_times_s[cfg.timing_warmup_steps :]
    result.allreduce_time_s = sum(ar) / len(ar) if ar else None  # per timed step
    if cfg.device == "gpu":  # this GPU's measured GEMM peak (the machine probes are CPU-only)
        from ftcore.measure.gemm_timing import measure_gemm_peak

        result.extra["gpu_gemm_peak_gflops"] = measure_gemm_peak(
            framework, cfg.precision, n=8192, device="gpu"
        )
    if cfg.device == "cpu":  # the GEMM probes measure this machine's CPU only
        shapes = tuple(tuple(s) for s in result.extra.get("gemm_shapes", ()))
        result.extra["framework_gemm_peak_gflops"] = gemm_peak_cached(
            framework, cfg.precision, shapes=shapes
        )
    return result


PROBE_FILE = "probe_logits.npy"
PROBE_POSITIONS = 16


def probe_batch(batches: Batches) -> dict[str, Any]:
    """The first training row: after training, every backend saves its logits on this row's
    first PROBE_POSITIONS positions, so a reloaded adapter can be checked in any framework. A packed
    row is probed as one plain causal row (no position_ids): any fixed input serves that check,
    and plain rows are what every framework's loader runs."""
    return {k: v[:1] for k, v in batches.step(0).items() if k != "position_ids"}


def save_probe_logits(logits: Any, out_dir: Path) -> None:
    """logits: (1, L, V) fp32 numpy -> out_dir/probe_logits.npy of shape (PROBE_POSITIONS, V)."""
    with atomic_path(out_dir / PROBE_FILE) as tmp:
        np.save(tmp, np.asarray(logits, dtype=np.float32)[0, :PROBE_POSITIONS])
