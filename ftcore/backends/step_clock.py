"""What every backend's loop shares: the result's common fields, throughput and MFU from step times,
the probe logits, and a progress line. Framework code lives in ftcore.torch and ftcore.mlx."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ftcore.config import RunConfig
from ftcore.inputs.arch import read_arch
from ftcore.inputs.batches import Batches
from ftcore.measure.blas import framework_blas
from ftcore.measure.flops import flops_per_token, gemm_shapes, lora_param_count
from ftcore.measure.gemm_peak import gemm_peak_cached, mfu
from ftcore.measure.hostinfo import affinity_cores, host_info
from ftcore.measure.machine_load import MachineLoad, busy_warning
from ftcore.measure.memory_model import memory_model
from ftcore.result import RunResult
from ftcore.run.ranks import sibling_pids
from ftcore.run.stepgate import StepGate


def optimizer_record(read_back: dict, max_grad_norm: float | None) -> dict[str, Any]:
    """result.optimizer: the settings read back from the optimizer object (framework.optim.settings)
    and the clipping the loop applies; the learning rate of every step is added as the steps run
    (StepClock.lr), read from the optimizer too. Compared across backends for fairness."""
    return {**read_back, "max_grad_norm": max_grad_norm, "lr_per_step": []}


def throughput(cfg: RunConfig, batches: Batches, step_times: list[float]) -> dict[str, float]:
    """Timing figures over the steps after the timing warm-up.

    tokens_per_s counts every position of the batches as fed (padding included: what the step
    computes on); real_tokens_per_s the non-pad tokens; loss_tokens_per_s only the targets that
    enter the loss (labels after the shift that are not IGNORE_INDEX).
    """
    w = cfg.timing_warmup_steps
    timed = step_times[w:]
    train_time = sum(timed)
    tokens = batches.step_tokens(w, len(step_times))
    rate = (lambda n: n / train_time) if train_time > 0 else (lambda n: 0.0)
    per_step = train_time / len(timed) if timed else None
    return {
        "train_time_s": train_time,
        "epoch_time_s": per_step * batches.stats["steps_per_epoch"] if per_step else None,
        "warmup_time_s": sum(step_times[:w]),
        "tokens_per_s": rate(tokens["padded"]),
        "real_tokens_per_s": rate(tokens["real"]),
        "loss_tokens_per_s": rate(tokens["loss"]),
    }


def base_result(
    backend: str, cfg: RunConfig, model_dir: Path, batches: Batches, framework: str
) -> RunResult:
    """A RunResult with every field that does not depend on the training itself. `framework`
    ("torch" | "mlx") is whose BLAS this process probes, as the backend's spec says."""
    arch = read_arch(model_dir)
    # per real token; attention's share at the batches' mean width (= max_seq_len when `padded`)
    mean_width = int(round(float(batches.train["widths"].mean())))
    flops = flops_per_token(arch, mean_width, cfg.lora_targets, cfg.lora_rank)["total"]
    result = RunResult(
        backend=backend,
        status="ok",
        config=cfg.to_dict(),
        env={**host_info(), "framework": framework, **framework_blas(framework)},
        steps=cfg.steps,
        flops_per_token=flops,
        batch_fingerprint=batches.fingerprint,
        precision=cfg.precision,
    )
    result.memory_model = memory_model(  # one process: a rank holds the model and its shard's rows
        arch, cfg.precision, cfg.batch_size // cfg.world_size, cfg.max_seq_len, cfg.lora_targets,
        cfg.lora_rank, cfg.grad_checkpoint,
    )
    # what LoRA on these targets should train; the backend counts what its model really trains
    result.trainable_params_expected = lora_param_count(arch, cfg.lora_targets, cfg.lora_rank)
    # the run's GEMM shapes: MFU's peak is measured over them too (ftcore.measure.flops.gemm_shapes)
    threads = cfg.threads or affinity_cores()
    result.extra["gemm_shapes"] = gemm_shapes(arch, cfg.batch_size, cfg.max_seq_len, threads)
    return result


def record_ranks(result: RunResult, ranks: Any) -> None:
    """World size and threads of a data-parallel run (ftcore.run.ranks.RankInfo or None): `threads`
    becomes all ranks' threads together, the figure compared for fairness; `rank_threads` one's."""
    result.rank_threads = result.threads
    if ranks:
        result.world_size = ranks.world
        result.threads = result.threads * ranks.world


def finish(
    result: RunResult, cfg: RunConfig, batches: Batches, step_times: list[float], framework: str
) -> RunResult:
    """Fill the throughput and MFU fields from the per-step wall times."""
    result.step_times_s = list(step_times)
    for k, v in throughput(cfg, batches, step_times).items():
        setattr(result, k, v)
    result.final_loss = result.losses[-1] if result.losses else None
    ar = result.allreduce_times_s[cfg.timing_warmup_steps :]
    result.allreduce_time_s = sum(ar) / len(ar) if ar else None  # per timed step
    if cfg.device == "gpu":  # MFU against this GPU's measured GEMM peak (the runner's is CPU-only)
        from ftcore.measure.gemm_timing import measure_gemm_peak

        peak = measure_gemm_peak(framework, cfg.precision, n=8192, device="gpu")
        result.extra["gpu_gemm_peak_gflops"] = peak
        result.mfu = mfu(result.real_tokens_per_s, result.flops_per_token, peak)
    if cfg.device == "cpu":  # the GEMM probes measure this machine's CPU only
        # MFU itself (against the machine's best GEMM peak) is set by the runner's parent
        shapes = tuple(tuple(s) for s in result.extra.get("gemm_shapes", ()))
        own = gemm_peak_cached(framework, cfg.precision, shapes=shapes)
        result.extra["framework_gemm_peak_gflops"] = own
        result.extra["mfu_vs_framework_gemm"] = mfu(
            result.real_tokens_per_s, result.flops_per_token, own
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
    np.save(out_dir / PROBE_FILE, np.asarray(logits, dtype=np.float32)[0, :PROBE_POSITIONS])


class Progress:
    """One status line on stderr: a live line on a terminal, a line every ~10% otherwise."""

    def __init__(self, backend: str, total: int, quiet: bool = False) -> None:
        self.backend, self.total, self.quiet = backend, total, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float | None) -> None:
        done = step + 1
        if self.quiet:
            return
        if not self.tty and done != self.total and done % max(1, self.total // 10):
            return
        tps = f"{tokens_per_s:8.1f} tok/s" if tokens_per_s else "    warm-up"
        line = f"[{self.backend}] step {done:>4}/{self.total}  loss {loss:.4f}  {tps}  {time.perf_counter() - self.t0:6.1f}s"
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty and done < self.total else "\n",
            file=sys.stderr,
            flush=True,
        )


class Diverged(Exception):
    """A step's loss or gradient norm is NaN or Inf: the run stops there with status `diverged`
    (raised by StepClock.end, turned into the result by the runner's child)."""

    def __init__(self, step: int, what: str, value: float, losses: list[float], times: list[float]):
        super().__init__(f"diverged at step {step + 1}: {what} is {value}")
        self.losses, self.times = losses, times

    def result(self, backend: str, config: dict) -> RunResult:
        r = RunResult(backend=backend, status="diverged", error=str(self), config=config,
                      losses=self.losses, step_times_s=self.times)  # fmt: skip
        r.steps = len(self.losses)
        return r


class Quality:
    """What the fine-tune did to the model, measured the same way in every loop that owns its steps:
    eval loss and exact-match accuracy of greedy answers before the first step (the adapter's B is
    zero, so this is the base model), eval loss every cfg.eval_every steps, both again after the
    last step; and the stop at --target-eval-loss.

        q = Quality(cfg, batches, result, evaluate, generate)   # evaluate() -> loss,
        q.before()                                              # generate(prompt, n, eos) -> ids
        for step ...: <step>; if q.after_step(step, clock.times): break
        q.after(clock.times)

    Time to target counts wall time from the first step to the end of the eval that reached the
    target, evals included (as MLPerf counts it); `train_seconds` is the step time alone.
    """

    def __init__(self, cfg: RunConfig, batches: Batches, result: RunResult,
                 evaluate: Any, generate: Any) -> None:
        self.cfg, self.batches, self.result = cfg, batches, result
        self.evaluate, self.generate = evaluate, generate
        self.t0 = 0.0
        if cfg.target_eval_loss is not None:
            result.target = {"eval_loss": cfg.target_eval_loss, "reached": False, "step": None,
                             "seconds": None, "train_seconds": None}  # fmt: skip

    def _answers(self, when: str) -> float | None:
        items = self.batches.answer_items()
        if not (self.cfg.generates and items):
            return None
        eos = int(self.batches.stats["eos_id"])
        outs = [self.generate(prompt, len(answer), eos) for prompt, answer in items]
        self.result.generations[when] = outs
        return sum(o == a for o, (_, a) in zip(outs, items, strict=True)) / len(items)

    def before(self) -> None:
        loss = self.evaluate()
        self.result.eval_loss_before = loss
        if loss is not None:
            self.result.eval_losses.append([0, loss])
        self.result.accuracy_before = self._answers("before")
        self.t0 = time.perf_counter()

    def _eval_at(self, steps_done: int) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            self.result.eval_losses.append([steps_done, loss])
        t = self.result.target
        if t is not None and not t["reached"] and loss is not None and loss <= t["eval_loss"]:
            t.update(reached=True, step=steps_done, seconds=time.perf_counter() - self.t0,
                     train_seconds=sum(self.result.step_times_s[:steps_done]) or None)  # fmt: skip
        return loss

    def after_step(self, step: int, step_times: list[float]) -> bool:
        """After step `step` (0-based): a periodic eval when one is due. True: the target was
        reached, stop training."""
        every, done = self.cfg.eval_every, step + 1
        if not every or done % every or done >= self.cfg.steps:
            return False
        self.result.step_times_s = list(step_times)
        self._eval_at(done)
        return self.result.target is not None and self.result.target["reached"]

    def after(self, step_times: list[float]) -> None:
        """After the last step run: final eval loss (unless the target stop just measured it) and
        accuracy."""
        done = len(step_times)
        self.result.step_times_s = list(step_times)
        last = self.result.eval_losses[-1] if self.result.eval_losses else None
        self.result.eval_loss = last[1] if last and last[0] == done and done > 0 else self._eval_at(done)
        self.result.accuracy_after = self._answers("after")
        self.result.steps = done


class StepClock:
    """What every training loop does around a step: wait for the step gate (ftcore.run.stepgate),
    time the step, answer the gate, print progress, and measure the machine's load from other
    processes over the timed steps (ftcore.measure.machine_load).

        clock.begin(i); <the step, ending at a sync point>; clock.end(i, loss, grad_norm)
        ... after the last step: clock.stop(result)

    Numerical health: `end` raises Diverged when the loss or the gradient norm (the loops that
    own their step pass it; the hf-trainer and mlx-lm trainers do not expose it per step, so only
    their loss is checked) is not finite.
    """

    def __init__(self, backend: str, cfg: RunConfig, batches: Batches, rank: int = 0) -> None:
        self.cfg, self.batches = cfg, batches
        self.gate = StepGate({} if rank else None)  # ranks > 0 follow rank 0 through the collectives
        self.load = MachineLoad(sibling_pids)
        self.progress = Progress(backend, cfg.steps, quiet=rank > 0)
        self.times: list[float] = []
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self._fed = hashlib.sha256()
        self._t = self._cpu = 0.0
        self.cpu_times: list[float] = []  # CPU seconds of all this process's threads, per step

    def feed(self, input_ids: Any) -> None:
        """Hash the token ids (B, L) the loop really feeds the model this step (numpy-convertible)."""
        ids = np.ascontiguousarray(np.asarray(input_ids), dtype=np.int64)
        self._fed.update(str(ids.shape).encode())
        self._fed.update(ids.tobytes())

    def lr(self, value: float) -> None:
        """The learning rate this step's update uses, read from the optimizer."""
        self.lrs.append(float(value))

    def begin(self, step: int) -> None:
        self.gate.before(step)
        if step == self.cfg.timing_warmup_steps:
            self.load.start()
        self._cpu = time.process_time()
        self._t = time.perf_counter()

    def end(self, step: int, loss: float, seconds: float | None = None,
            grad_norm: float | None = None) -> None:
        """`seconds`: the step's time when the loop measured it itself (mlx-lm's trainer)."""
        self.times.append(time.perf_counter() - self._t if seconds is None else seconds)
        if seconds is None:  # the step ran between begin and end: its CPU time is this process's
            self.cpu_times.append(time.process_time() - self._cpu)
        self.losses.append(loss)
        if not math.isfinite(loss):
            raise Diverged(step, "the loss", loss, self.losses, self.times)
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise Diverged(step, "the gradient norm", grad_norm, self.losses, self.times)
        self.gate.after(step, loss)
        w = self.cfg.timing_warmup_steps
        timed = self.times[w:]
        tps = self.batches.step_tokens(w, len(self.times))["padded"] / sum(timed) if timed else None
        self.progress.update(step, loss, tps)

    def stop(self, result: RunResult) -> None:
        """Record what the steps fed and used (token ids, learning rates) and the load of the
        machine over the timed steps; a busy machine is a warning."""
        result.fed_batches_fingerprint = self._fed.hexdigest()[:16]
        timed = slice(self.cfg.timing_warmup_steps, None)
        if len(self.cpu_times) == len(self.times) and sum(self.times[timed]) > 0:
            # threads kept busy over the timed steps (for MLX: do its row streams overlap?)
            result.cpu_busy_threads = sum(self.cpu_times[timed]) / sum(self.times[timed])
        if result.optimizer:
            result.optimizer["lr_per_step"] = list(self.lrs)
        record = result.machine_load = self.load.stop()
        if (warning := busy_warning(record)) and not self.progress.quiet:
            print(f"[{result.backend}] {warning}", file=sys.stderr, flush=True)
            result.warn(warning)
